"""Run the operator coroutine in its own thread and event loop, as it owns its process on a cluster.

kopf treats the event loop as its own: when it stops it waits up to 5 s for, then cancels, every task created in
the loop after it started (the executor's Job runs, a test's watchers), and in the main thread it replaces the
loop's SIGINT/SIGTERM handlers with its own. In a separate thread neither reaches the dev cluster or the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

OperatorFactory = Callable[[asyncio.Event], Awaitable[None]]


class OperatorThread:
    """One run of an operator: `factory(stop)` runs in a fresh thread and loop until it returns or is stopped."""

    def __init__(self, factory: OperatorFactory, name: str = "devcluster-operator") -> None:
        self._factory = factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._main: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self.result: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._thread_main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    @property
    def running(self) -> bool:
        return not self.result.done()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._run())
        except asyncio.CancelledError:  # cancelled by `stop` after its timeout
            self.result.set_result(None)
        except BaseException as exc:  # the operator's crash, reported to whoever awaits `result`, and logged now
            logger.exception("the operator stopped with an error")
            self.result.set_exception(exc)
        else:
            self.result.set_result(None)
        finally:
            self._started.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._main = asyncio.current_task()
        self._started.set()
        await self._factory(self._stop)

    def _call(self, callback: Callable[[], object]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to stop
                self._loop.call_soon_threadsafe(callback)

    async def stop(self, timeout: float) -> None:
        """Set the stop event; cancel the operator if it has not returned after `timeout`. Re-raises its crash."""
        if self._stop is not None:
            self._call(self._stop.set)
        done = asyncio.wrap_future(self.result)
        await asyncio.wait({done}, timeout=timeout)
        if not done.done() and self._main is not None:
            self._call(self._main.cancel)
            await asyncio.wait({done}, timeout=timeout)
        await asyncio.to_thread(self._thread.join, timeout)
        error = done.exception() if done.done() else None
        if error is not None:
            raise error

    async def exited(self) -> None:
        """Return once the operator has stopped (on its own or when asked); re-raises its crash."""
        await asyncio.wrap_future(self.result)
