"""Optimizers and learning-rate schedules for the builtin trainer, named as ai-toolkit and the plan name them."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler

log = logging.getLogger(__name__)

OPTIMIZERS = ("adafactor", "adamw8bit", "adamw")
SCHEDULERS = ("cosine", "constant", "linear")


def make_optimizer(
    params: Iterable[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and the name of the one actually used (adamw8bit falls back to adamw without bitsandbytes).

    Adafactor runs with a fixed learning rate (`relative_step=False`, no parameter scaling, no warm-up init), as
    ai-toolkit configures it, so the schedule below is the only thing that moves the rate.
    """
    params = list(params)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(
            params, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False, warmup_init=False
        )
        return optimizer, name
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:  # CPU machines and the test suite
            log.warning("bitsandbytes is not installed: adamw8bit falls back to torch AdamW (more optimizer memory)")
        else:
            return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), name
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), name
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {name!r}")


def make_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, *, steps: int) -> LRScheduler:
    """`cosine` is CosineAnnealingLR over all steps with no warm-up (ai-toolkit's `cosine`, docs/facts.md#ai-toolkit);
    `linear` decays to zero at the last step; `constant` keeps the rate."""
    if name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
    if name == "constant":
        return LambdaLR(optimizer, lambda _: 1.0)
    if name == "linear":
        return LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / steps))
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, not {name!r}")
