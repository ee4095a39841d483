"""The builtin LoRA trainer for FLUX.2 [klein] on diffusers + peft + torch (the `builtin` backend).

It follows the same plan semantics as the ai-toolkit backend (rank/alpha, target blocks, adafactor or 8-bit AdamW,
cosine schedule, caption dropout of the whole caption, flow matching, the Qwen3 layers Klein reads) and adds what
a shared, preemptible cluster needs: every checkpoint is atomic and resumable (optimizer, scheduler and RNG state
included), a stop request or SIGTERM saves a checkpoint and returns, and a restarted run ends with the same weights
as an uninterrupted one.

Order of work: read the dataset; if a complete checkpoint exists, check it belongs to these settings and data;
encode every caption and image once (then free the text encoder and VAE); load the transformer and add the LoRA;
restore the checkpoint; train; publish checkpoints and, at the end, `{output_dir}/lora.safetensors`.

Flow matching as in diffusers' Flux2 training: x_t = (1 - s) x_0 + s n, the transformer sees x_t packed to
tokens with the pipeline's position ids and `timestep = s`, and regresses the velocity n - x_0 (the direction
diffusers' FlowMatchEulerDiscreteScheduler steps against: x_{s'} = x_s + (s' - s) v; test_velocity_sign pins it).
`s` is drawn per sample, sigmoid of a standard normal ("sigmoid", ai-toolkit's default for flux) or uniform, and
biased as ai-toolkit's `content_or_style` biases it (`sample_sigmas`).

The options ai-toolkit users reach for (docs/training-options.md), each as ai-toolkit 27a03a91 does it: timestep
bias, noise offset (`draw_noise`), horizontal flip (every reference and its mirror image), gradient checkpointing,
and an EMA of the LoRA weights, which the checkpoints and the published LoRA hold while the optimizer trains the raw
weights; a checkpoint saves both, so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

# diffusers' classes from the modules that define them: its top-level names read, to a type checker, as the
# placeholders it exports when torch or transformers is missing.
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from . import checkpoints as ckpt
from .arch import select_lora_targets
from .batches import BatchPlan, seeded_generator
from .dataset import Sample, held_out, read_dataset, with_mirror_images
from .encode import EncodedDataset, check_model_dir, encode_dataset
from .lora_format import COMPONENT_PREFIX, FORMAT_NAME, to_artifact_state_dict
from .optim import OPTIMIZERS, SCHEDULERS, make_lr_scheduler, make_optimizer

log = logging.getLogger(__name__)

FINAL_LORA = "lora.safetensors"
CHECKPOINT_FORMAT = "kleinstyle-klein-checkpoint-v1"
# Settings that change neither the arithmetic nor the draws: a resumed run may differ in these.
# base_lora is a path (scratch differs per pod): its content is compared through base_lora_digest instead.
_RESUME_NEUTRAL = frozenset(
    {"checkpoint_every", "checkpoint_steps", "gradient_checkpointing", "compile_blocks", "base_lora"}
)
# The projections of a double block that ai-toolkit's BFL model fuses into one qkv linear, per stream.
QKV_GROUPS = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIMESTEP_BIASES = ("balanced", "style", "content")
TRAIN_TIMESTEPS = 1000  # ai-toolkit's num_train_timesteps: the grid content_or_style indexes


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run. Defaults are the write-up's rank-32 recipe (docs/policy.md).

    `target`: "all", "single", "double", or diffusers module-name prefixes ("single_transformer_blocks.3.").
    `alpha`: None means alpha = rank (scale 1, ai-toolkit's behaviour for Klein).
    `text_encoder_layers`: None means Klein's rule for the encoder's depth ((9, 18, 27) on the real models).
    `bucket_multiple`: bucket sides are multiples of this; it must be a multiple of 16 (VAE 8x, 2x2 patches).
    `save_dtype`: dtype of published LoRA files; training state is always float32.
    """

    rank: int = 32
    alpha: float | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    optimizer: Literal["adafactor", "adamw8bit", "adamw"] = "adafactor"
    steps: int = 1000
    scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    caption_dropout: float = 0.05
    resolution: int = 1024
    target: str | tuple[str, ...] = "all"
    checkpoint_every: int = 250
    # More steps to checkpoint (and evaluate) besides every `checkpoint_every` and the last: the plan's cosine
    # midpoint, which the document says to check explicitly.
    checkpoint_steps: tuple[int, ...] = ()
    seed: int = 0
    gradient_checkpointing: bool = False
    # torch.compile each transformer block on CUDA (bench/train_step.py: 0.551 -> 0.385 s/step for klein 9B on an
    # H200); ignored on the CPU, where compiling costs more than the few steps of a test gain.
    compile_blocks: bool = False
    batch_size: int = 1
    timestep_sampling: Literal["sigmoid", "uniform"] = "sigmoid"
    max_grad_norm: float | None = 1.0
    max_sequence_length: int = 512
    text_encoder_layers: tuple[int, ...] | None = None
    bucket_multiple: int = 32
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # Two-step (ConsisLoRA) mode: a LoRA file (artifact format) merged into the frozen base before training, so
    # this LoRA learns the residual; and a trigger word stripped from the start of every caption (content stage).
    base_lora: str | None = None
    base_lora_digest: str | None = None  # sha256 of base_lora's file: a resumed run must merge the very same LoRA
    strip_trigger: str | None = None
    # Frozen base linears in float8 (klein/fp8.py): less memory and fp8 matmuls on Hopper; the LoRA stays float32.
    fp8_base: bool = False
    # One lora_A shared by q, k and v of each double-block attention (and by add_q/k/v): one rank-r LoRA per fused
    # qkv projection, as ai-toolkit trains klein, so a rank means the same capacity on both backends.
    shared_qkv: bool = True
    # References left out of training for the held-out validation loss (dataset.held_out picks them).
    validation_images: int = 0
    # ai-toolkit's content_or_style: balanced, style (favours low noise) or content (favours high noise).
    timestep_bias: Literal["balanced", "style", "content"] = "balanced"
    # ai-toolkit's noise_offset: noise + offset * N(0, 1) per sample and latent channel (0: none).
    noise_offset: float = 0.0
    # ai-toolkit's flip_x: train on every reference and on its mirror image (an epoch twice as long).
    flip_horizontal: bool = False
    # ai-toolkit's ema_config: an EMA of the LoRA weights with this decay, which checkpoints and the LoRA hold.
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, str):
            object.__setattr__(self, "target", tuple(self.target))
        object.__setattr__(self, "checkpoint_steps", tuple(sorted(set(self.checkpoint_steps))))
        if self.text_encoder_layers is not None:
            object.__setattr__(self, "text_encoder_layers", tuple(self.text_encoder_layers))
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be at least 1, not {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            problems.append(f"alpha must be positive, not {self.alpha}")
        if self.steps < 1:
            problems.append(f"steps must be at least 1, not {self.steps}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be at least 1, not {self.checkpoint_every}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            problems.append(f"caption_dropout must be within [0, 1], not {self.caption_dropout}")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be positive, not {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {SCHEDULERS}, not {self.scheduler!r}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, not {self.batch_size}")
        if self.bucket_multiple < 16 or self.bucket_multiple % 16:
            problems.append(f"bucket_multiple must be a multiple of 16, not {self.bucket_multiple}")
        elif self.resolution < self.bucket_multiple or self.resolution % self.bucket_multiple:
            problems.append(f"resolution must be a multiple of {self.bucket_multiple}, not {self.resolution}")
        if self.timestep_bias not in TIMESTEP_BIASES:
            problems.append(f"timestep_bias must be one of {TIMESTEP_BIASES}, not {self.timestep_bias!r}")
        if not 0.0 <= self.noise_offset <= 1.0:
            problems.append(f"noise_offset must be within [0, 1], not {self.noise_offset}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            problems.append(f"ema_decay must be between 0 and 1 (exclusive), not {self.ema_decay}")
        if self.save_dtype not in _DTYPES:
            problems.append(f"save_dtype must be one of {tuple(_DTYPES)}, not {self.save_dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def is_checkpoint(self, step: int) -> bool:
        """Whether `step` is a planned checkpoint: every `checkpoint_every`, the extra steps, and the last."""
        return step % self.checkpoint_every == 0 or step == self.steps or step in self.checkpoint_steps

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("target", "text_encoder_layers", "checkpoint_steps"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data


@dataclass
class TrainResult:
    """What a call did. `losses` covers the whole run, resumed steps included (index i = step i + 1)."""

    steps_done: int
    total_steps: int
    final_loss: float | None
    losses: list[float]
    checkpoints: list[Path]
    stopped_early: bool
    lora_path: Path | None  # None when stopped early: the run is not finished, its checkpoints are
    resumed_from: int | None = None
    optimizer: str = ""


@dataclass(frozen=True)
class StepInfo:
    """Progress after one step, for status reports (seconds: wall time of this step)."""

    step: int
    total: int
    loss: float
    lr: float
    seconds: float


class ResumeError(ValueError):
    """The output folder holds checkpoints of a different run (other settings or other data)."""


CheckpointCallback = Callable[[int, Path, float], None]


def train_lora(
    model_dir: str | Path,
    dataset_dir: str | Path,
    output_dir: str | Path,
    cfg: TrainSettings,
    *,
    on_checkpoint: CheckpointCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    handle_sigterm: bool = False,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train (or resume training) a Klein LoRA; see the module docstring for the whole contract.

    `should_stop` is polled before every step; when it returns True (or, with `handle_sigterm`, after SIGTERM)
    the trainer saves a checkpoint of the work done and returns with `stopped_early`. `on_checkpoint(step, path,
    loss)` runs after each checkpoint is published. `handle_sigterm` installs a SIGTERM handler for the duration
    of the call; only the main thread can do that, so set it only where the trainer runs as the process's work.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    check_model_dir(model_dir)
    lora_targets(model_dir, cfg.target)  # a bad target fails now, not after minutes of encoding
    samples, _ = held_out(read_dataset(dataset_dir), cfg.validation_images)
    if cfg.strip_trigger:
        from ..text.captions import without_trigger

        samples = [dataclasses.replace(s, caption=without_trigger(s.caption, cfg.strip_trigger)) for s in samples]
    fingerprint = dataset_fingerprint(samples)
    references = len(samples)
    if cfg.flip_horizontal:
        samples = with_mirror_images(samples)
    ckpt.remove_staging(output)

    resume_from = ckpt.latest_checkpoint(output)
    state = None
    if resume_from is not None:
        _check_resumable(ckpt.read_metadata(resume_from), cfg, fingerprint)
        state = ckpt.read_training_state(resume_from)
        if state["step"] >= cfg.steps:
            return _already_done(output, cfg, state, resume_from)

    run_device = torch.device(device) if device else default_device()
    dtype = compute_dtype(run_device)
    with _stop_signal(should_stop, handle_sigterm) as stop:
        encoded = encode_dataset(
            model_dir,
            samples,
            resolution=cfg.resolution,
            bucket_multiple=cfg.bucket_multiple,
            max_sequence_length=cfg.max_sequence_length,
            layers=cfg.text_encoder_layers,
            device=run_device,
            dtype=dtype,
        )
        trainer = _Trainer(model_dir, cfg, encoded, run_device, dtype)
        if state is not None:
            trainer.restore(state)
            log.info("resuming from %s (step %d of %d)", resume_from, trainer.step, cfg.steps)
        run = _Run(trainer, output, cfg, fingerprint, references, on_checkpoint)
        return run.loop(stop, on_step, resumed_from=state["step"] if state else None)


@torch.no_grad()
def merge_lora(transformer: torch.nn.Module, lora_file: str | Path) -> int:
    """Add a LoRA file's updates (artifact format: alpha baked into lora_B, so the update is B @ A) into the
    transformer's weights in place; returns the number of layers changed. Keys that name no layer are an error."""
    from safetensors.torch import load_file

    state = load_file(str(lora_file))
    modules = dict(transformer.named_modules())
    merged = 0
    for key, down in state.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix(COMPONENT_PREFIX).split(".lora_A.")[0]
        up = state.get(key.replace(".lora_A.", ".lora_B."))
        module = modules.get(name)
        if up is None or not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{lora_file}: {key} names no linear layer of this transformer (or lacks its lora_B)")
        weight = module.weight
        weight += (up.float() @ down.float()).to(weight.dtype)
        merged += 1
    return merged


def add_lora(transformer: Flux2Transformer2DModel, cfg: TrainSettings) -> list[str]:
    """Add the run's LoRA to `transformer` and return the adapted module names. lora_A is Kaiming-uniform (std
    1/sqrt(3 fan_in)) and lora_B zero, as peft's default and ai-toolkit initialise them, so the update per step at a
    given learning rate and rank is the one the plan's steps were tuned with; seeded by the run's seed."""
    targets = select_lora_targets(transformer, cfg.target)
    with torch.random.fork_rng(devices=[]):
        # peft draws the lora_A initialisation from the global generator; seed it for this run only.
        torch.manual_seed(seeded_generator(cfg.seed, "lora-init").initial_seed())
        transformer.add_adapter(
            LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft annotates an int; any float scales
                lora_dropout=0.0,
                init_lora_weights=True,
                target_modules=targets,
            )
        )
    if cfg.shared_qkv:
        log.info("q/k/v share lora_A in %d projection groups", share_qkv_down(transformer))
    return targets


def share_qkv_down(transformer: torch.nn.Module) -> int:
    """Tie the lora_A of q, k and v (and of add_q/k/v) in every double block to q's: the three projections then
    learn one rank-r LoRA of their fused qkv, [B_q; B_k; B_v] @ A, which is what ai-toolkit trains on klein's fused
    qkv linear. Returns the number of groups tied (groups whose projections are not all adapted stay as they are)."""
    tied = 0
    for block in getattr(transformer, "transformer_blocks", []):
        for group in QKV_GROUPS:
            layers = [getattr(block.attn, name, None) for name in group]
            downs = [down for layer in layers if (down := _lora_down(layer)) is not None]
            if len(downs) == len(layers):
                for down in downs[1:]:
                    down.weight = downs[0].weight
                tied += 1
    return tied


def _lora_down(layer: torch.nn.Module | None) -> torch.nn.Module | None:
    adapters = getattr(layer, "lora_A", None)
    return adapters["default"] if adapters is not None and "default" in adapters else None


def lora_targets(model_dir: str | Path, target: str | Sequence[str]) -> list[str]:
    """The module names `target` selects in the model's transformer, resolved on the meta device (no weights
    are read, so this is instant even for 9B)."""
    config = Flux2Transformer2DModel.load_config(Path(model_dir), subfolder="transformer")
    with torch.device("meta"):
        skeleton = Flux2Transformer2DModel.from_config(config)
    return select_lora_targets(skeleton, target)


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    """A hash of file names, sizes and captions: a resumed run must train on the data its checkpoint saw."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.image.name}\0{sample.image.stat().st_size}\0{sample.caption}\n".encode())
    return digest.hexdigest()[:16]


class _Trainer:
    """The transformer with its LoRA, the optimizer and the schedule: the part of a run that has state."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: TrainSettings,
        encoded: EncodedDataset,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.cfg = cfg
        self.encoded = encoded
        self.device = device
        self.step = 0
        self.last_lr = cfg.learning_rate  # the rate the latest step used (the scheduler has moved on since)
        self.losses: list[float] = []
        transformer = Flux2Transformer2DModel.from_pretrained(Path(model_dir), subfolder="transformer", dtype=dtype)
        transformer.requires_grad_(False)
        if cfg.base_lora:
            log.info("merged %d layers of %s into the base", merge_lora(transformer, cfg.base_lora), cfg.base_lora)
        self.targets = add_lora(transformer, cfg)
        self.params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        for param in self.params.values():
            param.data = param.data.float()  # trainable weights stay float32 under bf16 autocast
        if cfg.fp8_base:
            from .fp8 import base_layers_to_fp8

            log.info("fp8 base weights: %d linears", base_layers_to_fp8(transformer))
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.transformer = transformer.to(device).train()
        # The EMA starts from the initial LoRA (lora_B zero), as ai-toolkit's ExponentialMovingAverage does.
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if cfg.ema_decay is not None else None
        if cfg.compile_blocks and torch.device(device).type == "cuda":
            for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
                block.compile()  # regional: the 32 blocks share two compiled graphs
        self.optimizer, self.optimizer_name = make_optimizer(
            self.params.values(), cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.lr_scheduler = make_lr_scheduler(self.optimizer, cfg.scheduler, steps=cfg.steps)
        self.batches = BatchPlan(encoded.buckets, cfg.batch_size, cfg.seed)

    # --- one step ------------------------------------------------------------------------------------------

    def train_step(self) -> float:
        """Run step `self.step + 1` and return its loss."""
        generator = seeded_generator(self.cfg.seed, "step", self.step)
        indices = self.batches.batch(self.step)
        dropped = (torch.rand(len(indices), generator=generator) < self.cfg.caption_dropout).tolist()
        latents = torch.cat([self.encoded.latents[i] for i in indices]).to(self.device, torch.float32)
        embeds = torch.cat([self.encoded.caption_for(i, d) for i, d in zip(indices, dropped, strict=True)])
        noise = draw_noise(latents.shape, generator, self.cfg.noise_offset).to(self.device)
        sigmas = sample_sigmas(
            len(indices), generator, sampling=self.cfg.timestep_sampling, bias=self.cfg.timestep_bias
        ).to(self.device)

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = flow_matching_loss(self.transformer, latents, embeds.to(self.device), noise, sigmas)
        loss.backward()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self._update_ema()
        self.last_lr = self.lr
        self.lr_scheduler.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    @torch.no_grad()
    def _update_ema(self) -> None:
        """shadow -= (1 - decay) (shadow - weight), after every optimizer step: ai-toolkit's update (toolkit/ema.py,
        constant decay, no feedback, no parameter multiplier)."""
        if self.ema is None or self.cfg.ema_decay is None:
            return
        for name, param in self.params.items():
            shadow = self.ema[name]
            shadow.sub_((shadow - param.detach()).mul_(1.0 - self.cfg.ema_decay))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- state ---------------------------------------------------------------------------------------------

    def artifact_lora(self) -> dict[str, torch.Tensor]:
        """The published LoRA: the EMA weights when the run keeps an EMA (ai-toolkit saves those too), else the
        trained ones."""
        state = None
        if self.ema is not None:
            # By parameter identity, so q, k and v's shared lora_A all read the EMA of the one tensor.
            ema = {id(p): self.ema[n] for n, p in self.params.items()}
            full = self.transformer.state_dict(keep_vars=True)
            state = {key: ema.get(id(value), value.detach()) for key, value in full.items()}
        peft_state = get_peft_model_state_dict(self.transformer, state_dict=state)
        return to_artifact_state_dict(
            peft_state, rank=self.cfg.rank, alpha=self.cfg.lora_alpha, dtype=_DTYPES[self.cfg.save_dtype]
        )

    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "adapter": {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "losses": list(self.losses),
            "rng": rng,
            **({} if self.ema is None else {"ema": {n: t.detach().to("cpu", copy=True) for n, t in self.ema.items()}}),
        }

    def restore(self, state: dict[str, Any]) -> None:
        adapter = state["adapter"]
        if set(adapter) != set(self.params):
            raise ResumeError("checkpoint LoRA layers differ from this run's targets")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(adapter[name])
            if self.ema is not None:
                if set(state.get("ema") or {}) != set(self.params):
                    raise ResumeError("checkpoint has no EMA of this run's LoRA layers")
                for name, shadow in self.ema.items():
                    shadow.copy_(state["ema"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.losses = [float(v) for v in state["losses"]]
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def flow_matching_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """MSE between the transformer's velocity and noise - latents at noise level `sigmas` (per sample).

    `latents` are the pipeline's normalised, patchified latents (B, C, H, W); tokens and position ids are built
    with the pipeline's own helpers so training and generation agree on the layout.
    """
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    model_dtype = next(transformer.parameters()).dtype
    prediction = transformer(
        hidden_states=Flux2KleinPipeline._pack_latents(noisy).to(model_dtype),
        encoder_hidden_states=embeds.to(model_dtype),
        timestep=sigmas.to(model_dtype),
        img_ids=Flux2KleinPipeline._prepare_latent_ids(latents).to(latents.device),
        txt_ids=Flux2KleinPipeline._prepare_text_ids(embeds).to(latents.device),
        guidance=None,
        return_dict=False,
    )[0]
    target = Flux2KleinPipeline._pack_latents(noise - latents)  # the velocity: the scheduler steps x by -ds * v
    return F.mse_loss(prediction.float(), target.float())


def sample_sigmas(
    count: int,
    generator: torch.Generator,
    *,
    sampling: Literal["sigmoid", "uniform"] = "sigmoid",
    bias: Literal["balanced", "style", "content"] = "balanced",
) -> torch.Tensor:
    """`count` noise levels in (0, 1) for one step, as ai-toolkit draws them for a flowmatch model
    (jobs/process/BaseSDTrainProcess.py, toolkit/samplers/custom_flowmatch_sampler.py at 27a03a91).

    ai-toolkit sets a grid of 1000 timesteps per step, descending (timestep_type sigmoid: 1000 (1 - sigmoid(z)) for
    1000 fresh standard normals z, sorted; uniform, its `linear`: 1000 down to 1), and picks an index into it:
    `balanced` uniformly; `content` floor(1000 u^3) (near 0: the top of the grid, high noise: composition);
    `style` floor(1000 (1 - u^3)) (near 999: low noise: detail and texture; its UI names it "Low Noise"); the
    noise level is the timestep / 1000. `balanced` draws s directly from the grid's distribution (sigmoid of a normal,
    or uniform), as this trainer always has; the marginal distribution is ai-toolkit's, the draws are unchanged.
    """
    if bias == "balanced":
        if sampling == "uniform":
            return torch.rand(count, generator=generator)
        return torch.sigmoid(torch.randn(count, generator=generator))
    if bias not in TIMESTEP_BIASES:
        raise ValueError(f"timestep bias must be one of {TIMESTEP_BIASES}, not {bias!r}")
    if sampling == "uniform":
        timesteps = torch.linspace(TRAIN_TIMESTEPS, 1, TRAIN_TIMESTEPS)
    else:
        t = torch.sigmoid(torch.randn(TRAIN_TIMESTEPS, generator=generator))
        timesteps = torch.sort((1 - t) * TRAIN_TIMESTEPS, descending=True).values
    u = torch.rand(count, generator=generator)
    cubic = u**3 if bias == "content" else 1 - u**3
    indices = (cubic * TRAIN_TIMESTEPS).long().clamp(0, TRAIN_TIMESTEPS - 1)
    return timesteps[indices] / TRAIN_TIMESTEPS


def draw_noise(shape: Sequence[int], generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Standard normal noise of `shape` (batch, channels, h, w), plus ai-toolkit's noise offset
    (toolkit/train_tools.py apply_noise_offset): offset * N(0, 1) per sample and channel, the same over the image,
    so the model learns to shift the mean brightness and colour. Offsets under 1e-6 are none, as there."""
    noise = torch.randn(tuple(shape), generator=generator)
    if abs(offset) >= 1e-6:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


class _Run:
    """The loop around a `_Trainer`: checkpoints, stop requests, the final LoRA."""

    def __init__(
        self,
        trainer: _Trainer,
        output: Path,
        cfg: TrainSettings,
        fingerprint: str,
        images: int,
        on_checkpoint: CheckpointCallback | None,
    ) -> None:
        self.trainer = trainer
        self.output = output
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.images = images
        self.on_checkpoint = on_checkpoint
        self.saved: list[Path] = []
        self.last_saved = trainer.step

    def loop(
        self, stop: Callable[[], bool], on_step: Callable[[StepInfo], None] | None, *, resumed_from: int | None
    ) -> TrainResult:
        trainer, cfg = self.trainer, self.cfg
        while trainer.step < cfg.steps:
            if stop():
                log.info("stop requested at step %d of %d", trainer.step, cfg.steps)
                if trainer.step > self.last_saved:
                    self._checkpoint()
                return self._result(stopped=True, resumed_from=resumed_from)
            started = time.perf_counter()
            loss = trainer.train_step()
            if on_step is not None:
                on_step(StepInfo(trainer.step, cfg.steps, loss, trainer.last_lr, time.perf_counter() - started))
            if cfg.is_checkpoint(trainer.step):
                self._checkpoint()
        # The last step always checkpoints, so the final LoRA is a copy of that checkpoint's.
        final = ckpt.checkpoint_path(self.output, cfg.steps)
        lora = ckpt.publish_copy(final / ckpt.LORA_FILE, self.output / FINAL_LORA)
        return self._result(stopped=False, resumed_from=resumed_from, lora=lora)

    def _checkpoint(self) -> Path:
        trainer = self.trainer
        step = trainer.step
        since = trainer.losses[self.last_saved :] or trainer.losses[-1:]
        loss = trainer.losses[-1]
        header = {
            "kleinstyle.format": FORMAT_NAME,
            "kleinstyle.rank": str(self.cfg.rank),
            "kleinstyle.alpha_baked": str(self.cfg.lora_alpha),
            "kleinstyle.step": str(step),
            "kleinstyle.base": "flux2-klein",
        }
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "total_steps": self.cfg.steps,
            "loss": loss,
            "loss_avg": sum(since) / len(since),
            "lr": trainer.last_lr,
            "settings": self.cfg.as_dict(),
            "optimizer": trainer.optimizer_name,
            "lora": {
                "file": ckpt.LORA_FILE,
                "format": FORMAT_NAME,
                "rank": self.cfg.rank,
                "alpha_baked": self.cfg.lora_alpha,
                "target_modules": trainer.targets,
            },
            "text_encoder_layers": list(trainer.encoded.text_layers),
            "dataset": {
                "images": self.images,
                "fingerprint": self.fingerprint,
                "buckets": {f"{w}x{h}": len(m) for (w, h), m in sorted(trainer.encoded.buckets.items())},
            },
            "versions": ckpt.library_versions(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        path = ckpt.write_checkpoint(
            self.output,
            step,
            lora=trainer.artifact_lora(),
            lora_header=header,
            training_state=trainer.state_dict(),
            metadata=metadata,
        )
        self.saved.append(path)
        self.last_saved = step
        log.info("checkpoint step %d/%d loss %.4g -> %s", step, self.cfg.steps, loss, path)
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, path, loss)
        return path

    def _result(self, *, stopped: bool, resumed_from: int | None, lora: Path | None = None) -> TrainResult:
        losses = self.trainer.losses
        return TrainResult(
            steps_done=self.trainer.step,
            total_steps=self.cfg.steps,
            final_loss=losses[-1] if losses else None,
            losses=list(losses),
            checkpoints=ckpt.list_checkpoints(self.output),
            stopped_early=stopped,
            lora_path=lora,
            resumed_from=resumed_from,
            optimizer=self.trainer.optimizer_name,
        )


def _check_resumable(metadata: dict[str, Any], cfg: TrainSettings, fingerprint: str) -> None:
    # A checkpoint written before a setting existed trained with that setting's default.
    settings = {**TrainSettings().as_dict(), **metadata.get("settings", {})}
    saved = {k: v for k, v in settings.items() if k not in _RESUME_NEUTRAL}
    wanted = {k: v for k, v in cfg.as_dict().items() if k not in _RESUME_NEUTRAL}
    changed = sorted(k for k in wanted.keys() | saved.keys() if saved.get(k) != wanted.get(k))
    if changed:
        raise ResumeError(
            f"the output folder holds checkpoints of a run with other settings ({', '.join(changed)}); "
            "use a new output folder or the original settings"
        )
    if metadata.get("dataset", {}).get("fingerprint") != fingerprint:
        raise ResumeError("the output folder holds checkpoints of a run on other data; use a new output folder")


def _already_done(output: Path, cfg: TrainSettings, state: dict[str, Any], latest: Path) -> TrainResult:
    """A restart after the last checkpoint was written (e.g. killed while publishing the final LoRA)."""
    lora = ckpt.publish_copy(latest / ckpt.LORA_FILE, output / FINAL_LORA)
    losses = [float(v) for v in state["losses"]]
    return TrainResult(
        steps_done=int(state["step"]),
        total_steps=cfg.steps,
        final_loss=losses[-1] if losses else None,
        losses=losses,
        checkpoints=ckpt.list_checkpoints(output),
        stopped_early=False,
        lora_path=lora,
        resumed_from=int(state["step"]),
        optimizer=str(ckpt.read_metadata(latest).get("optimizer", "")),
    )


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (klein's own precision); float32 on the CPU, where bf16 matmuls are slow and imprecise."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def _stop_signal(should_stop: Callable[[], bool] | None, handle_sigterm: bool) -> Iterator[Callable[[], bool]]:
    """A stop predicate combining the caller's and, optionally, SIGTERM (restoring the old handler on exit)."""
    flag = threading.Event()
    previous = None
    install = handle_sigterm and threading.current_thread() is threading.main_thread()
    if handle_sigterm and not install:
        log.warning("SIGTERM handling needs the main thread; the trainer runs without it")
    if install:

        def on_sigterm(signum: int, frame: object) -> None:
            log.warning("SIGTERM: saving a checkpoint and stopping")
            flag.set()

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield lambda: flag.is_set() or bool(should_stop and should_stop())
    finally:
        if install:
            signal.signal(signal.SIGTERM, previous)
