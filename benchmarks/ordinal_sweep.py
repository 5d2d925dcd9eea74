"""Does the Ordinal Loss help on RetinaMNIST?  (model, recipe) x alpha x seeds, alpha chosen on val.

    python benchmarks/ordinal_sweep.py [--data-dir ~/medmnist] [--runs hybrid_mixer_small medvit_small:medvit_paper]
                                       [--alphas 0 0.2] [--seeds 0 1 2] [--reuse] [--table-only]

Writes results/ordinal_sweep.{json,md,png}: test ACC, AUC (official semantics), MAE and QWK, mean +- std over seeds,
per model and alpha, beside Table 2 of "Medical Image Classification Based on Transformer Model and Ordinal Loss"
(Liu; MedViT, ACC only). alpha = 0 is plain cross-entropy. One extra row per model trains the formula exactly as
printed in the paper (variant "printed", alpha = 0.2) unless --no-printed, and one the CORN head and loss
(coral-pytorch; Shi, Cao and Raschka) unless --no-corn. A run is ``MODEL[:RECIPE]`` (recipes in
benchmarks/_common.py); ``--table-only`` trains nothing and tabulates the finished runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import (DEFAULT_DATA, RESULTS, command_line, committed_runs, fmt, machine, machine_label, mean_std,
                     recipe, table, train_or_reuse, write_results)

LIU_TABLE2 = {0.0: 0.552, 0.1: 0.570, 0.2: 0.594, 0.3: 0.581, 0.4: 0.557, 0.5: 0.546}  # MedViT, test ACC


def run_dir(model: str, rec: str, variant: str, alpha: float, seed: int) -> str:
    if model == "hybrid_mixer_small" and rec == "medmix":
        return f"runs/bench/ordinal_sweep/{variant}-a{alpha}-s{seed}"
    return f"runs/bench/ordinal_sweep/{model}-{rec}/{variant}-a{alpha}-s{seed}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--runs", nargs="+", default=["hybrid_mixer_small", "medvit_small:medvit_paper"],
                    help="MODEL[:RECIPE] entries")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alphas", type=float, nargs="+", default=sorted(LIU_TABLE2))
    ap.add_argument("--no-printed", action="store_true", help="skip the as-printed variant row")
    ap.add_argument("--no-corn", action="store_true", help="skip the CORN row (--loss corn, coral-pytorch)")
    ap.add_argument("--reuse", action="store_true", help="read finished runs, resume interrupted ones")
    ap.add_argument("--table-only", action="store_true", help="train nothing; tabulate the finished runs")
    ap.add_argument("--keep-committed", action="store_true",
                    help="also tabulate the runs of the committed results JSON whose run directories are not here")
    a = ap.parse_args()

    from medmix.inference import set_threads

    set_threads()
    specs = [(m, r or "medmix") for m, _, r in (s.partition(":") for s in a.runs)]
    runs = []
    variants = [("peaked", al) for al in a.alphas] + ([] if a.no_printed else [("printed", 0.2)]) + \
        ([] if a.no_corn else [("corn", 0.0)])
    t0 = time.perf_counter()
    for model, rec in specs:
        for variant, alpha in variants:
            for seed in a.seeds:
                kw = recipe(rec, epochs=a.epochs)
                kw.setdefault("patience", kw.get("epochs", 30))
                kw["monitor"] = "acc"
                r = train_or_reuse(run_dir(model, rec, variant, alpha, seed), a.reuse or a.table_only,
                                   reuse_only=a.table_only, dataset="retinamnist", data_dir=a.data_dir, model=model,
                                   seed=seed, **kw, **({"loss": "corn"} if variant == "corn" else
                                                       {"loss": "ordinal", "alpha": alpha, "margin": 0.1,
                                                        "ordinal_variant": variant}))
                if r is None:
                    continue
                row = {"model": model, "recipe": rec, "variant": variant, "alpha": alpha, "seed": seed,
                       "best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "seconds": r.seconds,
                       "machine": r.machine, "val_acc": r.val["acc"],
                       **{f"test_{k}": r.test[k] for k in ("acc", "auc", "mae", "qwk", "acc_expected")}}
                runs.append(row)
                print(f"{model}:{rec} {variant:8s} alpha={alpha:.1f} seed={seed}: test ACC {row['test_acc']:.3f} "
                      f"AUC {row['test_auc']:.3f} MAE {row['test_mae']:.3f} QWK {row['test_qwk']:.3f} "
                      f"({r.seconds:.0f} s)", file=sys.stderr, flush=True)
    if a.keep_committed:
        # rows written before the sweep took --runs are hybrid_mixer_small with the package defaults
        def spec(r: dict) -> tuple:
            return r.get("model", "hybrid_mixer_small"), r.get("recipe", "medmix")

        old = committed_runs("ordinal_sweep", lambda r: (*spec(r), r["variant"], r["alpha"], r["seed"]),
                             lambda r: spec(r) in specs and (r["variant"], r["alpha"]) in variants
                             and r["seed"] in a.seeds, runs)
        # (and were measured on the AVX2 machine, before the rows recorded it)
        runs += [{"model": "hybrid_mixer_small", "recipe": "medmix",
                  "machine": {"description": "AVX2 machine", "native_bf16": False}, **r} for r in old]
    total = time.perf_counter() - t0

    m = machine()
    md = ["# Ordinal Loss on RetinaMNIST (28 px)", "", f"Command: `{command_line()}`  ",
          f"Tabulated on: {m['description']}. Times are wall-clock seconds per run on a shared 2-core machine (other "
          "jobs ran beside them); each block names the CPU kind its runs trained on. Best epoch by val ACC; test read "
          "once per run. Published column: Table 2 of \"Medical Image Classification Based on Transformer Model and "
          "Ordinal Loss\" (Liu), MedViT, test ACC.", ""]
    summary = []
    for model, rec in specs:
        rows = []
        for variant, alpha in variants:
            key = (model, rec, variant, alpha)
            rs = [r for r in runs if (r["model"], r["recipe"], r["variant"], r["alpha"]) == key]
            if not rs:
                continue
            s = {"model": model, "recipe": rec, "variant": variant, "alpha": alpha, "n_seeds": len(rs),
                 **{k: mean_std(r[k] for r in rs) for k in ("test_acc", "test_auc", "test_mae", "test_qwk",
                                                           "val_acc", "seconds")}}
            summary.append(s)
            paper = LIU_TABLE2.get(alpha) if variant == "peaked" else None
            label = "CORN (`--loss corn`)" if variant == "corn" else \
                f"{alpha:.1f}" + (" (as printed)" if variant == "printed" else "")
            rows.append([label, len(rs),
                         fmt(r["test_acc"] for r in rs), fmt(r["test_auc"] for r in rs),
                         fmt(r["test_mae"] for r in rs), fmt(r["test_qwk"] for r in rs),
                         f"{paper:.3f}" if paper is not None else "–",
                         f"{statistics.median(r['seconds'] for r in rs):.0f}"])
        if not rows:
            continue
        mine = [r for r in runs if (r["model"], r["recipe"]) == (model, rec)]
        kinds = ", ".join(sorted({machine_label(r.get("machine")) for r in mine}))
        md += [f"## {model}, recipe `{rec}` (CPU: {kinds})", "",
               table(["alpha", "seeds", "test ACC", "test AUC", "test MAE", "test QWK", "Liu Table 2 ACC (MedViT)",
                      "s/run (median)"], rows), ""]
        peaked = [s for s in summary if (s["model"], s["recipe"], s["variant"]) == (model, rec, "peaked")]
        base = next((s for s in peaked if s["alpha"] == 0.0), None)
        best = max(peaked, key=lambda s: s["val_acc"][0]) if peaked else None
        if best is not None:
            md.append(f"alpha chosen on val (mean val ACC): {best['alpha']:.1f} -> test ACC "
                      f"{best['test_acc'][0]:.3f} ± {best['test_acc'][1]:.3f}.")
        if base is not None:
            for s in peaked:
                if s["alpha"] == 0.2:
                    md.append(f"alpha 0.2 vs cross-entropy (alpha 0): {s['test_acc'][0] - base['test_acc'][0]:+.3f} "
                              "test ACC; the paper reports +0.042 for MedViT (0.552 -> 0.594).")
            if best is not None:
                md.append(f"Gain of the val-chosen alpha over alpha 0: {best['test_acc'][0] - base['test_acc'][0]:+.3f}"
                          " test ACC (the paper does not say how its alpha was chosen).")
        md.append("")
    write_results("ordinal_sweep", {"command": command_line(), "machine": m, "seeds": a.seeds,
                                    "liu_table2": LIU_TABLE2, "runs": runs, "summary": summary,
                                    "total_seconds": total}, "\n".join(md))
    _plot(summary)


def _plot(summary: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for key in dict.fromkeys((s["model"], s["recipe"]) for s in summary):
        peaked = [s for s in summary if (s["model"], s["recipe"], s["variant"]) == (*key, "peaked")]
        ax.errorbar([s["alpha"] for s in peaked], [s["test_acc"][0] for s in peaked],
                    yerr=[s["test_acc"][1] for s in peaked], marker="o", capsize=3,
                    label=f"medmix {key[0]} ({key[1]}, mean ± std)")
    ax.plot(sorted(LIU_TABLE2), [LIU_TABLE2[k] for k in sorted(LIU_TABLE2)], "s--", label="Liu, Table 2 (MedViT)")
    ax.axhline(0.524, color="gray", ls=":", label="official ResNet-18 (28)")
    ax.set_xlabel("alpha (weight of the rank loss)")
    ax.set_ylabel("RetinaMNIST test ACC")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "ordinal_sweep.png")


if __name__ == "__main__":
    main()
