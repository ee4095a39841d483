"""How the dev cluster's servers start and stop as `with` blocks: processes in a folder of their own (`Started`:
the control plane, Kueue, Prometheus), and asyncio services on a thread of their own (`ThreadedService`: the node
agent, the fault proxy), so the caller needs no event loop and their tasks never wait on the caller's."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Self


def terminate(process: subprocess.Popen[bytes], grace: float, sig: int = signal.SIGTERM) -> None:
    """End `process` as a supervisor does: `sig` (SIGTERM: its own clean shutdown), SIGKILL after `grace` seconds.
    A stopped (SIGSTOP) process is continued first, or it could never act on the signal."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGCONT)
    process.send_signal(sig)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Started:
    """`start()` makes a temporary folder (`root`) and calls `_start()`; if that fails, `stop()` ends whatever it began
    before the error goes on. `with` starts and stops. Subclasses give `_start`, `stop` and `root_prefix`."""

    root_prefix = "kleinstyle-"

    def __init__(self) -> None:
        self.root = Path()

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=self.root_prefix))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


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
