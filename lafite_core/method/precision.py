"""Mixed precision for the diffusion U-Net: the one switch ``compute.precision`` and where bf16 pays.

``auto`` runs the U-Net (training and scoring) under bf16 autocast on CUDA devices that support bf16
and on CPUs that report bf16 matrix units (AMX) or AVX512-BF16, and in fp32 elsewhere, where bf16 is
emulated and slower. ``bf16`` forces autocast (with a warning where it is emulated); ``fp32`` never
uses it. Autocast keeps fp32 weights and optimiser state, so a checkpoint resumes under either.

The backbone stays fp32: its features are cached in the store under a key that must not depend on
the machine that extracted them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Callable, Literal

import torch

log = logging.getLogger(__name__)

Resolved = Literal["fp32", "bf16"]
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_logged: set[tuple[str, str, str]] = set()


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 compute flags this CPU reports (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def bf16_native(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 in hardware, and why (for the log)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {'supports' if ok else 'lacks'} bf16"
    if dev.type == "cpu":
        flags = cpu_bf16_flags()
        return bool(flags), (f"CPU reports {', '.join(flags)}" if flags else "CPU reports neither AMX nor AVX512-BF16")
    return False, f"no bf16 autocast policy for {dev.type}"


def resolve_precision(setting: str, device: torch.device | str, what: str = "the U-Net") -> Resolved:
    """``compute.precision`` on ``device`` -> fp32 or bf16, logged (a warning when bf16 is emulated)."""
    if setting not in ("auto", "fp32", "bf16"):
        raise ValueError(f"compute.precision must be auto, fp32 or bf16; got {setting!r}")
    if setting == "fp32":
        return "fp32"
    native, why = bf16_native(device)
    if setting == "bf16":
        if not native:
            log.warning("compute.precision=bf16 for %s on %s: %s, so bf16 is emulated and likely slower than fp32",
                        what, torch.device(device), why)
        return "bf16"
    chosen: Resolved = "bf16" if native else "fp32"
    said = (what, str(torch.device(device)), chosen)
    if said not in _logged:  # once per process, not for every scorer
        _logged.add(said)
        log.info("precision for %s on %s: %s (auto: %s)", what, torch.device(device), chosen, why)
    return chosen


def autocast(device: torch.device | str, precision: Resolved) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` is bf16, else a no-op context."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def in_precision(fn: Callable[..., torch.Tensor], device: torch.device | str,
                 precision: Resolved) -> Callable[..., torch.Tensor]:
    """``fn`` run under :func:`autocast`, its output back in fp32 (the DDIM arithmetic stays fp32)."""
    if precision != "bf16":
        return fn

    def run(*args, **kwargs) -> torch.Tensor:
        with autocast(device, precision):
            out = fn(*args, **kwargs)
        return out.float()

    return run
