"""`kubectl logs`: a pod's log as the kubelet serves it, from the file the dev cluster's executor writes.

`tailLines` keeps the last lines; `follow` streams what the process writes until the pod has finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp.web

FOLLOW_POLL_S = 0.2


@dataclass(frozen=True)
class PodLog:
    path: Path
    follow: bool = False
    tail_lines: int | None = None
    finished: Callable[[], bool] = lambda: True

    def read(self, offset: int = 0) -> bytes:
        try:
            with self.path.open("rb") as log:
                log.seek(offset)
                return log.read()
        except FileNotFoundError:
            return b""  # the container has not started yet: an empty log, as the kubelet answers

    def head(self) -> tuple[bytes, int]:
        """What to send first, and how far into the file that reaches."""
        text = self.read()
        if self.tail_lines is None:
            return text, len(text)
        lines = text.splitlines(keepends=True)
        return (b"".join(lines[-self.tail_lines :]) if self.tail_lines else b""), len(text)

    async def respond(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        first, offset = self.head()
        if not self.follow:
            return aiohttp.web.Response(body=first, content_type="text/plain")
        response = aiohttp.web.StreamResponse(status=200)
        response.content_type = "text/plain"
        response.enable_chunked_encoding()
        await response.prepare(raw)
        try:
            await response.write(first)
            while True:
                done = self.finished()  # checked before reading, so the last lines are sent
                more = self.read(offset)
                if more:
                    offset += len(more)
                    await response.write(more)
                if done:
                    break
                await asyncio.sleep(FOLLOW_POLL_S)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        return response
