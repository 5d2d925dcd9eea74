"""One generalist vs one specialist per dataset: same backbone, same input format, same total training budget.

    python benchmarks/generalist.py [--data-dir ~/medmnist]
                                    [--datasets pneumoniamnist breastmnist retinamnist mednist]
                                    [--model hybrid_mixer_small] [--img-size 28] [--steps 1200] [--evals 10]
                                    [--seeds 0 1 2] [--reuse]

For each seed:

* the **generalist** trains ``--steps`` batches of mixed datasets (temperature-sampled, ``p_d ∝ n_d^(1/2)``),
  validating ``--evals`` times; the best validation point (mean of per-dataset metrics) is kept;
* each **specialist** is the same pipeline on its dataset alone (same backbone, common size and channels, recipe),
  given ``round(steps * p_d)`` batches: the batches of that dataset the generalist drew on average. The specialists
  together use the generalist's budget, and each dataset's images are seen as often in both arms.

Every run reads its test split(s) once, at the end. Writes results/generalist.{json,md,png}: per dataset test
ACC/AUC (official semantics) mean ± std over seeds for both arms, the generalist's routing accuracy (over all
test images and per dataset) and end-to-end accuracy (router picks the head), training wall time per arm.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import DEFAULT_DATA, RESULTS, command_line, fmt, machine, mean_std, table, write_results

DATASETS = ("pneumoniamnist", "breastmnist", "retinamnist", "mednist")


def run(out: Path, reuse: bool, **kwargs) -> dict:
    """Train into ``out`` (or, with ``reuse``, read the finished run's metrics.json)."""
    if not (reuse and (out / "metrics.json").is_file()):
        from medmix.generalist import GeneralistConfig, train_generalist

        train_generalist(GeneralistConfig(out=str(out), overwrite=True, quiet=True, **kwargs))
    return json.loads((out / "metrics.json").read_text())


def ood_rates(run_dir: Path, data_dir: str, seed: int) -> dict:
    """Share of images flagged as out of distribution: each dataset's test split (about 5% by construction of the
    val thresholds, more under a val/test shift), uniform noise, smoothed noise and blank images (should be ~100%)."""
    import torch
    import torch.nn.functional as F

    from medmix.generalist import GeneralistPredictor, _members_of

    p = GeneralistPredictor(run_dir)
    out = {}
    for m in _members_of(p.meta, run_dir, data_dir):
        out[m.name] = float((~p.analyse(m.splits["test"].images)["in_distribution"]).mean())
    g = torch.Generator().manual_seed(seed)
    c, s = p.channels, p.img_size
    uniform = torch.randint(0, 256, (500, c, s, s), generator=g, dtype=torch.uint8)
    smooth = F.avg_pool2d(uniform.float(), 5, 1, 2)
    smooth = ((smooth - smooth.amin((1, 2, 3), keepdim=True)) / (smooth.amax((1, 2, 3), keepdim=True) -
              smooth.amin((1, 2, 3), keepdim=True)) * 255).round().to(torch.uint8)
    blank = torch.randint(0, 256, (100, 1, 1, 1), generator=g).expand(100, c, s, s).to(torch.uint8).contiguous()
    for name, x in (("uniform noise", uniform), ("smoothed noise", smooth), ("blank", blank)):
        out[name] = float((~p.analyse(x)["in_distribution"]).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--model", default="hybrid_mixer_small")
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--steps", type=int, default=1200, help="generalist batches (the total budget of each arm)")
    ap.add_argument("--evals", type=int, default=10, help="validations per run")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sampling-temperature", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/bench/generalist")
    ap.add_argument("--reuse", action="store_true", help="read finished runs (metrics.json) instead of retraining")
    a = ap.parse_args()

    from medmix.data import load_dataset
    from medmix.data.mixture import common_channels, sampling_weights
    from medmix.inference import set_threads

    set_threads()
    bundles = [load_dataset(d, data_dir=a.data_dir) for d in a.datasets]
    channels = common_channels([b.info.n_channels for b in bundles])
    sizes = [len(b.splits["train"]) for b in bundles]
    p = sampling_weights(sizes, a.sampling_temperature)
    del bundles
    common = dict(data_dir=a.data_dir, model=a.model, img_size=a.img_size, channels=channels,
                  batch_size=a.batch_size, sampling_temperature=a.sampling_temperature)
    runs = []
    t_all = time.perf_counter()
    for seed in a.seeds:
        g = run(Path(a.runs) / f"generalist-s{seed}", a.reuse, datasets=tuple(a.datasets), epochs=a.evals,
                steps_per_epoch=max(1, a.steps // a.evals), patience=a.evals, seed=seed, **common)
        runs.append({"arm": "generalist", "seed": seed, "seconds": g["train_seconds"], "best_epoch": g["best_epoch"],
                     "routing_acc": g["test"]["routing_acc"], "end_to_end_acc": g["test"]["end_to_end_acc"],
                     "routing_confusion": g["test"]["routing_confusion"],
                     "datasets": {d: _slim(m) for d, m in g["test"]["datasets"].items()},
                     "ood_flagged": ood_rates(Path(a.runs) / f"generalist-s{seed}", a.data_dir, seed)})
        print(f"seed {seed} generalist: routing {g['test']['routing_acc']:.4f}, {g['train_seconds']:.0f} s",
              file=sys.stderr, flush=True)
        spec = {"arm": "specialists", "seed": seed, "seconds": 0.0, "datasets": {}, "steps": {}}
        for d, pd in zip(a.datasets, p):
            steps = max(1, int(round(a.steps * pd)))
            s = run(Path(a.runs) / f"{d}-s{seed}", a.reuse, datasets=(d,), epochs=a.evals,
                    steps_per_epoch=max(1, steps // a.evals), patience=a.evals, seed=seed, **common)
            spec["seconds"] += s["train_seconds"]
            spec["steps"][d] = max(1, steps // a.evals) * a.evals
            spec["datasets"][d] = _slim(s["test"]["datasets"][d])
            print(f"seed {seed} specialist {d}: ACC {spec['datasets'][d]['acc']:.4f} AUC "
                  f"{spec['datasets'][d]['auc']:.4f}, {s['train_seconds']:.0f} s", file=sys.stderr, flush=True)
        runs.append(spec)
    total = time.perf_counter() - t_all
    _report(a, runs, p, sizes, channels, total)


def _slim(m: dict) -> dict:
    return {k: m[k] for k in ("acc", "auc", "n", "routing_acc", "end_to_end_acc") if k in m}


def _report(a, runs: list[dict], p: np.ndarray, sizes: list[int], channels: int, total: float) -> None:
    gen = [r for r in runs if r["arm"] == "generalist"]
    spe = [r for r in runs if r["arm"] == "specialists"]
    rows, summary = [], {}
    for d in a.datasets:
        ga = [r["datasets"][d]["acc"] for r in gen]
        gu = [r["datasets"][d]["auc"] for r in gen]
        sa = [r["datasets"][d]["acc"] for r in spe]
        su = [r["datasets"][d]["auc"] for r in spe]
        routing = [r["datasets"][d]["routing_acc"] for r in gen]
        e2e = [r["datasets"][d]["end_to_end_acc"] for r in gen]
        d_acc, d_auc = mean_std(ga)[0] - mean_std(sa)[0], mean_std(gu)[0] - mean_std(su)[0]
        verdict = _verdict(ga, sa, gu, su)
        summary[d] = {"generalist_acc": mean_std(ga), "generalist_auc": mean_std(gu), "specialist_acc": mean_std(sa),
                      "specialist_auc": mean_std(su), "routing_acc": mean_std(routing), "end_to_end_acc": mean_std(e2e),
                      "delta_acc": d_acc, "delta_auc": d_auc, "verdict": verdict}
        rows.append([d, fmt(sa), fmt(su), fmt(ga), fmt(gu), f"{d_acc:+.3f} / {d_auc:+.3f}", fmt(routing, 4),
                     fmt(e2e), verdict])
    routing_all = [r["routing_acc"] for r in gen]
    summary["routing_acc"] = mean_std(routing_all)
    summary["end_to_end_acc"] = mean_std(r["end_to_end_acc"] for r in gen)
    gsec, ssec = mean_std(r["seconds"] for r in gen)[0], mean_std(r["seconds"] for r in spe)[0]
    m = machine()
    mix = ", ".join(f"{d} {n} ({w:.2f})" for d, n, w in zip(a.datasets, sizes, p))
    target = "reached" if summary["routing_acc"][0] >= 0.995 else "NOT reached"
    md = [f"# Generalist vs specialists ({a.model}, {a.img_size} px, {channels} channels, {len(a.seeds)} seeds)", "",
          f"Command: `{command_line()}`  ",
          f"Machine: {m['description']}; total wall time {total / 60:.1f} min.  ",
          f"Budget per arm and seed: {a.steps} batches of {a.batch_size} ({a.steps * a.batch_size:,} images), "
          f"{a.evals} validations; training images and sampling weights (T = {a.sampling_temperature}): {mix}. "
          f"Each specialist gets its dataset's share of the batches. Best validation point per run (mean of "
          f"per-dataset AUC for binary / ACC for multi-class sets); test read once per run.", "",
          table(["dataset", "specialist ACC", "specialist AUC", "generalist ACC", "generalist AUC",
                 "Δ ACC / AUC", "routing ACC", "end-to-end ACC", "verdict"], rows), "",
          f"Routing accuracy over all test images: **{fmt([100 * v for v in routing_all], 2)} %** (target ≥ 99.5 %: "
          f"{target}); end-to-end accuracy (router picks the head) {fmt(r['end_to_end_acc'] for r in gen)}.  ",
          f"Training wall time per seed: generalist {gsec:.0f} s, the specialists together {ssec:.0f} s.", "",
          "Flagged as out of distribution by the generalist (one Gaussian per (dataset, class) on its features, "
          "threshold of the routed dataset at 95% of its val images), mean ± std over seeds:", "",
          table(["images", "flagged"], [[k, fmt([100 * r["ood_flagged"][k] for r in gen], 1) + " %"]
                                        for k in gen[0]["ood_flagged"]]), "",
          "Routing confusion, summed over seeds (rows: true dataset, columns: routed to):", "",
          table(["true \\ routed"] + list(a.datasets),
                [[d] + [int(v) for v in row] for d, row in
                 zip(a.datasets, np.sum([r["routing_confusion"] for r in gen], axis=0).tolist())]), "",
          "Verdict rule: 'helps'/'hurts' when both the ACC and the AUC means move the same way by more than one "
          "standard deviation of the specialists' seeds (at least 0.005); otherwise 'no clear difference'."]
    write_results("generalist", {"command": command_line(), "machine": m, "args": vars(a), "sizes": sizes,
                                 "sampling_weights": p.tolist(), "channels": channels, "runs": runs,
                                 "summary": summary, "total_seconds": total}, "\n".join(md))
    _plot(a, summary, RESULTS / "generalist.png")


def _verdict(ga, sa, gu, su) -> str:
    tol_a = max(0.005, mean_std(sa)[1])
    tol_u = max(0.005, mean_std(su)[1])
    da, du = mean_std(ga)[0] - mean_std(sa)[0], mean_std(gu)[0] - mean_std(su)[0]
    if da > tol_a and du > tol_u:
        return "generalist helps"
    if da < -tol_a and du < -tol_u:
        return "generalist hurts"
    return "no clear difference"


def _plot(a, summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    x = np.arange(len(a.datasets))
    for i, metric in enumerate(("acc", "auc")):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, arm in enumerate(("specialist", "generalist")):
            m = [summary[d][f"{arm}_{metric}"][0] for d in a.datasets]
            s = [summary[d][f"{arm}_{metric}"][1] for d in a.datasets]
            ax.bar(x + (j - 0.5) * 0.38, m, 0.38, yerr=s, capsize=3, label=arm)
        ax.set_xticks(x, [d.replace("mnist", "") for d in a.datasets])
        ax.set_ylim(0.4, 1.0)
        ax.set_title(f"test {metric.upper()} (mean ± std, {len(a.seeds)} seeds)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format="png")


if __name__ == "__main__":
    main()
