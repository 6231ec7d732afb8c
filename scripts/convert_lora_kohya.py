"""Convert a UNet LoRA adapter between diffusers' format (what Atelier writes) and kohya-ss's (sd-scripts, A1111,
ComfyUI); the direction follows the input's key names. Tensors are copied unchanged, so a round trip is exact.

    python scripts/convert_lora_kohya.py outputs/sd_lora_art/<run>/lora my_style.safetensors          # → kohya
    python scripts/convert_lora_kohya.py my_style.safetensors outputs/my_style_lora                    # → diffusers
    python scripts/convert_lora_kohya.py my_style.safetensors out_dir --model <SD 1.x dir or hub id>   # exact names

``--model`` maps kohya names to the base UNet's module names exactly (the UNet is built on the meta device from its
config: no weights are read); without it a table of diffusers name parts is used (right for SD 1.x/2.x UNets).
Key formats: :mod:`atelier.text2image.kohya`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atelier.text2image.kohya import (
    diffusers_to_kohya,
    is_kohya,
    kohya_to_diffusers,
    read_lora,
    write_diffusers,
    write_kohya,
)
from atelier.text2image.pipeline import LORA_WEIGHTS, lora_file


def unet_module_names(model: str) -> list[str]:
    """The UNet module names of ``model`` (hub id, local diffusers directory, ``tiny`` or ``sd15_random``), from
    its ``unet/config.json`` built on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    from atelier.text2image.weights import resolve_model

    config = json.loads((resolve_model(model) / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [name for name, _ in unet.named_modules()]


def convert(source: str | Path, target: str | Path, model: str | None = None) -> Path:
    """Convert the adapter at ``source`` (a file or a directory holding one) and write it to ``target``; returns
    the written file. diffusers → kohya: ``target`` is the ``.safetensors`` file. kohya → diffusers: ``target``
    is a directory (``pytorch_lora_weights.safetensors`` inside) or a ``.safetensors`` file name in one.

    Raises:
        FileNotFoundError: when ``source`` holds no adapter; ValueError: for keys of neither format.
    """
    tensors, metadata = read_lora(lora_file(source))
    target = Path(target)
    if is_kohya(tensors):
        names = unet_module_names(model) if model else None
        out, config = kohya_to_diffusers(tensors, names)
        directory, name = (target.parent, target.name) if target.suffix == ".safetensors" else (target, LORA_WEIGHTS)
        return write_diffusers(directory, out, config, weight_name=name)
    out, meta = diffusers_to_kohya(tensors, metadata)
    return write_kohya(target if target.suffix == ".safetensors" else target / "lora_kohya.safetensors", out, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="adapter file, or a directory holding one (e.g. <train run>/lora)")
    parser.add_argument("target", help="kohya: output .safetensors; diffusers: output directory")
    parser.add_argument("--model", default=None, help="base model, for exact kohya → diffusers module names")
    args = parser.parse_args()
    written = convert(args.source, args.target, args.model)
    tensors, _ = read_lora(written)
    print(f"wrote {written} ({'kohya' if is_kohya(tensors) else 'diffusers'} format, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
