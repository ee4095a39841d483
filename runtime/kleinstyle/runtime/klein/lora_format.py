"""The one LoRA file format kleinstyle publishes for FLUX.2 [klein] (both backends write it).

Format `klein-diffusers-v1`:
- a safetensors file whose keys are diffusers/peft names with the pipeline-component prefix:
  `transformer.<diffusers module name>.lora_A.weight` (rank x in) and `...lora_B.weight` (out x rank), for example
  `transformer.single_transformer_blocks.3.attn.to_qkv_mlp_proj.lora_A.weight`;
- the training scale alpha / rank is **baked into lora_B**, so the update is exactly `B @ A` (alpha = rank,
  scale 1.0). That is the convention ai-toolkit's Klein LoRAs already follow (docs/facts.md#ai-toolkit: it ignores
  `linear_alpha`), and the one every loader assumes when a file carries no alpha: diffusers'
  `Flux2KleinPipeline.load_lora_weights` infers rank from the shapes and sets alpha = rank. No `.alpha` keys.
- ComfyUI loads it as is (read, not run: ComfyUI v0.19.3, commit 3086026): its Flux branch of
  `model_lora_keys_unet` (Flux2 subclasses Flux) maps `transformer.<diffusers name>` through
  `comfy.utils.flux_to_diffusers`, split to_q/to_k/to_v onto the fused qkv weight by offsets and
  `attn.to_qkv_mlp_proj` onto the single blocks' `linear1`; a missing alpha means scale 1.0.
- string metadata in the safetensors header: `format=pt` plus `kleinstyle.*` keys (format name, rank, the alpha
  that was baked in, step, base architecture) for humans and the artifact store; loaders ignore them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fusion reads the names below without torch; only the conversion needs it
    import torch

FORMAT_NAME = "klein-diffusers-v1"
COMPONENT_PREFIX = "transformer."


def to_artifact_state_dict(
    peft_state: Mapping[str, torch.Tensor], *, rank: int, alpha: float, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Turn peft's adapter state dict (keys without adapter name, as `get_peft_model_state_dict` returns) into
    the published key set: prefix the component and fold alpha / rank into lora_B (float32 unless `dtype`)."""
    import torch

    dtype = dtype or torch.float32
    scale = alpha / rank
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ValueError(f"unexpected key in a LoRA state dict: {key}")
        value = tensor.detach().to("cpu", torch.float32)
        if ".lora_B." in key and scale != 1.0:
            value = value * scale
        # A copy of its own: lora_A shared by q, k and v (lora_train.share_qkv_down) is one tensor under three keys.
        out[COMPONENT_PREFIX + key] = value.to(dtype).clone(memory_format=torch.contiguous_format)
    return out
