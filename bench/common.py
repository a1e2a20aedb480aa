"""What the benchmark scripts share: project paths, the machine description, config overrides, output.

The scripts run as ``.venv/bin/python bench/<name>.py`` from the project root (or anywhere: paths
default relative to the project, not the working directory).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import tasks.runtime  # noqa: F401  (Ray/Prefect environment defaults before either is imported)

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
RESULTS = PROJECT / "bench" / "results"


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    torch_threads: int
    torch: str
    python: str
    cuda: str | None
    load_average: tuple[float, float, float]

    def line(self) -> str:
        gpu = self.cuda or "no GPU"
        return (f"{self.cpu}, {self.cores} cores, torch {self.torch} with {self.torch_threads} threads, "
                f"python {self.python}, {gpu}; load average {self.load_average[0]:.2f} "
                f"{self.load_average[1]:.2f} {self.load_average[2]:.2f} at start")


def machine() -> Machine:
    """CPU model, cores, torch threads and the load at the time of the call (other work skews timings)."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Machine(cpu, os.cpu_count() or 1, torch.get_num_threads(), torch.__version__,
                   platform.python_version(), cuda, os.getloadavg())


def parse_set(assignments: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``["diffusion.epochs=5", ...]`` -> nested config updates, parsed exactly as the CLI's ``--set``."""
    from flows.cli import set_override

    out: dict[str, dict[str, Any]] = {}
    for a in assignments or []:
        set_override(out, a)
    return out


def merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Nested update: ``extra`` wins field by field."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def out_stem(arg: str | None, default_name: str, quick: bool) -> Path:
    """Output path stem: ``--out`` as given (relative to the working directory), else
    ``bench/results/<default_name>`` (``_quick`` appended for smoke runs, so they never pass for
    full results)."""
    if arg:
        return Path(arg).resolve()
    return RESULTS / (default_name + ("_quick" if quick else ""))


def write_text(path: Path, text: str) -> None:
    """Write whole: temporary file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class Ticker:
    """progress(stage, done, total) for the library: one stderr line per stage, then one at its end."""

    def __init__(self) -> None:
        self.stage = ""
        self.t0 = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.stage = stage
            self.t0 = time.perf_counter()
            print(f"  .. {stage}", file=sys.stderr, flush=True)
        if total and done == total:
            print(f"  .. {stage}: {total} done in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr,
                  flush=True)


def published_model(store_url: str, version: str | None, data_root: str):
    """A published model of ``store_url`` (``version``, default the latest), its version name, and the
    categories under ``data_root`` it was trained on (SystemExit when none is there): what the probes
    that score an existing model start from."""
    from lafite_core.datapath.data import discover
    from lafite_core.stages import load_published
    from lafite_core.store.storage import Store

    store = Store(store_url)
    version = store.resolve_version(version)
    model, _, _ = load_published(store, version)
    categories = [c for c in discover(data_root) if c.key in model.categories]
    if not categories:
        raise SystemExit(f"none of the model's categories {model.categories} is under {data_root}")
    return model, version, categories


def camera_jpegs(n: int, root: Path, size: tuple[int, int] = (2000, 1500)) -> Path:
    """``n`` JPEGs of a textured scene, camera-sized by default (width, height), in MVTec layout
    (``<root>/camera/part/train/good``); returns the dataset root ``<root>/camera``."""
    import numpy as np
    from PIL import Image

    folder = root / "camera" / "part" / "train" / "good"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    for i in range(n):
        img = np.stack([128 + 60 * np.sin(x / (30 + i % 7)) + 40 * np.cos(y / 23.0), 128 + 50 * np.sin((x + y) / 51.0),
                        100 + rng.normal(0, 12, x.shape)], -1)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return root / "camera"
