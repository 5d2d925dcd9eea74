"""Corruption robustness (MedMNIST-C) of the default model on the real sets present, beside MedMNIST-C's AlexNet.

    python benchmarks/robustness.py [--data-dir ~/medmnist] [--datasets pneumoniamnist breastmnist retinamnist]
                                    [--seeds 0 1 2] [--reuse] [--epochs N] [--severities 1 2 3 4 5]
                                    [--corrupt P --name robustness_corrupt]

For each of PneumoniaMNIST, BreastMNIST and RetinaMNIST found in the data dir (28 px), the package's default recipe
(benchmarks/_common.py ``medmix``) is trained per seed into runs/bench/robustness/<set>-s<seed> (``--reuse``: finished
runs are read, interrupted ones resumed), and ``medmix.robustness.evaluate_corruptions`` scores its test split under
the set's MedMNIST-C corruptions at every severity (corruption seed 0, so every seed sees the same corrupted images).
Writes results/robustness.{json,md,png}: the clean and corrupted balanced error (1 - balanced accuracy), BE and rBE
per corruption and overall, mean +- std over the seeds, beside MedMNIST-C's AlexNet baseline (measured at 224 px),
and the mean absolute pixel change of each corruption, which shows the ones that barely alter a 28 px image.
``--name`` changes the results' file stem (for trial runs that must not replace the committed results).

``--corrupt P``: the variant trained with MedMNIST-C corruption augmentation (``medmix train --corrupt P``: each
training image corrupted with probability P by one of its set's corruptions at a random severity), into
``<runs-root>-corrupt<P>/<set>-s<seed>``; pass a ``--name`` of its own (e.g. ``robustness_corrupt``). Its test
corruptions are the kinds the training drew from (other random draws), so it measures robustness to corruptions
of the kinds seen in training.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import DEFAULT_DATA, RESULTS, command_line, fmt, machine, mean_std, recipe, table, train_or_reuse, \
    write_results

DATASETS = ("pneumoniamnist", "breastmnist", "retinamnist")


def run_dir(root: str, ds: str, seed: int) -> Path:
    return Path(root) / f"{ds}-s{seed}"


def robustness_of(out: Path, data_dir: str, severities: list[int], reuse: bool) -> dict:
    """``evaluate_corruptions`` of the run in ``out``, cached beside it as robustness/robustness.json."""
    from medmix.robustness import evaluate_corruptions, write_robustness

    cached = out / "robustness" / "robustness.json"
    if reuse and cached.is_file():
        r = json.loads(cached.read_text())
        if r.get("severities") == severities and r.get("seed") == 0:
            return r
    r = evaluate_corruptions(out, data_dir, severities=severities, seed=0)
    write_robustness(r, out / "robustness")
    return json.loads(cached.read_text())  # the JSON form (string keys, NaN as null), like a cached one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override the default recipe's epochs")
    ap.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--reuse", action="store_true", help="read finished runs and their robustness results")
    ap.add_argument("--runs-root", default="runs/bench/robustness")
    ap.add_argument("--name", default="robustness", help="results file stem: results/<name>.{json,md,png}")
    ap.add_argument("--corrupt", type=float, default=0.0, metavar="P",
                    help="train with MedMNIST-C corruption augmentation of this probability (medmix train --corrupt "
                         "P) into <runs-root>-corrupt<P> (default 0: the plain recipe, into --runs-root)")
    a = ap.parse_args()
    if not 0.0 <= a.corrupt <= 1.0:
        raise SystemExit(f"--corrupt must be in [0, 1], got {a.corrupt}")
    runs_root = f"{a.runs_root}-corrupt{a.corrupt:g}" if a.corrupt > 0 else a.runs_root

    from medmix.data.medmnist import file_name
    from medmix.inference import set_threads
    from medmix.robustness import ALEXNET_BASELINE, BASELINE_MODEL, check_severities

    set_threads()
    severities = list(check_severities(a.severities))
    present = [d for d in a.datasets if (Path(a.data_dir) / file_name(d, 28)).is_file()]
    if not present:
        raise SystemExit(f"none of {', '.join(a.datasets)} found in {a.data_dir}")
    kw = recipe("medmix", epochs=a.epochs, corrupt=a.corrupt if a.corrupt > 0 else None)
    t0 = time.perf_counter()
    runs = []
    for ds in present:
        for seed in a.seeds:
            out = run_dir(runs_root, ds, seed)
            tr = train_or_reuse(out, a.reuse, dataset=ds, data_dir=a.data_dir, seed=seed, **kw)
            r = robustness_of(out, a.data_dir, severities, a.reuse)
            runs.append({"dataset": ds, "seed": seed, "run": str(out), "best_epoch": tr.best_epoch,
                         "train_seconds": tr.seconds, "precision": tr.precision, "model": r["model"],
                         "clean": r["clean"], "mean_corrupted_balanced_error": r["mean_corrupted_balanced_error"],
                         "be": r["be"], "rbe": r["rbe"], "rbe_unstable": r["rbe_unstable"], "notes": r["notes"],
                         "corruptions": {n: {"mean_balanced_error": v["mean_balanced_error"], "be": v["be"],
                                             "rbe": v["rbe"],
                                             "balanced_error": {s: row["balanced_error"]
                                                                for s, row in v["severities"].items()},
                                             "mean_abs_change": {s: row["mean_abs_change"]
                                                                 for s, row in v["severities"].items()}}
                                         for n, v in r["corruptions"].items()}})
            be = "-" if r["be"] is None else f"{r['be']:.3f}"
            rbe = "-" if r["rbe"] is None else f"{r['rbe']:.3f}"
            print(f"{ds} seed {seed}: clean balanced error {r['clean']['balanced_error']:.3f}, corrupted "
                  f"{r['mean_corrupted_balanced_error']:.3f}, BE {be}, rBE {rbe}", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0

    def spread(values: list, digits: int = 3) -> str:
        v = [x for x in values if x is not None]
        return fmt(v, digits) if v else "-"

    trained = f" trained with corruption augmentation (--corrupt {a.corrupt:g})" if a.corrupt > 0 else ""
    md = [f"# Corruption robustness (MedMNIST-C corruptions) of the default model{trained}, beside MedMNIST-C's "
          "AlexNet", "", f"Command: `{command_line()}`  ", f"Machine: {machine()['description']}.", "",
          f"Each set: the default recipe (`medmix train --dataset SET"
          f"{f' --corrupt {a.corrupt:g}' if a.corrupt > 0 else ''}`, at most {kw.get('epochs', 30)} epochs) per "
          f"seed ({', '.join(map(str, a.seeds))}); its test split corrupted with the set's MedMNIST-C corruptions at "
          f"severities {', '.join(map(str, severities))} (corruption seed 0: the same corrupted images for every "
          "seed). Balanced error = 1 - balanced accuracy (binary: positive probability > the run's threshold; "
          "multi-class and ordinal: argmax). BE = mean over corruptions of (our error averaged over severities / "
          "AlexNet's); rBE = mean over corruptions of ((ours - our clean error) / (AlexNet's - AlexNet's clean "
          "error)); both as MedMNIST-C defines them. Values: mean ± std over seeds.", "",
          "**Resolution.** These models see 28 px images and the corruptions are applied at 28 px; MedMNIST-C and "
          f"its {BASELINE_MODEL} work at 224 px. Pixel-sized parameters (blur kernels, trails, disks, overlays) are "
          "scaled by 28/224 so a corruption covers the same share of the image; value parameters (noise strength, "
          "JPEG quality, brightness, contrast, gamma, pixelation factor) are used as given. So blurs that are mild "
          "at 224 px fall below a pixel at 28 px (the 'mean change' column: gray levels changed on average), while a "
          "given per-pixel noise hides more of a 28 px image. BE and rBE here compare a 28 px model on 28 px "
          "corruptions with AlexNet at 224 px: a like-for-like comparison only in kind. rBE divides by AlexNet's "
          "corrupted - clean error, which is near zero or negative for some corruptions (marked †); those rows "
          "can dominate the mean rBE.", ""]
    if a.corrupt > 0:
        md += [f"**Training augmentation.** Every training image was corrupted with probability {a.corrupt:g} by one "
               "of its set's MedMNIST-C corruptions, drawn at random, at a random severity 1-5 (before the recipe's "
               "own augmentation; validation and test images are not). The test corruptions are therefore of the "
               "kinds seen in training (with other random draws): these numbers measure robustness to known "
               "corruption kinds, not to unseen ones. Compare with the plain recipe's results/robustness.md.", ""]
    overview, summary, sections = [], [], []
    for ds in present:
        rs = [r for r in runs if r["dataset"] == ds]
        base = ALEXNET_BASELINE.get(ds)
        base_corr = mean_std(base["corrupted"].values())[0] if base else None
        s = {"dataset": ds, "n_seeds": len(rs),
             "clean_balanced_error": mean_std(r["clean"]["balanced_error"] for r in rs),
             "clean_acc": mean_std(r["clean"]["acc"] for r in rs), "clean_auc": mean_std(r["clean"]["auc"] for r in rs),
             "mean_corrupted_balanced_error": mean_std(r["mean_corrupted_balanced_error"] for r in rs),
             "be": mean_std(r["be"] for r in rs if r["be"] is not None),
             "rbe": mean_std(r["rbe"] for r in rs if r["rbe"] is not None),
             "alexnet": None if base is None else {"clean": base["clean"], "corrupted": base_corr}, "corruptions": {}}
        overview.append([ds, len(rs), spread([r["clean"]["acc"] for r in rs]),
                         spread([r["clean"]["balanced_error"] for r in rs]),
                         spread([r["mean_corrupted_balanced_error"] for r in rs]),
                         f"{base['clean']:.3f} → {base_corr:.3f}" if base else "-",
                         spread([r["be"] for r in rs]), spread([r["rbe"] for r in rs])])
        rows = []
        unstable = set(rs[0]["rbe_unstable"]) if rs else set()
        for name in rs[0]["corruptions"]:
            vals = [r["corruptions"][name] for r in rs]
            change = vals[0]["mean_abs_change"]  # the same images for every seed
            s["corruptions"][name] = {"mean_balanced_error": mean_std(v["mean_balanced_error"] for v in vals),
                                      "be": mean_std(v["be"] for v in vals if v["be"] is not None),
                                      "rbe": mean_std(v["rbe"] for v in vals if v["rbe"] is not None),
                                      "mean_abs_change": change}
            per_sev = " / ".join(f"{mean_std(v['balanced_error'][str(k)] for v in vals)[0]:.3f}"
                                 for k in severities)
            rows.append([name + (" †" if name in unstable else ""), spread([v["mean_balanced_error"] for v in vals]),
                         per_sev, f"{base['corrupted'][name]:.3f}" if base and name in base["corrupted"] else "-",
                         spread([v["be"] for v in vals], 2), spread([v["rbe"] for v in vals], 2),
                         " / ".join(f"{change[str(k)]:.1f}" for k in severities)])
        rows.append(["clean", spread([r["clean"]["balanced_error"] for r in rs]), "",
                     f"{base['clean']:.3f}" if base else "-", "", "", ""])
        summary.append(s)
        sections += [f"## {ds}", "", table(["corruption", "balanced error (mean over severities)",
                                            f"per severity {'/'.join(map(str, severities))}", "AlexNet 224 px", "BE",
                                            "rBE", "mean change per severity (gray levels)"], rows), ""]
        notes = sorted({n for r in rs for n in r["notes"]})
        sections += [f"- {n}" for n in notes] + [""]
    md += [table(["set", "seeds", "clean ACC", "clean balanced error", "corrupted balanced error",
                  "AlexNet clean → corrupted (224 px)", "BE", "rBE"], overview), "", *sections]
    write_results(a.name, {"command": command_line(), "machine": machine(), "seeds": a.seeds, "corrupt": a.corrupt,
                           "runs_root": runs_root,
                           "severities": severities, "recipe": {"name": "medmix", **kw}, "runs": runs,
                           "summary": summary, "total_seconds": total,
                           "alexnet_baseline": {d: ALEXNET_BASELINE[d] for d in present if d in ALEXNET_BASELINE},
                           "source": "MedMNIST-C (Di Salvo, Doerrich, Ledig, 2024), medmnistc 0.1.0"},
                  "\n".join(md))
    _plot(summary, RESULTS / f"{a.name}.png")


def _plot(summary: list[dict], path: Path) -> None:
    """One panel per set: balanced error per corruption, ours (mean ± std over seeds) beside AlexNet's, with both
    clean errors as vertical lines."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * max(1, len(summary)), 4.6), dpi=110)
    FigureCanvasAgg(fig)
    for i, s in enumerate(summary):
        ax = fig.add_subplot(1, max(1, len(summary)), i + 1)
        names = list(s["corruptions"])
        y = np.arange(len(names))
        ours = [s["corruptions"][n]["mean_balanced_error"] for n in names]
        ax.barh(y - 0.2, [m for m, _ in ours], xerr=[sd for _, sd in ours], height=0.4, color="tab:red",
                label=f"ours, 28 px (n={s['n_seeds']})", capsize=2)
        ax.axvline(s["clean_balanced_error"][0], color="tab:red", ls="--", lw=1, label="ours, clean")
        if s["alexnet"]:
            from medmix.robustness import ALEXNET_BASELINE

            base = ALEXNET_BASELINE[s["dataset"]]
            ax.barh(y + 0.2, [base["corrupted"].get(n, np.nan) for n in names], height=0.4, color="gray",
                    label="AlexNet, 224 px")
            ax.axvline(base["clean"], color="gray", ls="--", lw=1, label="AlexNet, clean")
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="balanced error (mean over severities)", title=s["dataset"], xlim=(0, 1))
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
