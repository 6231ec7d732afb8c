"""Load Stable Diffusion text-to-image / image-to-image pipelines (diffusers ``AutoPipelineFor*``) with the
precision, memory switches, sampler and LoRA adapter a run asks for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline

from atelier.text2image.kohya import is_kohya, read_lora
from atelier.text2image.schedulers import make_sd_scheduler
from atelier.text2image.sd15 import build_sd15_random, is_sd15_random
from atelier.text2image.weights import is_random_weights, resolve_model
from atelier.utils.device import resolve_device

log = logging.getLogger(__name__)

#: ``precision`` values: ``auto`` is fp16 on CUDA (bf16 where fp16 is unsupported) and fp32 on CPU
PRECISIONS = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: name of the adapter :func:`apply_lora` loads
ADAPTER_NAME = "atelier_lora"
#: file name of a LoRA adapter in diffusers' format
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weight dtype for ``precision`` (``auto``, ``fp32``, ``fp16``, ``bf16``) on ``device``.

    ``auto`` gives fp16 on CUDA and fp32 on CPU (half precision on a CPU is slow or unsupported).

    Raises:
        ValueError: for an unknown ``precision`` (listing the allowed values), or fp16 on a CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed; choose one of {list(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision=fp16 is not supported on a CPU; use fp32 (or bf16)")
    return PRECISIONS[precision]


def load_text2image(model_id: str, device: str | torch.device = "auto", precision: str = "auto",
                    tiny_dir: str | Path | None = None, attention_slicing: bool = False,
                    vae_tiling: bool = False) -> DiffusionPipeline:
    """A text-to-image pipeline (``AutoPipelineForText2Image``: SD 1.x/2.x, SDXL) on ``device`` in the dtype of
    ``precision``, without a safety checker, with its progress bar off.

    The resolved directory and whether it is a random-weight model (``tiny``, ``sd15_random``: the latter is built
    from its configs, :mod:`atelier.text2image.sd15`) are stored on the pipeline as ``atelier_model_dir`` and
    ``atelier_random_weights``.

    Raises:
        MissingWeightsError, NotADirectoryError: from :func:`atelier.text2image.weights.resolve_model`.
        ValueError: for a bad ``precision``.
    """
    device = resolve_device(str(device))
    dtype = resolve_dtype(precision, device)
    path = resolve_model(model_id, tiny_dir)
    index = json.loads((path / "model_index.json").read_text())
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    if is_sd15_random(path):
        pipe = build_sd15_random(path, dtype)
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(str(path), torch_dtype=dtype, **extra)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.atelier_model_dir = str(path)
    pipe.atelier_random_weights = is_random_weights(path)
    if pipe.atelier_random_weights:
        log.warning("model_id=%s is a RANDOM-WEIGHT model: its images are noise, not results", model_id)
    return pipe


def image2image_from(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """The image-to-image pipeline sharing ``pipe``'s components (no second copy of the weights)."""
    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    i2i.atelier_model_dir = pipe.atelier_model_dir
    i2i.atelier_random_weights = pipe.atelier_random_weights
    return i2i


def set_sampler(pipe: DiffusionPipeline, sampler: str) -> None:
    """Replace ``pipe.scheduler`` by the SD sampler ``sampler`` (``ddpm``, ``ddim``, ``dpmpp``) built on the
    pipeline's own noise schedule (see :mod:`atelier.text2image.schedulers`).

    Raises:
        ValueError: for an unknown sampler name.
    """
    pipe.scheduler = make_sd_scheduler(sampler, pipe.scheduler.config)


def lora_file(path: str | Path) -> Path:
    """The adapter file for ``path``: the file itself, ``<dir>/pytorch_lora_weights.safetensors``, or the only
    ``.safetensors`` file of the directory (e.g. a kohya ``name.safetensors``).

    Raises:
        FileNotFoundError: naming the path when none of these exists (or a directory holds several candidates).
    """
    path = Path(path).expanduser()
    candidate = path / LORA_WEIGHTS if path.is_dir() else path
    if path.is_dir() and not candidate.is_file():
        found = sorted(path.glob("*.safetensors"))
        candidate = found[0] if len(found) == 1 else candidate
    if not candidate.is_file():
        raise FileNotFoundError(f"lora={path}: no LoRA adapter there (expected a .safetensors file or a directory "
                                f"holding {LORA_WEIGHTS} or exactly one .safetensors file, e.g. <train run>/lora)")
    return candidate


def lora_format(path: str | Path) -> str:
    """``"kohya"`` or ``"diffusers"``: the key format of the adapter at ``path`` (see
    :mod:`atelier.text2image.kohya`), detected from its key names.

    Raises:
        FileNotFoundError: when ``path`` holds no adapter.
    """
    tensors, _ = read_lora(lora_file(path))
    return "kohya" if is_kohya(tensors) else "diffusers"


def apply_lora(pipe: DiffusionPipeline, path: str | Path, scale: float = 1.0) -> None:
    """Load a LoRA adapter (``load_lora_weights``) and set its weight to ``scale`` (``set_adapters``): the LoRA
    update ``ΔW = (alpha / rank) · B A`` is multiplied by ``scale``, so ``0`` gives the base model's output and
    ``1`` the trained adapter.

    Both formats load: diffusers' (``unet.<module>.lora.down.weight``, rank/alpha in the file's metadata) and
    kohya's (``lora_unet_<module>.lora_down.weight`` with per-module ``.alpha``), told apart by the key names.
    diffusers' ``load_lora_weights`` converts kohya's SD 1.x keys itself, per-module alphas included; the tests
    check that a kohya file gives the same images as the diffusers file it was converted from.

    Raises:
        FileNotFoundError: when ``path`` holds no adapter.
    """
    file = lora_file(path)
    log.info("LoRA %s (%s format), scale %s", file, lora_format(file), scale)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER_NAME)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[float(scale)])
