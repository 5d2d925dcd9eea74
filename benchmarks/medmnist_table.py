"""Every MedMNIST set present in the data dir x (model, recipe) x seeds, beside the published rows.

    python benchmarks/medmnist_table.py [--data-dir ~/medmnist] [--runs hybrid_mixer_small medvit_small:medvit_paper
                                        resnet18_28:medmnist_official] [--seeds 0 1 2] [--reuse] [--table-only]

A run is ``MODEL[:RECIPE]``; recipes (benchmarks/_common.py) are medmix's defaults ("medmix"), the MedViT paper's
("medvit_paper") and the official MedMNIST experiments' ("medmnist_official", and "medmnist_official_aug" with
medmix's augmentation and precision). Writes results/medmnist_table.{json,md,png}: test ACC / AUC (official
semantics) mean +- std over the seeds run (the count shown), training wall time per run and the CPU kind it ran on;
the best epoch of each run is chosen on the validation split and the test split is read once per run.
``--table-only`` trains nothing: the table is made of the finished runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _common import (DEFAULT_DATA, RESULTS, command_line, committed_runs, fmt, machine, machine_label, mean_std,
                     recipe, table, train_or_reuse, write_results)

# "Medical Image Classification Based on Transformer Model and Ordinal Loss" (Liu), Table 1, MedViT, test ACC / AUC
LIU_MEDVIT = {"pneumoniamnist": (0.939, 0.978), "breastmnist": (0.891, 0.856)}
# best rows published elsewhere, test ACC / AUC
BEST_PUBLISHED = {"pneumoniamnist": ("Google AutoML Vision (MedMNIST v2)", 0.946, 0.991),
                  "breastmnist": ("MedMNIST+ (pretrained, 128 px)", 0.906, 0.940)}


def parse_run(spec: str) -> tuple[str, str]:
    model, _, rec = spec.partition(":")
    return model, rec or "medmix"


def run_dir(ds: str, model: str, rec: str, seed: int) -> str:
    tag = "" if rec == "medmix" else f"-{rec}"
    return f"runs/bench/medmnist_table/{ds}-{model}{tag}-s{seed}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--runs", nargs="+", default=["hybrid_mixer_small", "medvit_small:medvit_paper",
                                                  "resnet18_28:medmnist_official",
                                                  "resnet18_28:medmnist_official_aug"],
                    help="MODEL[:RECIPE] entries")
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--reuse", action="store_true", help="read finished runs, resume interrupted ones")
    ap.add_argument("--table-only", action="store_true", help="train nothing; tabulate the finished runs")
    ap.add_argument("--keep-committed", action="store_true",
                    help="also tabulate the runs of the committed results JSON whose run directories are not here")
    a = ap.parse_args()

    from medmix.data.medmnist import file_name, medmnist_flags
    from medmix.inference import set_threads
    from medmix.report import OFFICIAL_BENCHMARK

    set_threads()
    flags = medmnist_flags()  # MedMNIST only: mednist has its own benchmark (benchmarks/mednist.py)
    present = [d for d in (a.datasets or flags) if d in flags and (Path(a.data_dir) / file_name(d, 28)).is_file()]
    specs = [parse_run(s) for s in a.runs]
    runs = []
    t0 = time.perf_counter()
    for ds in present:
        for model, rec in specs:
            for seed in a.seeds:
                kw = recipe(rec, epochs=a.epochs)
                r = train_or_reuse(run_dir(ds, model, rec, seed), a.reuse or a.table_only, reuse_only=a.table_only,
                                   dataset=ds, data_dir=a.data_dir, model=model,
                                   **{"patience": kw.get("epochs", 30), **kw}, seed=seed)
                if r is None:
                    continue
                runs.append({"dataset": ds, "model": model, "recipe": rec, "seed": seed, "best_epoch": r.best_epoch,
                             "epochs_run": r.epochs_run, "seconds": r.seconds, "precision": r.precision,
                             "machine": r.machine, "test_acc": r.test["acc"], "test_auc": r.test["auc"],
                             "val_acc": r.val["acc"], "val_auc": r.val["auc"]})
                print(f"{ds} {model}:{rec} seed {seed}: test ACC {r.test['acc']:.3f} AUC {r.test['auc']:.3f} "
                      f"(val {r.val['acc']:.3f}/{r.val['auc']:.3f}), {r.seconds:.0f} s", file=sys.stderr, flush=True)
    if a.keep_committed:
        runs += committed_runs("medmnist_table", lambda r: (r["dataset"], r["model"], r["recipe"], r["seed"]),
                               lambda r: r["dataset"] in present and (r["model"], r["recipe"]) in specs
                               and r["seed"] in a.seeds, runs)
    total = time.perf_counter() - t0
    md = ["# MedMNIST (28 px): medmix and the reference models measured here, beside the published rows", "",
          f"Command: `{command_line()}`  ",
          f"Tabulated on: {machine()['description']}. Each row gives the CPU kind its runs trained on; times are "
          "wall-clock seconds per run on a shared 2-core machine (other jobs ran beside them).", "",
          "Every run: best epoch on the validation split, test split read once. Recipes: `medmix` = the package "
          "defaults; `medvit_paper` = AdamW 1e-3, cosine over 50 epochs, batch 128, scale/rotate/crop/flip; "
          "`medmnist_official` = Adam 1e-3, 100 epochs, x0.1 at 50 and 75, best by val AUC, no augmentation, "
          "mean/std .5, fp32; `medmnist_official_aug` = the same with medmix's augmentation and precision.", ""]
    summary = []
    for ds in present:
        rows = []
        for model, rec in specs:
            rs = [r for r in runs if r["dataset"] == ds and r["model"] == model and r["recipe"] == rec]
            if not rs:
                continue
            s = {"dataset": ds, "model": model, "recipe": rec, "n_seeds": len(rs),
                 **{k: mean_std(r[k] for r in rs) for k in ("test_acc", "test_auc", "val_acc", "val_auc",
                                                           "seconds")}}
            summary.append(s)
            kinds = sorted({machine_label(r["machine"]) for r in rs})
            precs = sorted({str(r["precision"]) for r in rs})
            secs = statistics.median(r["seconds"] for r in rs)
            rows.append([f"medmix {model}", rec, len(rs), fmt(r["test_acc"] for r in rs),
                         fmt(r["test_auc"] for r in rs), f"{secs:.0f}", ", ".join(precs), ", ".join(kinds)])
        if ds in LIU_MEDVIT:
            acc, auc = LIU_MEDVIT[ds]
            rows.append(["published: MedViT (Liu, Table 1)", "paper", "–", f"{acc:.3f}", f"{auc:.3f}", "–", "–",
                         "A800 GPU"])
        if ds in BEST_PUBLISHED:
            n, acc, auc = BEST_PUBLISHED[ds]
            rows.append([f"published: best row, {n}", "–", "–", f"{acc:.3f}", f"{auc:.3f}", "–", "–", "–"])
        for name, (acc, auc) in OFFICIAL_BENCHMARK.get(ds, {}).items():
            rows.append([f"published: {name} (MedMNIST v2)", "official", "–", f"{acc:.3f}", f"{auc:.3f}", "–", "–",
                         "GPU"])
        md += [f"## {ds}", "", table(["model", "recipe", "seeds", "test ACC", "test AUC", "train s/run (median)",
                                      "precision", "CPU"], rows), ""]
    write_results("medmnist_table", {"command": command_line(), "machine": machine(), "seeds": a.seeds,
                                     "runs": runs, "summary": summary, "total_seconds": total,
                                     "published": {"liu_medvit": LIU_MEDVIT, "best": BEST_PUBLISHED,
                                                   "medmnist_v2": OFFICIAL_BENCHMARK}},
                  "\n".join(md))
    _plot(present, summary)


def _plot(present: list[str], summary: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medmix.report import OFFICIAL_BENCHMARK

    fig = Figure(figsize=(4.2 * max(1, len(present)), 4), dpi=110)
    FigureCanvasAgg(fig)
    for i, ds in enumerate(present):
        ax = fig.add_subplot(1, max(1, len(present)), i + 1)
        ss = [s for s in summary if s["dataset"] == ds]
        for s in ss:
            ax.errorbar(s["test_acc"][0], s["test_auc"][0], xerr=s["test_acc"][1], yerr=s["test_auc"][1],
                        marker="o", capsize=3, ls="none", label=f"{s['model']} ({s['recipe']}, n={s['n_seeds']})")
        pubs = dict(OFFICIAL_BENCHMARK.get(ds, {}))
        if ds in LIU_MEDVIT:
            pubs["MedViT (Liu)"] = LIU_MEDVIT[ds]
        for name, (acc, auc) in pubs.items():
            if acc is not None:
                ax.scatter([acc], [auc], marker="x", color="gray")
                ax.annotate(name, (acc, auc), fontsize=6, color="gray")
        ax.set_title(ds)
        ax.set_xlabel("test ACC")
        ax.set_ylabel("test AUC")
        ax.grid(alpha=0.3)
        if ss:
            ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "medmnist_table.png")


if __name__ == "__main__":
    main()
