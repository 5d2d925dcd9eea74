"""The recipe kit on the real MedMNIST sets: default model, tuned single model, ensemble, distilled model, beside
the reference rows measured here and the published ones.

    python benchmarks/kit.py [--datasets breastmnist] [--budget 10m] [--seeds 0 1 2] [--data-dir ~/medmnist] [--reuse]
    python benchmarks/kit.py --recorded-recipes --reuse --keep-committed --only-reuse default distilled
        # the later rows again from the committed recipes (no study), keeping the committed default/distilled rows

Per set, in order (every choice made on the validation split; the test split is read once per reported run):

1. ``default``: the package defaults, one run per seed;
2. ``tuned``: ``medmix tune`` for ``--budget`` (a study stored under runs/bench/kit/<set>/tune; with ``--reuse`` a
   finished study is not extended), then its best recipe trained once per seed with ``train --config``;
3. ``ensemble``: the tuned runs of all seeds averaged with test-time views chosen on val (``medmix ensemble
   --tta auto``); one ensemble per set, so it has no spread over seeds;
4. ``distilled``: the default model trained with the ensemble as ``--teacher``, one run per seed;
5. ``distilled_tuned``: the tuned recipe trained with the ensemble as ``--teacher``, without the ensemble's
   test-time views (``--teacher-views identity``: one pass per member and step), one run per seed (a student of
   the members' own size, so of their cost).

Each row gives test ACC / AUC (mean ± std over seeds), the training time per run (the tuning time separately), and
the inference cost of the model the row stands for: MACs per image and torch images/s (batch 256, the run's
precision). Writes results/kit.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import DEFAULT_DATA, RESULTS, command_line, fmt, machine, table, train_or_reuse, write_results

ROOT = Path("runs/bench/kit")
KINDS = ("default", "tuned", "ensemble", "distilled", "distilled_tuned")
REFERENCE = "medmnist_table"  # the reference rows measured here (benchmarks/medmnist_table.py)


def cost(run_dir: Path, data_dir: str) -> tuple[float | None, float]:
    """MACs per image and torch batch-256 images/s of a run's model (median of 5 passes)."""
    import torch

    from medmix.catalog import count_macs
    from medmix.inference import predict_logits, resolve_precision
    from medmix.run import Run

    run = Run.load(run_dir)
    model = run.build_model()
    macs = count_macs(model, int(run.meta["img_size"]), run.task.n_channels)
    images = run.training_data(data_dir).splits["test"].images
    batch = images[torch.arange(256) % len(images)]
    tf, p = run.transform(), resolve_precision(run.meta.get("precision", "fp32"))
    predict_logits(model, batch, tf, 256, p)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        predict_logits(model, batch, tf, 256, p)
        times.append(time.perf_counter() - t)
    return macs, 256 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["breastmnist", "retinamnist", "pneumoniamnist"])
    ap.add_argument("--budget", default="10m", help="tuning budget per set")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--only-reuse", nargs="*", default=[], choices=["default", "distilled", "distilled_tuned"],
                    help="rows of these kinds are tabulated from finished runs only; none is trained")
    ap.add_argument("--keep-committed", action="store_true",
                    help="keep the committed results/kit.json rows this command does not produce (other sets, "
                         "or kinds left out by --only-reuse)")
    ap.add_argument("--recorded-recipes", action="store_true",
                    help="take each set's tuned recipe and tuning figures from the committed results/kit.json "
                         "instead of running (or reading) a study: rebuilds the later rows on another machine")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: rewrite results/kit.{md,png} from the committed results/kit.json rows")
    a = ap.parse_args()
    if a.table_only:
        a.datasets, a.keep_committed = [], True

    from medmix.data.medmnist import file_name
    from medmix.ensemble import make_ensemble
    from medmix.inference import set_threads
    from medmix.tune import tune

    set_threads()
    rows, t_all = [], time.perf_counter()
    committed = json.loads((RESULTS / "kit.json").read_text()).get("rows", []) if (
        (a.keep_committed or a.recorded_recipes) and (RESULTS / "kit.json").is_file()) else []
    for ds in a.datasets:
        if not (Path(a.data_dir) / file_name(ds, 28)).is_file():
            print(f"{ds}: not in {a.data_dir}, skipped", file=sys.stderr)
            continue
        base = ROOT / ds

        def record(kind: str, runs: list, dirs: list[Path], extra: dict | None = None) -> None:
            macs, img_s = cost(dirs[0], a.data_dir)  # every row of a set measured now, side by side
            rows.append({"dataset": ds, "kind": kind, "seeds": len(runs), "test_acc": [r.test["acc"] for r in runs],
                         "test_auc": [r.test["auc"] for r in runs], "val_acc": [r.val["acc"] for r in runs],
                         "val_auc": [r.val["auc"] for r in runs], "seconds": [r.seconds for r in runs],
                         "macs": macs, "infer_img_s": img_s, **(extra or {})})
            print(f"{ds} {kind}: test ACC {fmt(rows[-1]['test_acc'])} AUC {fmt(rows[-1]['test_auc'])}",
                  file=sys.stderr, flush=True)

        def seeded(kind: str, dirs: list[Path], **kw) -> None:
            """One run per seed into ``dirs``, then the row (left out when --only-reuse finds unfinished runs)."""
            runs = [train_or_reuse(d, a.reuse, reuse_only=kind in a.only_reuse, **{**kw, "data_dir": a.data_dir,
                                                                                   "seed": s})
                    for d, s in zip(dirs, a.seeds)]
            if all(r is not None for r in runs):
                record(kind, runs, dirs)
            else:
                print(f"{ds} {kind}: not all runs finished; row left out (--only-reuse {kind})", file=sys.stderr)

        seeded("default", [base / f"default-s{s}" for s in a.seeds], dataset=ds)

        recorded = [r for r in committed if r["dataset"] == ds and r["kind"] == "tuned"] if a.recorded_recipes else []
        if a.recorded_recipes and not recorded:
            raise SystemExit(f"kit.py: --recorded-recipes: results/kit.json has no tuned row of {ds}")
        if recorded:
            best, tuning = recorded[0]["recipe"], {k: recorded[0][k] for k in ("tune_trials", "tune_seconds")}
        else:
            study = base / "tune"
            t0 = time.perf_counter()
            if not (a.reuse and (study / "best.json").is_file()):
                tune(ds, budget=a.budget, out=study, data_dir=a.data_dir,
                     say=lambda s: print(f"  {ds} tune: {s}", file=sys.stderr, flush=True))
            summary = json.loads((study / "summary.json").read_text())
            best = json.loads((study / "best.json").read_text())
            best = {k: v for k, v in best.items() if k not in ("seed", "data_dir")}
            tuning = {"tune_trials": summary["n_complete"],
                      "tune_seconds": summary.get("seconds_this_process", time.perf_counter() - t0)}
        tdirs = [base / f"tuned-s{s}" for s in a.seeds]
        truns = [train_or_reuse(d, a.reuse, **{**best, "data_dir": a.data_dir, "seed": s}) for d, s in
                 zip(tdirs, a.seeds)]
        record("tuned", truns, tdirs, {"recipe": best, **tuning})

        ens = base / "ensemble"
        if not (a.reuse and (ens / "ensemble.json").is_file()):
            make_ensemble(tdirs, ens, tta="auto", data_dir=a.data_dir, overwrite=True)
        e = json.loads((ens / "ensemble.json").read_text())
        from types import SimpleNamespace

        # the ensemble's training time is its members' (the build itself, TTA choice included, is build_seconds)
        record("ensemble", [SimpleNamespace(test=e["test"], val=e["val"], seconds=sum(r.seconds for r in truns))],
               [ens], {"views": e["views"], "members": len(e["members"]), "build_seconds": e["seconds"]})

        seeded("distilled", [base / f"distilled-s{s}" for s in a.seeds], dataset=ds, teacher=str(ens))
        seeded("distilled_tuned", [base / f"distilled-tuned-s{s}" for s in a.seeds], **best, teacher=str(ens),
               teacher_views="identity")

    ref = json.loads((RESULTS / f"{REFERENCE}.json").read_text()) if (RESULTS / f"{REFERENCE}.json").is_file() else {}
    m = machine()
    for r in rows:
        r.setdefault("command", command_line())
        r.setdefault("machine", m["description"])
    ran = {(r["dataset"], r["kind"]) for r in rows}
    if a.keep_committed and (RESULTS / "kit.json").is_file():
        old = json.loads((RESULTS / "kit.json").read_text())
        for r in old.get("rows", []):
            if (r["dataset"], r["kind"]) not in ran:
                if r["kind"] == "ensemble" and "build_seconds" not in r:  # written before members' time counted
                    tuned = next(t for t in old["rows"] if t["dataset"] == r["dataset"] and t["kind"] == "tuned")
                    r["build_seconds"], r["seconds"] = r["seconds"][0], [sum(tuned["seconds"])]
                r.setdefault("command", old.get("command"))
                r.setdefault("machine", old.get("machine", {}).get("description"))
                rows.append(r)
    order = {k: i for i, k in enumerate(KINDS)}
    rows.sort(key=lambda r: order.get(r["kind"], len(order)))  # the table's order within each set
    sets = [d for d in dict.fromkeys([*a.datasets, *(r["dataset"] for r in rows)]) if any(
        r["dataset"] == d for r in rows)]
    md = ["# The recipe kit on MedMNIST (28 px): default, tuned, ensemble, distilled", "",
          f"Command: `{command_line()}`  ", f"Machine: {m['description']}; native bf16: {m['native_bf16']}. "
          f"Total {time.perf_counter() - t_all:.0f} s (reused runs count 0).", ""]
    for ds in sets:
        mine = [r for r in rows if r["dataset"] == ds]
        if not mine:
            continue
        out = [[r["kind"], r["seeds"], fmt(r["test_acc"]), fmt(r["test_auc"]), fmt(r["val_acc"]), fmt(r["val_auc"]),
                f"{statistics.median(r['seconds']):.0f}", f"{(r['macs'] or 0) / 1e6:.1f}", f"{r['infer_img_s']:,.0f}"]
               for r in mine]
        for s in references(ref, ds):
            out.append([f"reference: {s['model']} ({s['recipe']})", s["n_seeds"],
                        f"{s['test_acc'][0]:.3f} ± {s['test_acc'][1]:.3f}",
                        f"{s['test_auc'][0]:.3f} ± {s['test_auc'][1]:.3f}", "", "",
                        f"{s['median_seconds']:.0f}", "", ""])
        tuned = next((r for r in mine if r["kind"] == "tuned"), None)
        header = ["model", "seeds", "test ACC", "test AUC", "val ACC", "val AUC",
                  "train s/run (median; ensemble: members' sum)", "MMACs/img", "infer img/s (torch)"]
        md += [f"## {ds}", "", f"Measured by `{mine[0]['command']}` on {mine[0]['machine']}.", "",
               table(header, out), ""]
        if tuned:
            md += [f"Tuning: {tuned['tune_trials']} complete trials in {tuned['tune_seconds']:.0f} s; best recipe "
                   f"`{json.dumps(tuned['recipe'])}`.", ""]
    write_results("kit", {"command": command_line(), "machine": m, "rows": rows}, "\n".join(md))
    plot(rows, sets, ref)


