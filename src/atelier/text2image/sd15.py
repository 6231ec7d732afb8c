"""The Stable Diffusion 1.5 architecture at full size with random weights (``model_id=sd15_random``).

For memory and speed checks only (``scripts/bench_sd_lora.py``): the components have the published SD 1.5 shapes
and counts, but their weights are random, so **its images are noise and never a result**. Like the tiny model it is
labelled ``random_weights: true`` everywhere (a marker file, :data:`MARKER`).

The model directory (:func:`save_sd15_random`) holds only configs, the tokenizer files and the marker, a few
hundred kB: no 4 GB of random weights are written. :func:`build_sd15_random` builds the components from those
configs with weights drawn from the marker's seed:

================  ==========================================================================  ==============
component         config                                                                      parameters
================  ==========================================================================  ==============
UNet              UNet2DConditionModel, block_out_channels 320/640/1280/1280, layers_per_block  859,520,964
                  2, cross_attention_dim 768, attention_head_dim 8, sample_size 64
VAE               AutoencoderKL 128/256/512/512, 4 latent channels, scaling_factor 0.18215        83,653,863
text encoder      CLIPTextModel (CLIP ViT-L/14 text tower): hidden 768, 12 layers, 12 heads,      123,060,480
                  intermediate 3072, 77 positions, vocabulary 49408
================  ==========================================================================  ==============

In fp32 that is 4.3 GB (UNet 3.4 GB). The tokenizer is a small byte-level BPE (the 512 byte tokens of CLIP's
byte-to-unicode table with and without ``</w>``, merges of every pair of lower-case letters, and CLIP's start/end
tokens: 1,866 entries) written as ``vocab.json`` / ``merges.txt``; the text encoder keeps CLIP-L's 49,408
embedding rows, so its parameter count is CLIP-L's.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

log = logging.getLogger(__name__)

#: ``model_id`` value that selects this model
SD15_RANDOM = "sd15_random"
#: file that marks a directory as the full-size random-weight SD 1.5 architecture
MARKER = "atelier_sd15_random.json"
#: the directory layout's version; a directory written by another version is rewritten
VERSION = 1
#: tokens per prompt (CLIP's 77, start and end tokens included)
MAX_LENGTH = 77
#: SD 1.5's published component configs (``stable-diffusion-v1-5`` ``*/config.json``, architecture keys only)
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_scale_factor": 1,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
}
#: CLIP ViT-L/14's text tower as in SD 1.5's ``text_encoder/config.json`` (its legacy bos/eos ids 0/2: the pooled
#: output then takes the position of the largest id, the end token, as CLIP does)
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": MAX_LENGTH, "hidden_act": "quick_gelu",
    "projection_dim": 768, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
#: SD 1.5's scheduler (PNDM over the scaled-linear DDPM schedule); training uses its DDPM schedule
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}
#: parameter counts of the published SD 1.5 components (what :func:`parameter_counts` must give)
PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable unicode characters (printable ASCII and
    Latin-1 map to themselves, the rest to code points from 256 up)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(keep, [chr(c) for c in codes], strict=True))


def bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The small byte-level BPE of the module docs: ``(vocab, merges)``.

    Vocabulary order as CLIP's: the 256 byte characters, the same with ``</w>``, then one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the two largest ids, 1864 and 1865). Merges: for every pair of
    lower-case letters ``x``, ``y`` the merges ``x y`` and ``x y</w>``, so a word becomes about half as many
    tokens as letters. Any UTF-8 text tokenizes (every byte has a token).
    """
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for x in string.ascii_lowercase:
        for y in string.ascii_lowercase:
            for tail in ("", "</w>"):
                merges.append((x, y + tail))
                vocab[x + y + tail] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def sd15_tokenizer() -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over :func:`bpe_vocab_and_merges` with ``model_max_length`` 77."""
    vocab, merges = bpe_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def write_tokenizer(path: str | Path) -> Path:
    """Write the tokenizer as SD 1.5's ``tokenizer/`` folder: ``vocab.json``, ``merges.txt`` (``#version: 0.2``
    header, one ``a b`` merge a line), ``tokenizer_config.json`` and ``special_tokens_map.json``; returns ``path``
    (``CLIPTokenizer.from_pretrained(path)`` reads it)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                     encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True},
        indent=2))
    return path


def is_sd15_random(path: str | Path) -> bool:
    """True when ``path`` is a directory written by :func:`save_sd15_random`."""
    return (Path(path) / MARKER).is_file()


