"""The exceptions and failure classes every step shares, in a module of its own so a command line can use them
without importing the harness (pydantic, the HTTP client)."""

from __future__ import annotations

import errno
import os

# What torch's writer (caffe2 inline_container.cc, a std::ofstream underneath) says when a write fails: it never
# carries the errno, so these words are all there is to go on. A failed write of a checkpoint is in practice a full
# volume; it is reported as one, saying what the words were.
TORCH_WRITE_FAILURES = (
    "PytorchStreamWriter failed writing file",
    "file write failed",
    "basic_ios::clear: iostream error",
)
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class BadInput(ValueError):
    """Input the run can never succeed on: exit 2, and the Job fails at once instead of retrying."""


def volume_full(exc: BaseException) -> str | None:
    """The termination message for `exc` when it, or an exception it was raised from or while handling, is a full
    volume (ENOSPC, EDQUOT, or torch's failed write); None for anything else. A retry would redo the same work
    only to fail on the same full volume, so the Job must not retry it."""
    seen: set[int] = set()
    chain: BaseException | None = exc
    torch_failure: BaseException | None = None
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in FULL_ERRNOS:
            return full_message(os.strerror(chain.errno), chain.filename)
        if torch_failure is None and isinstance(chain, RuntimeError) and _torch_write_failure(str(chain)):
            torch_failure = chain
        chain = chain.__cause__ or chain.__context__
    if torch_failure is not None:
        first_line = str(torch_failure).strip().splitlines()[0][:200]
        return full_message(f"No space left on device; torch's writer said: {first_line}")
    return None


def full_message(reason: str, path: object = None) -> str:
    where = f" while writing {os.fsdecode(path)}" if isinstance(path, str | bytes | os.PathLike) else ""
    return (
        f"the artifacts volume is full ({reason}){where}: free space or grow the claim; checkpoints already saved "
        "are kept and the next run resumes from them"
    )


def _torch_write_failure(message: str) -> bool:
    return any(words in message for words in TORCH_WRITE_FAILURES) or (
        "inline_container.cc" in message and "unexpected pos" in message
    )
