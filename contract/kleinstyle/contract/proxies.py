"""Checkpoint scores measured by stand-ins: what early stopping does with them, in one place for the runtime (which
acts on it) and the operator (which shows it).

A score is a proxy when the model that should measure it is missing (docs/policy.md): style by colour statistics
instead of a style model, adherence not measured, leakage by a light/dark layout instead of a content model. Such
scores are still computed and shown, labelled, but they pick nothing: the run trains its planned steps, keeps every
checkpoint, and the last one becomes the LoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .early_stop import Verdict


def proxy_reason(proxies: Mapping[str, str]) -> str:
    return (
        f"off: the scores for {', '.join(sorted(proxies))} are proxies (no model measures them), so nothing is picked "
        "or stopped on them: the run trains its planned steps and the last checkpoint becomes the LoRA"
    )


def on_proxies(verdict: Verdict, proxies: Mapping[str, str]) -> Verdict:
    """`verdict` as it stands when some scores are proxies: never a stop, never a pick (its scores kept to show)."""
    if not proxies:
        return verdict
    return dataclasses.replace(verdict, best_step=None, stop=False, reason=proxy_reason(proxies))