def save_sd15_random(path: str | Path, seed: int = 0) -> Path:
    """Write the model directory (configs, tokenizer, marker; no weights) to ``path`` and return it.

    Layout as a diffusers SD 1.5 directory (``model_index.json``, ``unet/config.json``, ``vae/config.json``,
    ``text_encoder/config.json``, ``tokenizer/``, ``scheduler/scheduler_config.json``), so tools that read configs
    work; the weights come from :func:`build_sd15_random`. A directory holding the same version and seed is reused.
    """
    path = Path(path).expanduser()
    marker = path / MARKER
    info = {"version": VERSION, "seed": seed, "random_weights": True, "architecture": "stable-diffusion-v1-5",
            "note": "full-size SD 1.5 architecture with random weights, for memory and speed checks; its images "
                    "are not results"}
    if marker.is_file() and json.loads(marker.read_text()) == info:
        return path
    path.mkdir(parents=True, exist_ok=True)
    configs = {"unet/config.json": {"_class_name": "UNet2DConditionModel", **UNET_CONFIG},
               "vae/config.json": {"_class_name": "AutoencoderKL", **VAE_CONFIG},
               "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                            **TEXT_CONFIG},
               "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", **SCHEDULER_CONFIG},
               "model_index.json": {"_class_name": "StableDiffusionPipeline",
                                    "feature_extractor": [None, None], "safety_checker": [None, None],
                                    "requires_safety_checker": False,
                                    "scheduler": ["diffusers", "PNDMScheduler"],
                                    "text_encoder": ["transformers", "CLIPTextModel"],
                                    "tokenizer": ["transformers", "CLIPTokenizer"],
                                    "unet": ["diffusers", "UNet2DConditionModel"],
                                    "vae": ["diffusers", "AutoencoderKL"]}}
    for name, config in configs.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(config, indent=2))
    write_tokenizer(path / "tokenizer")
    marker.write_text(json.dumps(info, indent=2))
    return path


def build_components(device: str | torch.device = "cpu", seed: int = 0,
                     dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.nn.Module]:
    """The UNet, VAE and text encoder (``{"unet", "vae", "text_encoder"}``) with their default random init.

    Args:
        device: where the weights are allocated; ``"meta"`` builds the architecture without memory or init time
            (parameter counts, module names).
        seed: seed of the weights (the global RNG is left as it was).
        dtypes: per-component dtype (default float32). Each component is built in float32 and converted at once,
            so the transient extra memory is one component's fp32 copy.

    Peak host memory for ``device="cpu"`` in fp32 is about the model's size, 4.3 GB (UNet 3.4 GB); building takes
    ~10 s a core for the UNet.
    """
    dtypes = dtypes or {}
    built: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        makers = {"unet": lambda: UNet2DConditionModel(**UNET_CONFIG),
                  "vae": lambda: AutoencoderKL(**VAE_CONFIG),
                  "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))}
        for name, make in makers.items():
            built[name] = make().to(dtypes.get(name, torch.float32)).eval()
    return built


def parameter_counts() -> dict[str, int]:
    """Parameter count per component of the architecture (built on the meta device: instant, no memory)."""
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in build_components("meta").items()}


def build_sd15_random(path: str | Path, torch_dtype: torch.dtype | None = None,
                      dtypes: dict[str, torch.dtype] | None = None) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` over freshly built random components for the directory ``path`` (written by
    :func:`save_sd15_random`; its marker's seed fixes the weights), on the CPU, without a safety checker.

    Args:
        path: the model directory.
        torch_dtype: dtype of every component (``None``: float32), as ``from_pretrained(torch_dtype=...)``.
        dtypes: per-component dtypes (``unet``, ``vae``, ``text_encoder``), overriding ``torch_dtype``.

    Raises:
        FileNotFoundError: when ``path`` holds no marker (not an ``sd15_random`` directory).
    """
    path = Path(path)
    if not is_sd15_random(path):
        raise FileNotFoundError(f"{path} is no sd15_random directory (no {MARKER}); write one with "
                                "save_sd15_random(path) or use model_id=sd15_random")
    seed = int(json.loads((path / MARKER).read_text())["seed"])
    base = torch_dtype or torch.float32
    parts = build_components("cpu", seed, {n: (dtypes or {}).get(n, base) for n in ("unet", "vae", "text_encoder")})
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    scheduler = PNDMScheduler.from_pretrained(str(path / "scheduler"))
    log.warning("model %s is the full-size SD 1.5 architecture with RANDOM weights: for memory/speed checks only, "
                "its images are noise, not results", path)
    return StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer,
                                   unet=parts["unet"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
