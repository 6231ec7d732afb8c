"""A tiny, random-weight Stable Diffusion 1.x-style pipeline saved as a diffusers directory.

It exists so that every code path (text-to-image, image-to-image, LoRA training, saving and loading the adapter,
DreamBooth prior preservation, CLIP score) runs in the tests on a CPU in seconds, with no download. Its images are
noise-like: **never show its output as a result**. The directory holds a marker file (:data:`MARKER`) so that
``generate.py`` labels every image made with it as random-weight output.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)

#: file that marks a directory as the tiny random-weight model
MARKER = "atelier_tiny_model.json"
#: image size in px the tiny model generates by default (latents are 16 px: the VAE downsamples by 2)
TINY_IMAGE_SIZE = 32
#: width of the text encoder's hidden states = the UNet's cross_attention_dim
HIDDEN = 32
#: tokens per prompt (start and end tokens included)
MAX_LENGTH = 16
#: the model's version; a directory built by another version is rebuilt
VERSION = 1


def tiny_vocab() -> dict[str, int]:
    """A character-level BPE vocabulary: lower-case letters, digits and some punctuation, each also with the
    end-of-word suffix ``</w>``, plus CLIP's start/end tokens (about 90 entries). Any prompt tokenizes; unknown
    characters become ``<|endoftext|>`` (CLIP's unknown token)."""
    chars = list(string.ascii_lowercase + string.digits + ",.!?'-:;()")
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab


def tiny_tokenizer() -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over :func:`tiny_vocab` with no merges and ``model_max_length`` :data:`MAX_LENGTH`."""
    return CLIPTokenizer(vocab=tiny_vocab(), merges=[], model_max_length=MAX_LENGTH)


def _text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_LENGTH, projection_dim=HIDDEN,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build the tiny SD 1.x-style pipeline in memory with weights drawn from ``seed`` (same seed, same weights).

    UNet2DConditionModel: block_out_channels (32, 64), one cross-attention down/up block, 4 latent channels,
    cross_attention_dim 32, sample_size 16; AutoencoderKL: (16, 32), downsampling by 2, so images are 32 px;
    CLIPTextModel: hidden 32, 2 layers, 2 heads; scheduler: the SD 1.x DDPM schedule (scaled_linear betas
    0.00085–0.012, 1000 steps, ε-prediction). No safety checker.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN, attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=TINY_IMAGE_SIZE,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A tiny random-weight ``CLIPModel`` (text: as the pipeline's encoder; vision: 32 px, patch 8, hidden 32) and
    its ``CLIPProcessor`` (the tiny tokenizer, 32 px resize/crop), for CLIP-score code paths in tests."""
    torch.manual_seed(seed + 1)
    tokenizer = tiny_tokenizer()
    text = _text_config(len(tokenizer))
    vision = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=HIDDEN)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=HIDDEN))
    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                         crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def is_tiny(path: str | Path) -> bool:
    """True when ``path`` is a directory written by :func:`save_tiny_model`."""
    return (Path(path) / MARKER).is_file()


def save_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to ``path`` (loadable with ``StableDiffusionPipeline.from_pretrained(path)`` and as
    ``generate.py model_id=<path>``), a tiny CLIP model for CLIP score in ``path/clip``, and the marker file.

    A directory that already holds the same version built with the same seed is reused as it is. Returns ``path``.
    """
    path = Path(path).expanduser()
    marker = path / MARKER
    info = {"version": VERSION, "seed": seed, "random_weights": True,
            "note": "tiny random-weight Stable Diffusion for tests; its images are not results"}
    if marker.is_file() and json.loads(marker.read_text()) == info:
        return path
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed).save_pretrained(path)
    model, processor = build_tiny_clip(seed)
    model.save_pretrained(path / "clip")
    processor.save_pretrained(path / "clip")
    marker.write_text(json.dumps(info, indent=2))
    return path
