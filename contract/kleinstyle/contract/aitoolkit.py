"""The ai-toolkit job config for a TrainingPlan: exactly what `python run.py CONFIG` receives.

Keys are the ones ai-toolkit reads at the pinned commit (docs/facts.md#ai-toolkit): `job: extension`, one `sd_trainer`
process with network/save/datasets/train/model sections. For klein, ai-toolkit trains peft-format LoRAs and ignores
`linear_alpha` (alpha = rank) and conv settings (klein has no conv layers), so neither is varied here. Block filters use
BFL names with a trailing dot: "single_blocks.1" alone would also match 10-19.

The training options (docs/training-options.md) go where ai-toolkit reads them: `train.content_or_style`,
`train.noise_offset`, `train.ema_config` (`use_ema`, `ema_decay`), `train.gradient_checkpointing` and the dataset's
`flip_x`. Each is written only when the plan departs from ai-toolkit's own default (balanced, 0.0, no EMA, no flip),
which is also the plan's, so the config of a plan without them is the one written before they existed.
"""

from __future__ import annotations

from typing import Any

from .plan import TrainingPlan

ARCH = {"klein-base-9b": "flux2_klein_9b", "klein-base-4b": "flux2_klein_4b"}
HUB_MODEL = {
    "klein-base-9b": "black-forest-labs/FLUX.2-klein-base-9B",
    "klein-base-4b": "black-forest-labs/FLUX.2-klein-base-4B",
}


def aitoolkit_config(
    plan: TrainingPlan,
    *,
    name: str,
    dataset_dir: str,
    training_folder: str,
    trigger_word: str,
    model: str = "klein-base-9b",
    model_path: str | None = None,
) -> dict[str, Any]:
    """The config dict; `training_folder` must be on a volume and `name` stable, so ai-toolkit resumes by itself."""
    v = plan.values()
    network: dict[str, Any] = {"type": "lora", "linear": v["rank"], "linear_alpha": v["rank"]}
    if v["target_blocks"] != "all":
        network["network_kwargs"] = {"only_if_contains": [f"{block}." for block in plan.blocks]}
    dataset: dict[str, Any] = {
        "folder_path": dataset_dir,
        "caption_ext": "txt",
        "caption_dropout_rate": v["caption_dropout"],
        "resolution": [v["resolution"]],
        "cache_latents_to_disk": True,
    }
    if v["flip_horizontal"]:
        dataset["flip_x"] = True  # every image and its mirror (ai-toolkit appends a flipped copy of each)
    train: dict[str, Any] = {
        "batch_size": 1,
        "steps": v["steps"],
        "lr": v["learning_rate"],
        "optimizer": v["optimizer"],
        "optimizer_params": {"weight_decay": v["weight_decay"]},
        "lr_scheduler": v["scheduler"],
        "noise_scheduler": v["noise_scheduler"],
        # ai-toolkit's own default (on) unless the plan says otherwise.
        "gradient_checkpointing": True if v["gradient_checkpointing"] is None else bool(v["gradient_checkpointing"]),
        "dtype": "bf16",
    }
    if v["timestep_bias"] != "balanced":
        train["content_or_style"] = v["timestep_bias"]
    if v["noise_offset"]:
        train["noise_offset"] = float(v["noise_offset"])
    if v["ema_decay"] is not None:
        train["ema_config"] = {"use_ema": True, "ema_decay": float(v["ema_decay"])}
    return {
        "job": "extension",
        "config": {
            "name": name,
            "process": [
                {
                    "type": "sd_trainer",
                    "training_folder": training_folder,
                    "device": "cuda:0",
                    "trigger_word": trigger_word,
                    "network": network,
                    "save": {
                        "dtype": "bf16",
                        "save_every": v["checkpoint_every"],
                        # Keep every checkpoint: early stopping may pick any of them as the best.
                        "max_step_saves_to_keep": len(plan.checkpoint_steps) + 1,
                    },
                    "datasets": [dataset],
                    "train": train,
                    "model": {
                        "name_or_path": model_path or HUB_MODEL[model],
                        "arch": ARCH[model],
                        "quantize": bool(plan.fp8_base.value),
                        "low_vram": False,
                    },
                }
            ],
        },
        "meta": {"name": name, "version": "1.0", "kleinstyle_plan": plan.plan_hash()},
    }
