"""The UNet LoRA adapter of :class:`atelier.models.sd_lora.StableDiffusionLoRA`: its default target modules, its
size, and writing it in diffusers' LoRA format (what ``pipe.load_lora_weights`` and
:mod:`atelier.text2image.kohya` read)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from atelier.text2image.pipeline import LORA_WEIGHTS

#: the UNet attention projections LoRA adapts by default (query, key, value, output of every attention)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: the file beside the weights that records how the adapter was trained
INFO_FILE = "atelier_lora.json"


def lora_parameter_count(unet: torch.nn.Module, rank: int, target_modules: Sequence[str] = DEFAULT_TARGETS) -> int:
    """Trainable parameters of a rank-``rank`` LoRA on ``unet``'s linear/conv modules whose names end with one of
    ``target_modules`` (peft's matching): ``rank · (d_in + d_out)`` per module. Works on a meta-device UNet."""
    total = 0
    for name, module in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in target_modules):
            if isinstance(module, torch.nn.Linear):
                total += rank * (module.in_features + module.out_features)
            elif isinstance(module, torch.nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                total += rank * (module.in_channels * k + module.out_channels)
    return total


def add_unet_lora(unet: Any, rank: int, alpha: float, lora_dropout: float, target_modules: Sequence[str]) -> None:
    """Add a trainable LoRA adapter (peft, Gaussian-initialised ``A``, zero ``B``) of ``rank`` and ``alpha`` on
    ``unet``'s ``target_modules``.

    Raises:
        ValueError: from peft (e.g. a target that is no linear/conv layer), naming ``model.target_modules``.
    """
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=lora_dropout,
                                    init_lora_weights="gaussian", target_modules=target_modules))
    except ValueError as err:
        raise ValueError(f"model.target_modules={target_modules}: {err}") from err


def save_unet_lora(unet: Any, path: str | Path, info: Mapping[str, Any]) -> Path:
    """Write ``unet``'s (peft) LoRA adapter in diffusers' format to ``path/pytorch_lora_weights.safetensors`` (with
    its rank/alpha metadata, readable by ``pipe.load_lora_weights(path)``) plus ``info`` as ``atelier_lora.json``;
    returns the weights file."""
    path = Path(path)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    config = unet.peft_config["default"].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    StableDiffusionPipeline.save_lora_weights(save_directory=str(path), unet_lora_layers=layers,
                                              safe_serialization=True, unet_lora_adapter_metadata=metadata)
    (path / INFO_FILE).write_text(json.dumps(dict(info), indent=2))
    return path / LORA_WEIGHTS


def only_lora(full: Mapping[str, Any], trainable: set[str]) -> OrderedDict[str, Any]:
    """The entries of a module's ``state_dict`` whose names are in ``trainable`` (the LoRA parameters): what an
    Atelier LoRA checkpoint stores, the frozen base weights being reloaded from the pretrained model."""
    return OrderedDict((k, v) for k, v in full.items() if k in trainable)


def check_lora_keys(state_dict: Mapping[str, Any], trainable: set[str], pretrained_model: str) -> None:
    """Raise when ``state_dict`` lacks any of the ``trainable`` (LoRA) parameter names.

    Raises:
        RuntimeError: naming how many are missing and a few of them.
    """
    missing = sorted(trainable - set(state_dict))
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} LoRA parameters, e.g. {missing[:3]}; was it "
                           f"trained with the same rank/target_modules on {pretrained_model}?")
