"""CPU training precision chosen by the hardware: bf16 autocast only where it was measured to pay.

Measured on the DDPM benchmark (``scripts/bench_train.py``, the ``ddpm_mnist_cpu`` UNet, batch 64, bf16 / fp32
training images/s):

- AVX2-only AMD EPYC: 1/14 (no bf16 kernels; PyTorch falls back to slow reference bf16 convolutions);
- Intel Xeon (Sapphire Rapids) with AMX-BF16: 1.7-1.9x (oneDNN's ``brg_conv_fwd:..._amx`` kernels);
- a real AMD EPYC Zen 4 (family 25, ``avx512_bf16``, no AMX; stop 26): 1.69x plain loop, 1.80x Lightning
  (107 -> 181 and 102 -> 184 images/s);
- the Sapphire Rapids Xeon with AMX masked (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``: AVX512-BF16 dot products
  only, an emulation of Cooper Lake): 0.73-0.80x, i.e. *slower* than fp32. No real Intel CPU with AVX512-BF16 and
  no AMX has been measured, so there the rule keeps fp32;
- the same Xeon capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``): 0.09x.

``docs/samplers.md`` has the figures. The rule::

    bf16-mixed  if /proc/cpuinfo lists amx_bf16 (BF16_MATRIX_FLAGS)
    bf16-mixed  if it lists avx512_bf16 and the vendor is AuthenticAMD (Zen 4 and later: AMD_VENDOR)
    32-true     otherwise (AVX2, Intel AVX512-BF16 without AMX, Arm, CPUs without /proc/cpuinfo such as macOS)

The vendor (``vendor_id``) is read into the flag set as a token (``AuthenticAMD``, ``GenuineIntel``).

``configs/trainer/cpu.yaml`` sets ``precision: ${atelier.cpu_precision:}`` (the resolver is registered by
:func:`atelier.utils.hydra_jobs.register_resolvers`); ``trainer.precision=...`` on the command line replaces the
interpolation, so an explicit choice always wins. Set ``ATELIER_CPU_FLAGS`` (comma- or space-separated flags,
e.g. ``avx2``, ``amx_bf16,avx512_bf16`` or ``AuthenticAMD,avx512_bf16``) to decide as if on another CPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: The environment variable that replaces the flags read from ``/proc/cpuinfo`` (tests, "what would it pick there").
FLAGS_ENV = "ATELIER_CPU_FLAGS"
#: ``/proc/cpuinfo`` flags of CPUs whose bf16 matrix units make bf16 autocast train faster than fp32: AMX tiles
#: (Intel Sapphire Rapids and later).
BF16_MATRIX_FLAGS = ("amx_bf16",)
#: bf16 vector (not matrix) instructions. On AMD (Zen 4) they made bf16 autocast train 1.7-1.8x faster than fp32;
#: on an Intel Xeon with AMX masked down to them, 0.73-0.80x, so for Intel they are reported but not a reason.
BF16_VECTOR_FLAGS = ("avx512_bf16",)
#: The vendor token under which :data:`BF16_VECTOR_FLAGS` select bf16.
AMD_VENDOR = "AuthenticAMD"
BF16_PRECISION = "bf16-mixed"
FP32_PRECISION = "32-true"

_logged: set[str] = set()


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags: ``$ATELIER_CPU_FLAGS`` if set, else the ``flags`` (x86) or ``Features`` (Arm) lines
    of ``cpuinfo`` plus its ``vendor_id`` (e.g. ``AuthenticAMD``) as one more token; empty where that file does
    not exist (macOS, Windows)."""
    override = os.environ.get(FLAGS_ENV)
    if override is not None:
        return frozenset(override.replace(",", " ").split())
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features", "vendor_id"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_bf16_pays(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether bf16 autocast was measured faster than fp32 on CPUs like this one: bf16 matrix units
    (:data:`BF16_MATRIX_FLAGS`, ``amx_bf16``), or ``avx512_bf16`` on an AMD CPU (Zen 4 and later).

    Args:
        flags: CPU flags (and vendor token) to decide on; default :func:`cpu_flags` (``$ATELIER_CPU_FLAGS`` or
            ``/proc/cpuinfo``).
    """
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in BF16_MATRIX_FLAGS):
        return True
    return AMD_VENDOR in flags and any(f in flags for f in BF16_VECTOR_FLAGS)


def cpu_precision(flags: frozenset[str] | set[str] | None = None) -> str:
    """Lightning ``precision`` for CPU training: ``bf16-mixed`` where :func:`cpu_bf16_pays`, else ``32-true``.

    Logs the choice and its reason once per process (the resolver runs each time the config is resolved).

    Args:
        flags: CPU flags to decide on; default :func:`cpu_flags`.
    """
    flags = cpu_flags() if flags is None else flags
    found = [f for f in BF16_MATRIX_FLAGS if f in flags]
    vector = [f for f in BF16_VECTOR_FLAGS if f in flags]
    precision = BF16_PRECISION if cpu_bf16_pays(flags) else FP32_PRECISION  # the rule; below only its reason
    if found:
        why = (f"the CPU has bf16 matrix units ({', '.join(found)}): bf16 autocast trained 1.7-1.9x faster than "
               "fp32 with AMX")
    elif vector and precision == BF16_PRECISION:
        why = (f"the CPU is AMD with {', '.join(vector)} (Zen 4 or later): bf16 autocast trained 1.7-1.8x faster "
               "than fp32 on a Zen 4 EPYC")
    elif vector:
        why = (f"the CPU has {', '.join(vector)} but no amx_bf16 and is not AMD: bf16 autocast trained at "
               "0.73-0.80x of fp32 on a Xeon with AMX masked")
    else:
        why = "the CPU has no bf16 units (no amx_bf16): bf16 autocast trained 14x slower than fp32 on AVX2"
    message = f"trainer=cpu: precision={precision} because {why}; set trainer.precision=... to override"
    if message not in _logged:
        _logged.add(message)
        log.info(message)
    return precision


def autocast_dtype_for_cpu(flags: frozenset[str] | set[str] | None = None) -> torch.dtype | None:
    """The same rule for inference: ``torch.bfloat16`` to autocast to where :func:`cpu_bf16_pays`, else ``None``
    (stay in fp32).

    Args:
        flags: CPU flags to decide on; default :func:`cpu_flags`.
    """
    return torch.bfloat16 if cpu_bf16_pays(flags) else None
