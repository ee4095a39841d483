"""A tiny random FLUX.2 [klein] pipeline in the real diffusers layout, for tests and the CPU demo.

The real model cannot ship with tests (9B parameters, gated), and no Qwen tokenizer ships offline in any package
(docs/facts.md#klein-in-diffusers), so this builds every component in-process from a seed: the same classes, module
names and directory layout as `black-forest-labs/FLUX.2-klein-base-9B`, at widths that run a training step in a fraction
of a second on a CPU. `diffusers.Flux2KleinPipeline.from_pretrained(directory)` loads the result offline.

Shape notes (real 9B -> tiny):
- transformer: 8 double + 24 single blocks, 32 heads x 128 -> 2 double + 2 single blocks, 2 heads x 16; the block
  and linear names are unchanged, so LoRA targeting, `load_lora_weights` and key formats behave as on the real model.
- VAE: 4 down/up blocks (8x spatial compression) kept, 32 latent channels -> 4, so `in_channels` = 4 x 4 = 16.
- text encoder: Qwen3 36 layers x 4096 -> 3 layers x 32 with `head_dim` set explicitly (Qwen3 does not derive it).
  Klein stacks hidden states (9, 18, 27) of 36 layers; here `text_encoder_layers(3)` = (1, 2, 3), the same
  "quarter, half, three quarters" rule (see `arch.text_encoder_layers`), so `joint_attention_dim` = 3 x 32 = 96.
  Pass `text_encoder_out_layers=TINY_TEXT_ENCODER_LAYERS` when calling the pipeline. One difference: index 3 is
  the tiny encoder's last hidden state, which transformers returns after the final RMSNorm; the real (9, 18, 27)
  are all intermediate, un-normed layers. Harmless for random weights, but do not read meaning into it.
- `is_distilled=False` (Base: real CFG) and `guidance_embeds=False`, as for every Klein.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

# diffusers' classes from the modules that define them: its top-level names read, to a type checker, as the
# placeholders it exports when torch or transformers is missing.
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

# Qwen2/3's own pre-tokenisation, so the trained BPE splits text like the real tokenizer.
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from .arch import text_encoder_layers

TEXT_HIDDEN = 32
TEXT_LAYERS = 3
TINY_TEXT_ENCODER_LAYERS = text_encoder_layers(TEXT_LAYERS)
LATENT_CHANNELS = 4
TOKENIZER_VOCAB = 640

# Qwen's special tokens; the pipeline's chat template and padding use them.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Qwen3's chat template reduced to what Klein uses: user turns, the generation prompt, and the empty think block
# that `enable_thinking=False` adds (the pipeline passes it).
QWEN3_CHAT_TEMPLATE = (
    r"{%- for message in messages %}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    r"{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    r"{%- endif %}"
)

# Caption-like text so common caption words become single tokens; the content is otherwise irrelevant.
_CORPUS = (
    "A woman with flowing white hair stands beside a white horse in a grassy field.",
    "A man in a dark coat walks along a wet city street at night, holding an umbrella.",
    "Two children play with a red ball on a sandy beach near the sea.",
    "A small cactus with a happy face in the Sahara desert.",
    "A cat holding a sign that says hello world.",
    "An old lighthouse on a rocky cliff above the ocean under a cloudy sky.",
    "A bowl of fruit on a wooden kitchen table next to a window.",
    "A dog is dancing in a living room with a sofa and a lamp.",
    "A portrait of a young man wearing glasses and a blue shirt.",
    "A mountain lake surrounded by pine trees, with a canoe near the shore.",
    "A girl reading a book under a large oak tree in a park.",
    "A red car parked in front of a brick house with a green door.",
    "kleinstyle teststyle bd9style tokstyle",
    "user assistant system <think> </think> <|im_start|> <|im_end|>",
)


def write_tiny_klein(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random Klein pipeline to `directory` (created; must not hold a pipeline already); return it.

    The same seed gives byte-identical weights. The directory is assembled under a temporary name beside the
    target and renamed into place, so a crash never leaves a half-written model that later loads.
    """
    target = Path(directory)
    if (target / "model_index.json").exists():
        raise FileExistsError(f"{target} already holds a pipeline")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tiny_klein_pipeline(seed=seed).save_pretrained(staging, safe_serialization=True)
        if target.exists():
            target.rmdir()  # an empty directory the caller made; anything else raises here
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def tiny_klein_pipeline(*, seed: int = 0) -> Flux2KleinPipeline:
    """The tiny pipeline in memory (float32, CPU), built without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_qwen_tokenizer()
        torch.manual_seed(seed)
        text_encoder = _text_encoder(vocab_size=len(tokenizer))
        torch.manual_seed(seed + 1)
        transformer = _transformer()
        torch.manual_seed(seed + 2)
        vae = _vae()
    scheduler = klein_scheduler()
    return Flux2KleinPipeline(
        # diffusers annotates this with its top-level name, which reads as the placeholder class (see the imports).
        scheduler=scheduler,  # type: ignore[arg-type]
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE trained in-process with Qwen's pre-tokeniser, special tokens and (reduced) chat template."""
    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in state["merges"]]
    # transformers annotates merges as strings; it takes (left, right) pairs too, as tokenizer.json stores them now.
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, chat_template=QWEN3_CHAT_TEMPLATE)  # type: ignore[arg-type]
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def _text_encoder(*, vocab_size: int) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config)
    model.eval()
    return model


# The tiny transformer's diffusers config (benchmarks build it directly, as they build KLEIN_9B_TRANSFORMER).
TINY_TRANSFORMER: dict[str, object] = {
    "patch_size": 1,
    "in_channels": LATENT_CHANNELS * 4,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": len(TINY_TEXT_ENCODER_LAYERS) * TEXT_HIDDEN,
    "timestep_guidance_channels": 32,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (4, 4, 4, 4),
    "guidance_embeds": False,
}


def _transformer() -> Flux2Transformer2DModel:
    transformer: Flux2Transformer2DModel = Flux2Transformer2DModel(**TINY_TRANSFORMER)
    return transformer


def _vae() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
    )
    # A fresh BatchNorm has mean 0 / var 1; give it the non-trivial running statistics a trained VAE has so the
    # latent normalisation (docs/facts.md: latents are normalised by `vae.bn` running stats) is actually exercised.
    channels = vae.bn.num_features
    generator = torch.Generator().manual_seed(channels)
    vae.bn.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    tiny: AutoencoderKLFlux2 = vae.eval()
    return tiny


def klein_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Klein's scheduler: flow matching with resolution-dependent shift (the pipeline passes `mu`).
    scheduler: FlowMatchEulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return scheduler
