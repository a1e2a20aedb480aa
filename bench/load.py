"""Load: batch scoring of dumps of growing size (default 2,500 and 10,000 small generated images).

Each dump is scored by `lafite score` in its own process with a local Ray, while this script samples
the resident memory of that process and of every process it started (Ray workers included) twice a
second. Peak memory should stay flat as the dump grows: the flow keeps only URLs and a set of
already-scored keys, shards are bounded, and at most two shards per CPU are in flight.

    .venv/bin/python bench/load.py                      # 2,500 and 10,000 images
    .venv/bin/python bench/load.py --sizes 500 2000     # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))

from bench.common import machine  # noqa: E402  (also applies tasks.runtime's Ray/Prefect environment)

LAFITE = str(Path(sys.executable).with_name("lafite"))


def make_dump(folder: Path, n: int, size: int = 64) -> None:
    """n small PNGs from the demo generator (normal and defective parts of three kinds)."""
    from flows.demo_data import CATEGORIES, DEFECTS, render

    for cat in CATEGORIES:
        (folder / cat).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        defect = None if i % 4 else DEFECTS[cat][(i // 4) % 2]
        image, _ = render(cat, rng, defect, image_size=size)
        Image.fromarray(image).save(folder / cat / f"{i:05d}.png")


class MemorySampler(threading.Thread):
    """Peak RSS of a process and of all its descendants, sampled every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_total = self.peak_driver = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.NoSuchProcess:
                        rss.append(0)
                self.peak_driver = max(self.peak_driver, rss[0])
                self.peak_total = max(self.peak_total, sum(rss))
            except psutil.NoSuchProcess:
                return
            self.stop.wait(self.every)


def train_model(store: str, data: Path) -> None:
    from flows.demo_data import DemoSpec, generate_demo_dataset

    generate_demo_dataset(data, DemoSpec(train_per_category=10, test_good_per_category=2, test_defect_per_type=1))
    subprocess.run([LAFITE, "train", "--data-root", str(data), "--store", store, "--no-evaluate", "--epochs", "10"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def score(store: str, dump: Path, log: Path) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen([LAFITE, "score", str(dump), "--store", store, "--shard-size", "64"], stdout=out,
                             stderr=subprocess.STDOUT)
        sampler = MemorySampler(p.pid)
        sampler.start()
        rc = p.wait()
        sampler.stop.set()
        sampler.join()
    seconds = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"lafite score failed, see {log}")
    return {"seconds": seconds, "peak_total_gb": sampler.peak_total / 2**30, "peak_driver_gb": sampler.peak_driver / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000], help="dump sizes (images)")
    ap.add_argument("--out", default=str(HERE / "results" / "load"), help="output stem")
    args = ap.parse_args()
    print(machine().line())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        print("training a small model on generated data ...", flush=True)
        train_model(store, Path(tmp) / "data")
        for n in args.sizes:
            dump = Path(tmp) / f"dump-{n}"
            make_dump(dump, n)
            print(f"scoring {n} images ...", flush=True)
            r = {"images": n, **score(store, dump, Path(tmp) / f"score-{n}.log")}
            from lafite_core.store.storage import Store
            from lafite_core.store.ledger import read_score_tables

            s = Store(store)
            rows = read_score_tables(s, s.list_versions()[-1].version)
            mine = [u for u in rows["image_url"].to_pylist() if u.startswith(str(dump))]
            r["rows"] = len(mine)
            r["unique_rows"] = len(set(mine))
            r["images_per_s"] = n / r["seconds"]
            results.append(r)
            print(json.dumps(r), flush=True)
    lines = ["# Load: batch scoring memory against dump size", "", machine().line(), "",
             "| images | rows written | time (min) | images/s | peak RSS, all processes (GB) | peak RSS, driver (GB) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['images']} | {r['unique_rows']} | {r['seconds'] / 60:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['peak_total_gb']:.2f} | {r['peak_driver_gb']:.2f} |")
    if len(results) > 1:
        a, b = results[0], results[-1]
        lines += ["", f"{b['images'] / a['images']:.0f}x the images: peak memory x{b['peak_total_gb'] / a['peak_total_gb']:.2f} "
                      f"(all processes), x{b['peak_driver_gb'] / a['peak_driver_gb']:.2f} (driver)."]
    md = "\n".join(lines) + "\n"
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps(results, indent=2))
    print(md)


if __name__ == "__main__":
    main()