def references(ref: dict, ds: str) -> list[dict]:
    """The reference rows of ``ds`` in results/medmnist_table.json (not the default model, which the kit has), each
    with the median of its runs' training seconds (the summary holds their mean)."""
    out = []
    for s in ref.get("summary", []):
        if s["dataset"] == ds and s["model"] != "hybrid_mixer_small":
            secs = [r["seconds"] for r in ref.get("runs", []) if (r["dataset"], r["model"], r["recipe"]) ==
                    (ds, s["model"], s["recipe"])]
            out.append({**s, "median_seconds": statistics.median(secs) if secs else s["seconds"][0]})
    return out


def plot(rows: list[dict], sets: list[str], ref: dict) -> None:
    """results/kit.png: test ACC against training time per run, one panel per set, kit rows beside the references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, ds in zip(axes[0], sets):
        for r in (r for r in rows if r["dataset"] == ds):
            acc, sec = r["test_acc"], r["seconds"]
            ax.errorbar(statistics.median(sec), statistics.mean(acc), yerr=statistics.stdev(acc) if len(acc) > 1
                        else 0, fmt="o", capsize=3, label=f"{r['kind']} ({r['seeds']} seed{'s' * (r['seeds'] > 1)})")
        for s in references(ref, ds):
            ax.errorbar(s["median_seconds"], s["test_acc"][0], yerr=s["test_acc"][1], fmt="s", capsize=3,
                        mfc="none", label=f"{s['model']} ({s['recipe']})")
        ax.set_xscale("log")
        ax.set_xlabel("training time per run, s (log; ensemble: its members' sum)")
        ax.set_ylabel("test ACC (mean ± std)")
        ax.set_title(ds)
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "kit.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
