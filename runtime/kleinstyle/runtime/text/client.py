"""`TextClient.ask`: one structured question to a provider, cached, retried within bounds, its tokens counted.

Two retry loops, both bounded:
- transport (retry.py): 429, 5xx, timeouts and reset connections, with backoff that honours the server's wait;
  when they run out, ProviderUnavailable (a later run of the step may succeed: the error is retryable);
- answer: a blocked answer, malformed JSON or an answer that breaks the schema is asked again, with what was wrong,
  up to `answer_attempts` times in all; then AnswerRejected naming the last problem.
A validated answer is cached under the hash of everything that decided it, so asking again is free.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from kleinstyle.contract.reports import TokenUsage
from pydantic import BaseModel, ValidationError

from .cache import AnswerCache, cache_key
from .providers import AnswerRejected, Prompt, Provider, ProviderUnavailable, Usage
from .retry import GaveUp, RetryPolicy, call_with_retries

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


@dataclass
class UsageLedger:
    """Every call's tokens, thread-safe (captions are asked concurrently)."""

    provider: str
    model: str
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _usage: Usage = field(default_factory=Usage)
    _calls: int = 0
    _cached: int = 0
    _by_purpose: dict[str, int] = field(default_factory=dict)

    def record(self, purpose: str, usage: Usage | None) -> None:
        """A paid call with its usage, or (usage None) an answer served from the cache."""
        with self._lock:
            if usage is None:
                self._cached += 1
                return
            self._calls += 1
            self._usage = self._usage + usage
            self._by_purpose[purpose] = self._by_purpose.get(purpose, 0) + usage.total_tokens

    def summary(self) -> TokenUsage:
        with self._lock:
            return TokenUsage(
                provider=self.provider,
                model=self.model,
                calls=self._calls,
                cached_calls=self._cached,
                prompt_tokens=self._usage.prompt_tokens,
                output_tokens=self._usage.output_tokens,
                total_tokens=self._usage.total_tokens,
                by_purpose=dict(self._by_purpose),
            )


class TextClient:
    """A provider with a cache, retry bounds and a usage ledger; safe to share between threads."""

    def __init__(
        self,
        provider: Provider,
        cache: AnswerCache | None = None,
        *,
        policy: RetryPolicy | None = None,
        answer_attempts: int = 2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.provider = provider
        self.cache = cache or AnswerCache(None)
        self.policy = policy or RetryPolicy()
        self.answer_attempts = answer_attempts
        self.sleep = sleep
        self.ledger = UsageLedger(provider.name, provider.model)

    @property
    def label(self) -> str:
        return f"{self.provider.name} ({self.provider.model})"

    def ask(self, purpose: str, version: str, prompt: Prompt, answer: type[M], what: str = "") -> M:
        """The validated answer to `prompt`; `what` names the subject (an image, a prompt) in errors and logs."""
        what = what or purpose
        key = cache_key(
            self.provider.name,
            self.provider.model,
            purpose,
            version,
            prompt.system,
            prompt.text,
            [image.source_sha256 for image in prompt.images],
            prompt.schema,
            prompt.temperature,
        )
        cached = self.cache.get(key)
        if cached is not None:
            try:
                result = answer.model_validate(cached["answer"])
            except (KeyError, ValidationError):
                log.warning("%s: cached answer %s no longer fits the schema; asking again", what, key[:12])
            else:
                self.ledger.record(purpose, None)
                return result
        asked = prompt
        problem = ""
        for attempt in range(1, self.answer_attempts + 1):
            try:
                reply = call_with_retries(
                    partial(self.provider.send, asked), self.policy, f"{self.label}, {what}", sleep=self.sleep
                )
            except GaveUp as exc:
                raise ProviderUnavailable(str(exc)) from None
            self.ledger.record(purpose, reply.usage)
            if reply.blocked:
                problem = f"the provider blocked it ({reply.blocked})"
            else:
                try:
                    result = answer.model_validate(parse_json(reply.text))
                except ValueError as exc:  # ValidationError is a ValueError
                    problem = describe_invalid(exc)
                else:
                    entry = {"answer": result.model_dump(mode="json", by_alias=True), "usage": vars(reply.usage)}
                    self.cache.put(key, entry)
                    return result
            log.warning("%s: answer %d of %d unusable: %s", what, attempt, self.answer_attempts, problem)
            asked = prompt.with_note(
                f"Your previous answer was rejected: {problem}. Answer again with JSON that follows the schema."
            )
        raise AnswerRejected(f"{what}: {self.label} gave no usable answer in {self.answer_attempts} tries: {problem}")


def parse_json(text: str | None) -> Any:
    """The JSON in an answer; a Markdown code fence around it (some models add one even in JSON mode) is dropped."""
    if not text or not text.strip():
        raise ValueError("empty answer")
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    try:
        return json.loads(fenced.group(1) if fenced else body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON ({exc.msg} at character {exc.pos})") from None


def describe_invalid(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors()[:5])
        return f"the answer breaks the schema ({errors})"
    return str(exc)
