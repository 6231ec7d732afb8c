"""Generation settings in PNG text chunks, so every image file says how to make it again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

#: PNG text key holding the full settings as JSON
SETTINGS_KEY = "atelier"
#: PNG text key holding a one-line, human-readable summary (the ``parameters`` key other SD tools read)
SUMMARY_KEY = "parameters"


def summary_line(settings: dict[str, Any]) -> str:
    """``prompt\\nNegative prompt: ...\\nSteps: 25, Sampler: dpmpp, CFG scale: 7.5, Seed: 0, Size: 512x512, Model:
    ...`` (the layout other Stable Diffusion tools write under ``parameters``)."""
    parts = [str(settings.get("prompt", ""))]
    if settings.get("negative_prompt"):
        parts.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {"Steps": "num_inference_steps", "Sampler": "sampler", "CFG scale": "guidance_scale", "Seed": "seed",
              "Model": "model_id", "Denoising strength": "strength", "Lora": "lora", "Lora scale": "lora_scale"}
    values = [f"{label}: {settings[key]}" for label, key in fields.items() if settings.get(key) is not None]
    if settings.get("width") and settings.get("height"):
        values.insert(4, f"Size: {settings['width']}x{settings['height']}")
    parts.append(", ".join(values))
    return "\n".join(parts)


def save_png(image: Image.Image, path: str | Path, settings: dict[str, Any]) -> Path:
    """Save ``image`` as PNG with ``settings`` as JSON (key :data:`SETTINGS_KEY`) and a summary (key
    :data:`SUMMARY_KEY`); returns the path. ``settings`` must be JSON-serialisable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    info.add_text(SUMMARY_KEY, summary_line(settings))
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings :func:`save_png` stored in the PNG at ``path``.

    Raises:
        KeyError: when the file has no :data:`SETTINGS_KEY` text chunk (naming the path).
    """
    with Image.open(path) as im:
        text = im.text.get(SETTINGS_KEY)  # type: ignore[attr-defined]
    if text is None:
        raise KeyError(f"{path} has no '{SETTINGS_KEY}' PNG text chunk")
    return json.loads(text)
