"""An asyncio service that tests and benches on plain threads use as a `with` block: it runs on an event loop of
its own, on a thread of its own, so the caller needs no loop and the service's tasks never wait on the caller's."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from types import TracebackType
from typing import Self


class ThreadedService:
    """Subclasses give `start` and `stop` (async, on the service's loop) and `thread_name`; `with service:` starts it
    and waits until `start` returned (raising what it raised), and its end stops it and joins the thread."""

    thread_name = "service"
    start_timeout = 30.0
    stop_timeout = 30.0

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(started),), name=self.thread_name, daemon=True
        )
        self._thread.start()
        try:
            started.result(timeout=self.start_timeout)
        except BaseException:
            self._thread.join(timeout=self.stop_timeout)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=self.stop_timeout)
            self._thread = None

    async def _serve(self, started: concurrent.futures.Future[None]) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        try:
            await self.start()
        except BaseException as exc:
            started.set_exception(exc)
            await self.stop()
            return
        started.set_result(None)
        await self._stopping.wait()
        await self.stop()
