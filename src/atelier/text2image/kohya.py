"""LoRA adapters in kohya-ss's format (sd-scripts, A1111, ComfyUI) and in diffusers' format, both ways.

diffusers' format (what :meth:`atelier.models.sd_lora.StableDiffusionLoRA.save_lora` writes)::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight   (r, d_in)   = A
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight     (d_out, r)  = B
    + safetensors metadata ``lora_adapter_metadata`` (peft's LoraConfig: ``unet.r``, ``unet.lora_alpha``, ...)

(peft's own spelling ``...to_q.lora_A.weight`` / ``lora_B.weight`` is read as well). kohya's format::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (r, d_in)  = A
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    (d_out, r) = B
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             ()         = alpha

For SD 1.x kohya names are the diffusers UNet's module names with ``.`` replaced by ``_`` (sd-scripts trains SD 1.x
on the diffusers UNet), prefixed ``lora_unet_``. The update is the same in both, ``ΔW = (alpha / r) · B A``; the
tensors are copied unchanged (same values, same dtype), so a round trip gives identical files' tensors and identical
images. The way back needs the underscores resolved: with the UNet's module names it is exact
(:func:`kohya_to_module_name` ``module_names=``), otherwise a fixed table of diffusers name parts (``down_blocks``,
``to_out``, ``time_emb_proj``, ...) is used.

Only UNet LoRA is handled (Atelier trains no text-encoder LoRA); other keys (``lora_te_*``) raise ``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: prefix of kohya's UNet LoRA keys
KOHYA_UNET_PREFIX = "lora_unet_"
#: safetensors metadata key where diffusers keeps the adapter's peft config
DIFFUSERS_METADATA = "lora_adapter_metadata"
#: multi-part diffusers module-name components, as sequences of ``_``-separated parts (longest match first)
_COMPOUNDS = sorted([
    ("down", "blocks"), ("up", "blocks"), ("mid", "block"), ("transformer", "blocks"), ("to", "q"), ("to", "k"),
    ("to", "v"), ("to", "out"), ("proj", "in"), ("proj", "out"), ("time", "emb", "proj"), ("conv", "shortcut"),
    ("conv", "in"), ("conv", "out"), ("conv", "norm", "out"), ("time", "embedding"), ("linear", "1"),
    ("linear", "2"), ("add", "embedding"), ("add", "q", "proj"), ("add", "k", "proj"), ("add", "v", "proj"),
    ("to", "add", "out"), ("class", "embedding"), ("encoder", "hid", "proj"),
], key=len, reverse=True)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` LoRA file (metadata ``{}`` when it has none).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (no __iter__)


def is_kohya(keys: Iterable[str]) -> bool:
    """True when the state-dict ``keys`` are in kohya's format (``lora_unet_``/``lora_te_`` prefixes or
    ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` suffixes); diffusers/peft keys give ``False``."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(("lora_unet_", "lora_te")) or k.endswith(
        (".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)


def module_to_kohya(module: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` →
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``."""
    return KOHYA_UNET_PREFIX + module.replace(".", "_")


def kohya_to_module_name(name: str, module_names: Iterable[str] | None = None) -> str:
    """The diffusers UNet module name of the kohya LoRA name ``name`` (``lora_unet_...``, without suffix).

    Args:
        name: e.g. ``lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0``.
        module_names: the UNet's module names (``unet.named_modules()``); given, the match is exact.

    Raises:
        ValueError: for a name without the ``lora_unet_`` prefix, or one no module of ``module_names`` has.
    """
    if not name.startswith(KOHYA_UNET_PREFIX):
        raise ValueError(f"{name}: not a kohya UNet LoRA name (no {KOHYA_UNET_PREFIX!r} prefix); text-encoder LoRA "
                         "(lora_te_*) is not supported")
    flat = name[len(KOHYA_UNET_PREFIX):]
    if module_names is not None:
        table = {m.replace(".", "_"): m for m in module_names}
        if flat not in table:
            raise ValueError(f"{name}: the UNet has no module {flat!r} (with '.' for '_'); is the adapter for "
                             "another base model?")
        return table[flat]
    parts, out, i = flat.split("_"), [], 0
    while i < len(parts):
        for compound in _COMPOUNDS:
            if tuple(parts[i:i + len(compound)]) == compound:
                out.append("_".join(compound))
                i += len(compound)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def _diffusers_module(key: str) -> tuple[str, str] | None:
    """``(module, "down"|"up")`` of a diffusers/peft LoRA key, ``None`` for other keys."""
    key = key.removeprefix("unet.")
    for suffix, kind in ((".lora.down.weight", "down"), (".lora.up.weight", "up"), (".lora_A.weight", "down"),
                         (".lora_B.weight", "up"), (".lora_A.default.weight", "down"),
                         (".lora_B.default.weight", "up")):
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def adapter_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The UNet adapter's peft config (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ...) from a
    diffusers file's metadata, ``{}`` when it holds none."""
    raw = metadata.get(DIFFUSERS_METADATA)
    if not raw:
        return {}
    config = json.loads(raw)
    return {k.removeprefix("unet."): v for k, v in config.items() if k.startswith("unet.") or "." not in k}


