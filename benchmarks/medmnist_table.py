"""Every MedMNIST set present in the data dir x models x seeds, beside the seed's Table 1 and the official benchmark.

    python benchmarks/medmnist_table.py [--data-dir ../shared/data] [--models hybrid_mixer_small resnet18_28]
                                        [--epochs 30] [--seeds 0 1 2]

Writes results/medmnist_table.{json,md}: test ACC / AUC (official semantics) mean +- std over seeds, training
wall time per run; the best epoch of each run is chosen on the validation split (AUC for binary tasks, ACC
otherwise) and the test split is read once per run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import DEFAULT_DATA, command_line, fmt, machine, mean_std, table, train_or_reuse, write_results

# Third seed (MedViT paper), Table 1, test ACC / AUC, quoted.
SEED_MEDVIT = {"pneumoniamnist": (0.939, 0.978), "breastmnist": (0.891, 0.856), "retinamnist": (None, None)}
SEED_BEST_ROW = {"pneumoniamnist": ("Google AutoML Vision", 0.946, 0.991), "breastmnist": ("MedViT/AutoML", 0.891, 0.919)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--models", nargs="+", default=["hybrid_mixer_small", "resnet18_28"])
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--reuse", action="store_true", help="read finished runs (metrics.json) instead of retraining")
    a = ap.parse_args()

    from medmix.data.medmnist import file_name, medmnist_flags
    from medmix.engine import set_threads
    from medmix.report import OFFICIAL_BENCHMARK

    set_threads()
    flags = medmnist_flags()  # MedMNIST only: mednist has its own benchmark (benchmarks/mednist.py)
    present = [d for d in (a.datasets or flags) if d in flags and (Path(a.data_dir) / file_name(d, 28)).is_file()]
    runs = []
    t0 = time.perf_counter()
    for ds in present:
        for model in a.models:
            for seed in a.seeds:
                r = train_or_reuse(f"runs/bench/medmnist_table/{ds}-{model}-s{seed}", a.reuse, dataset=ds,
                                   data_dir=a.data_dir, model=model, epochs=a.epochs, batch_size=a.batch_size,
                                   patience=a.epochs, seed=seed)
                runs.append({"dataset": ds, "model": model, "seed": seed, "best_epoch": r.best_epoch,
                             "seconds": r.seconds, "test_acc": r.test["acc"], "test_auc": r.test["auc"],
                             "val_acc": r.val["acc"], "val_auc": r.val["auc"]})
                print(f"{ds} {model} seed {seed}: test ACC {r.test['acc']:.3f} AUC {r.test['auc']:.3f} "
                      f"(val {r.val['acc']:.3f}/{r.val['auc']:.3f}), {r.seconds:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    md = [f"# MedMNIST (28 px): medmix vs the seeds and the official benchmark, {len(a.seeds)} seeds", "",
          f"Command: `{command_line()}`  ", f"Machine: {machine()['description']}; total {total / 60:.1f} min; "
          f"{a.epochs} epochs per run, best epoch on val.", ""]
    summary = []
    for ds in present:
        rows = []
        for model in a.models:
            rs = [r for r in runs if r["dataset"] == ds and r["model"] == model]
            s = {"dataset": ds, "model": model,
                 **{k: mean_std(r[k] for r in rs) for k in ("test_acc", "test_auc", "seconds")}}
            summary.append(s)
            rows.append([f"medmix {model}", fmt(r["test_acc"] for r in rs), fmt(r["test_auc"] for r in rs),
                         f"{s['seconds'][0]:.0f}"])
        medvit = SEED_MEDVIT.get(ds)
        if medvit and medvit[0] is not None:
            rows.append(["seed: MedViT (Table 1)", f"{medvit[0]:.3f}", f"{medvit[1]:.3f}", "–"])
        if ds in SEED_BEST_ROW:
            n, acc, auc = SEED_BEST_ROW[ds]
            rows.append([f"seed: best row ({n})", f"{acc:.3f}", f"{auc:.3f}", "–"])
        for name, (acc, auc) in OFFICIAL_BENCHMARK.get(ds, {}).items():
            rows.append([f"official: {name}", f"{acc:.3f}", f"{auc:.3f}", "–"])
        md += [f"## {ds}", "", table(["model", "test ACC", "test AUC", "train s/run"], rows), ""]
    write_results("medmnist_table", {"command": command_line(), "machine": machine(), "epochs": a.epochs,
                                     "seeds": a.seeds, "runs": runs, "summary": summary, "total_seconds": total},
                  "\n".join(md))


if __name__ == "__main__":
    main()
