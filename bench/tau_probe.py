"""Does the pseudo-validation set pick tau better with feature editing than without it?

The search (section 4.5 of the paper) picks tau without editing, then K with editing at that tau.
On real data the no-editing curve sits near chance (about 67 detection AUROC on `magnetic_tile`),
so its pick is the least reliable part of the search. On a published model this probe scores, at
every tau of the model's search grid and the model's DDIM steps, both LafitE without editing and
LafitE at a fixed K (``--k``, default the model's), on its pseudo-validation set (rebuilt exactly
as ``stages.select`` built it: the same split and seed) and on the real test sets; it reports both
curves (mean per-category detection AUROC; pixel AUROC of the test set), which tau each pseudo-
validation curve would pick and what that tau gives on the test set with editing.

    .venv/bin/python bench/tau_probe.py --store /tmp/ws/scratch

Writes ``bench/results/tau_probe.md`` (``--out`` for another stem; also printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import SHARED_DATA, machine, out_stem, published_model, write_text  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="store holding a published model")
    p.add_argument("--model-version", default=None, help="default: the latest")
    p.add_argument("--data-root", default=str(SHARED_DATA), help="where the model's categories' images are")
    p.add_argument("--k", type=int, default=None, help="K for the edited curves (default: the model's)")
    p.add_argument("--out", default=None, help="output stem (default bench/results/tau_probe)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    from lafite_core.datapath.features import extract
    from lafite_core.method.backbone import FeatureExtractor
    from lafite_core.method.metrics import auroc
    from lafite_core.method.model import Scorer
    from lafite_core.stages import PseudoEvaluator, image_seed, load_all, plan_training, pseudo_validation

    started = time.perf_counter()
    model, version, categories = published_model(args.store, args.model_version, args.data_root)
    if model.position_stats is not None:  # fitted at the chosen tau only: every tau is scored as the search does
        print("scoring.position_norm: the curves score without the model's position statistics, as the search does",
              flush=True)
        model = model.with_hyperparameters(model.tau, model.k)
    cfg = model.config
    k = args.k or model.k
    steps = cfg.scoring.ddim_steps
    extractor = FeatureExtractor(cfg.backbone)
    plan = plan_training(categories, cfg)
    pseudo, _ = pseudo_validation(cfg, extractor, plan.holdout, plan.fit)
    scorer = Scorer(model, "cpu")
    evaluate = PseudoEvaluator(scorer, pseudo)
    tests = []
    for c in categories:
        loaded, _ = load_all(c.test, cfg)
        labels = np.array([s.sample.label for s in loaded])
        if len(np.unique(labels)) < 2:
            continue
        known = np.array([s.mask is not None for s in loaded])  # pixel metrics where the mask is known
        masks = (known, np.stack([s.mask for s in loaded if s.mask is not None])) if known.any() else None
        tests.append((c.key, torch.from_numpy(extract(extractor, [s.image for s in loaded])), labels,
                      [image_seed(cfg.seed, s.content_hash) for s in loaded], masks))
    found = [scorer.neighbours(f, k) for _, f, _, _, _ in tests]

    def on_tests(tau: int, edit: bool) -> tuple[float, float | None]:
        img, pix = [], []
        for (_, feats, labels, seeds, masks), nb in zip(tests, found):
            out = scorer.score(feats, "lafite" if edit else "lafite_no_edit", seeds, tau=tau, k=k,
                               found=nb if edit else None, steps=steps)
            img.append(auroc(labels, out.scores.numpy()))
            if edit and masks is not None and masks[1].any():
                pix.append(auroc(masks[1], out.maps.numpy()[masks[0]]))
        return float(np.mean(img)), (float(np.mean(pix)) if pix else None)

    rows = []
    for tau in cfg.search.taus:
        t = time.perf_counter()
        pv_plain, pv_edit = evaluate(tau, None, steps)[0], evaluate(tau, k, steps)[0]
        (te_plain, _), (te_edit, te_pix) = on_tests(tau, False), on_tests(tau, True)
        rows.append(dict(tau=tau, pv_plain=pv_plain, pv_edit=pv_edit, te_plain=te_plain, te_edit=te_edit,
                         te_pix=te_pix, seconds=time.perf_counter() - t))
        print(rows[-1], flush=True)
    pick_plain = max(rows, key=lambda r: r["pv_plain"])
    pick_edit = max(rows, key=lambda r: r["pv_edit"])
    best = max(rows, key=lambda r: r["te_edit"])
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = [f"# tau picked with or without editing: {version}", "",
             f"- machine: {machine().line()}", f"- command: `bench/tau_probe.py {' '.join(sys.argv[1:])}`",
             f"- model: {', '.join(model.categories)}; its search chose tau {model.tau}, K {model.k}, {steps} DDIM "
             f"step(s); the curves here use K = {k} and {steps} step(s)",
             f"- pseudo-validation set: {len(pseudo.labels)} images (the split and seed `stages.select` used); "
             f"test: {', '.join(f'{key} ({len(lab)})' for key, _, lab, _, _ in tests)}",
             "- detection AUROC in %, mean over categories; pixel AUROC of the test set with editing", "",
             "| tau | pseudo-val. w/o editing | pseudo-val. with editing | test w/o editing | test with editing | "
             "test pixel, with editing | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tau']} | {pct(r['pv_plain'])} | {pct(r['pv_edit'])} | {pct(r['te_plain'])} | "
                     f"{pct(r['te_edit'])} | {pct(r['te_pix'])} | {r['seconds']:.0f} |")
    lines += ["", f"- picked without editing (the paper's rule, the search today): tau {pick_plain['tau']} -> test "
              f"{pct(pick_plain['te_edit'])} / {pct(pick_plain['te_pix'])}",
              f"- picked with editing at K = {k}: tau {pick_edit['tau']} -> test {pct(pick_edit['te_edit'])} / "
              f"{pct(pick_edit['te_pix'])}",
              f"- test-best tau with editing: {best['tau']} ({pct(best['te_edit'])} / {pct(best['te_pix'])})",
              f"- {time.perf_counter() - started:.0f} s in all"]
    stem = out_stem(args.out, "tau_probe", False)
    write_text(stem.parent / (stem.name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