def _pattern_value(module: str, pattern: Mapping[str, Any], default: Any) -> Any:
    """peft's rule: the value of the longest ``pattern`` key that ``module`` ends with, else ``default``."""
    hits = [k for k in pattern if module == k or module.endswith("." + k)]
    return pattern[max(hits, key=len)] if hits else default


def diffusers_to_kohya(tensors: Mapping[str, torch.Tensor],
                       metadata: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert a diffusers/peft UNet LoRA state dict to kohya's keys: ``(tensors, metadata)``.

    ``lora_down.weight`` = A ``(r, d_in)``, ``lora_up.weight`` = B ``(d_out, r)`` (unchanged tensors), and per
    module a 0-dim float32 ``alpha``: from the metadata's ``lora_alpha`` / ``alpha_pattern``; without metadata
    ``alpha = r`` (scale 1, what diffusers assumes for such a file). kohya metadata: ``ss_network_module``,
    ``ss_network_dim``, ``ss_network_alpha`` (the file-wide values).

    Raises:
        ValueError: for keys that are no UNet LoRA weights, or a module with only one of A, B.
    """
    config = adapter_config(metadata or {})
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = _diffusers_module(key)
        if parsed is None or key.startswith("text_encoder"):
            raise ValueError(f"{key}: not a UNet LoRA weight in diffusers/peft format")
        pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    out: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"down", "up"}:
            raise ValueError(f"{module}: LoRA needs both the down (A) and up (B) matrix, found {sorted(pair)}")
        rank = int(pair["down"].shape[0])
        default_alpha = config.get("lora_alpha", rank) if config else rank
        alpha = float(_pattern_value(module, config.get("alpha_pattern") or {}, default_alpha))
        name = module_to_kohya(module)
        out[f"{name}.lora_down.weight"] = pair["down"]
        out[f"{name}.lora_up.weight"] = pair["up"]
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        ranks.add(rank)
        alphas.add(alpha)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)) if ranks else "0",
            "ss_network_alpha": str(max(alphas)) if alphas else "0", "atelier_converted_from": "diffusers"}
    return out, meta


def kohya_to_diffusers(tensors: Mapping[str, torch.Tensor], module_names: Iterable[str] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Convert kohya UNet LoRA keys to diffusers' (``unet.<module>.lora.down.weight`` / ``.lora.up.weight``):
    ``(tensors, adapter config)``.

    The adapter config is what :meth:`diffusers.StableDiffusionPipeline.save_lora_weights` takes as
    ``unet_lora_adapter_metadata``: ``r`` and ``lora_alpha`` (the most common rank and alpha), ``rank_pattern`` /
    ``alpha_pattern`` for modules that differ, ``target_modules`` (the module names). A module without ``alpha``
    gets ``alpha = r`` (kohya's convention).

    Args:
        tensors: kohya state dict.
        module_names: the UNet's module names, for an exact name mapping (see :func:`kohya_to_module_name`).

    Raises:
        ValueError: for text-encoder or unknown keys, a module without both matrices, or (with
            ``module_names``) a module the UNet lacks.
    """
    names = list(module_names) if module_names is not None else None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        base, _, suffix = key.partition(".")
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ValueError(f"{key}: not a kohya LoRA key (.lora_down.weight, .lora_up.weight or .alpha)")
        groups.setdefault(base, {})[suffix] = tensor
    out: dict[str, torch.Tensor] = {}
    rank_of: dict[str, int] = {}
    alpha_of: dict[str, float] = {}
    for base, group in sorted(groups.items()):
        if "lora_down.weight" not in group or "lora_up.weight" not in group:
            raise ValueError(f"{base}: LoRA needs both lora_down.weight and lora_up.weight")
        module = kohya_to_module_name(base, names)
        out[f"unet.{module}.lora.down.weight"] = group["lora_down.weight"]
        out[f"unet.{module}.lora.up.weight"] = group["lora_up.weight"]
        rank_of[module] = int(group["lora_down.weight"].shape[0])
        alpha_of[module] = float(group["alpha"].item()) if "alpha" in group else float(rank_of[module])
    if not out:
        raise ValueError("the state dict holds no kohya UNet LoRA weights")
    rank = max(set(rank_of.values()), key=list(rank_of.values()).count)
    alpha = max(set(alpha_of.values()), key=list(alpha_of.values()).count)
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(rank_of),
              "rank_pattern": {m: r for m, r in rank_of.items() if r != rank},
              "alpha_pattern": {m: a for m, a in alpha_of.items() if a != alpha},
              "init_lora_weights": True, "lora_dropout": 0.0, "bias": "none", "use_dora": False}
    return out, config


def write_kohya(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a kohya state dict (``diffusers_to_kohya``'s output) as ``path`` (``.safetensors``); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", **metadata})
    return path


def write_diffusers(directory: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                    weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
    """Write a diffusers LoRA (``kohya_to_diffusers``' output) into ``directory`` with
    ``StableDiffusionPipeline.save_lora_weights`` (so ``load_lora_weights`` reads rank and alpha from its
    metadata); returns the file."""
    from diffusers import StableDiffusionPipeline

    layers = {k.removeprefix("unet."): v for k, v in tensors.items()}
    StableDiffusionPipeline.save_lora_weights(save_directory=str(directory), unet_lora_layers=layers,
                                              safe_serialization=True, weight_name=weight_name,
                                              unet_lora_adapter_metadata=dict(config))
    return Path(directory) / weight_name
