"""How fast medmix trains and infers on this CPU, and how long until a model is good: throughput, the loop's
speed knobs measured on and off, int8 inference, and time to accuracy beside the reference models.

    python benchmarks/speed.py [--parts train knobs infer tta] [--data-dir ~/medmnist] [--reuse] [--report-only]

Writes results/speed.{json,md,png}. Each part caches its measurement in runs/bench/speed/<part>.json, so parts can
run at different times (``--report-only`` tabulates what is there); timings are only comparable within one part,
which measures everything it compares side by side in one process (round-robin), and within one CPU kind (the
machine line names it: AVX2, AVX-512 BF16 or AMX).

* ``train``: training images/s of the default model, ``resnet18_28``, ``medvit_small`` and ``cnn_transformer``
  through the very step ``medmix train`` runs (``engine.SingleTask``: augmentation, model, loss; Adam and the
  per-step schedule as ``training.fit`` builds them) on real BreastMNIST images, fp32 and (where the CPU has native
  bf16) bf16; achieved FLOP/s (6 x MACs per image) against the matmul peak of that precision measured in the same
  run; the ratio to ``resnet18_28`` at the same precision.
* ``knobs``: the default model's step with each speed option on and off: fused or per-parameter Adam, channels_last,
  batch size, ``torch.compile`` (its compile time counted), threads, precision.
* ``infer``: batch and single-image inference of the default model trained on each real set (the ``tta`` part's
  seed-0 run): torch fp32/bf16, ONNX Runtime fp32 and int8 (``medmix export --int8``), with the test ACC/AUC of each.
* ``tta`` (time to accuracy): val ACC against wall-clock time, per epoch, for the default recipe (3 seeds), the
  official MedMNIST ResNet-18 (28) recipe in the precision medmix picks, and MedViT-S with the MedViT paper's recipe
  (epochs capped on the larger sets: a full run takes hours here). The time to accuracy is the wall time (training
  plus the per-epoch validation) until the default recipe's val ACC first reaches the best val ACC of the
  ``resnet18_28`` run on the same set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import DEFAULT_DATA, RESULTS, command_line, fmt, machine, recipe, table, train_or_reuse, write_results

CACHE = Path("runs/bench/speed")
SETS = ("breastmnist", "retinamnist", "pneumoniamnist")
DEFAULT_MODEL = "hybrid_mixer_small"
# (label, model, recipe, seeds, epochs per set or None for the recipe's own)
TTA_RUNS = (
    ("default", DEFAULT_MODEL, "medmix", (0, 1, 2), {}),
    ("resnet18_28", "resnet18_28", "medmnist_official", (0,), {"pneumoniamnist": 30}),
    ("medvit_small", "medvit_small", "medvit_paper", (0,), {"retinamnist": 20, "pneumoniamnist": 8}),
)
TTA_LABELS = {"default": f"{DEFAULT_MODEL} (medmix defaults)",
              "resnet18_28": "resnet18_28 (official MedMNIST recipe, medmix's precision)",
              "medvit_small": "medvit_small (MedViT paper recipe)"}


def save_part(name: str, doc: dict) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    from medmix.training import jsonable

    (CACHE / f"{name}.json").write_text(json.dumps(jsonable(doc), indent=2))


def load_part(name: str) -> dict | None:
    p = CACHE / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ----------------------------------------------------------------------------------------------- time to accuracy
def curve(run_dir: Path) -> dict:
    """Per epoch: cumulative wall seconds (training plus validation) and the val metrics, from the run's log."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    t, out = 0.0, {"epoch": [], "seconds": [], "val_acc": [], "val_auc": [], "train_img_s": []}
    for r in rows:
        t += float(r["epoch_seconds"])
        for k, v in (("epoch", r["epoch"]), ("seconds", t), ("val_acc", r["val_acc"]), ("val_auc", r["val_auc"]),
                     ("train_img_s", r["train_img_s"])):
            out[k].append(v)
    return out


def time_to(c: dict, target: float) -> float | None:
    return next((s for s, a in zip(c["seconds"], c["val_acc"]) if a >= target - 1e-12), None)


def part_tta(a) -> dict:
    from medmix.data.medmnist import file_name

    runs = []
    for ds in SETS:
        if not (Path(a.data_dir) / file_name(ds, 28)).is_file():
            print(f"{ds}: not in {a.data_dir}, skipped", file=sys.stderr)
            continue
        for label, model, rec, seeds, epochs in TTA_RUNS:
            for seed in seeds:
                kw = recipe(rec, epochs=epochs.get(ds))
                if rec == "medmnist_official":
                    kw["precision"] = "auto"
                out = CACHE / "tta" / f"{ds}-{label}-s{seed}"
                r = train_or_reuse(out, a.reuse, dataset=ds, data_dir=a.data_dir, model=model, seed=seed,
                                   **{"patience": kw.get("epochs", 30), **kw})
                c = curve(out)
                runs.append({"dataset": ds, "label": label, "model": model, "recipe": rec, "seed": seed,
                             "epochs": len(c["epoch"]), "train_seconds": r.seconds, "precision": r.precision,
                             "best_val_acc": max(c["val_acc"]), "test_acc": r.test["acc"], "test_auc": r.test["auc"],
                             "curve": c})
                print(f"{ds} {label} seed {seed}: {len(c['epoch'])} epochs {r.seconds:.0f} s, best val ACC "
                      f"{max(c['val_acc']):.3f}", file=sys.stderr, flush=True)
    return {"machine": machine(), "runs": runs}


def tta_summary(doc: dict) -> tuple[list[dict], str]:
    rows, lines = [], []
    for ds in SETS:
        mine = [r for r in doc["runs"] if r["dataset"] == ds]
        ref = next((r for r in mine if r["label"] == "resnet18_28"), None)
        if ref is None:
            continue
        target = ref["best_val_acc"]
        for label in ("default", "resnet18_28", "medvit_small"):
            rs = [r for r in mine if r["label"] == label]
            if not rs:
                continue
            hits = [time_to(r["curve"], target) for r in rs]
            reached = [h for h in hits if h is not None]
            rows.append({"dataset": ds, "label": label, "target": target, "n_seeds": len(rs),
                         "seconds_to_target": hits,
                         "median_seconds_to_target": statistics.median(reached) if len(reached) == len(rs) else None,
                         "best_val_acc": [r["best_val_acc"] for r in rs],
                         "train_seconds": [r["train_seconds"] for r in rs],
                         "epochs": [r["epochs"] for r in rs], "precision": rs[0]["precision"]})
    md_rows = []
    for r in rows:
        hits = r["seconds_to_target"]
        when = ", ".join("never" if h is None else f"{h:.0f}" for h in hits)
        md_rows.append([r["dataset"], TTA_LABELS[r["label"]], r["n_seeds"], f"{r['target']:.3f}",
                        fmt(r["best_val_acc"]), when, fmt(r["train_seconds"], 0), "/".join(map(str, r["epochs"])),
                        r["precision"]])
    lines = [table(["set", "model (recipe)", "seeds", "target val ACC (best of resnet18_28)", "best val ACC",
                    "s to target, per seed", "run s", "epochs", "precision"], md_rows)]
    return rows, "\n".join(lines)


def tta_figure(doc: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sets = [ds for ds in SETS if any(r["dataset"] == ds for r in doc["runs"])]
    fig = Figure(figsize=(5 * len(sets), 4))
    FigureCanvasAgg(fig)
    colours = {"default": "tab:blue", "resnet18_28": "tab:red", "medvit_small": "tab:green"}
    for i, ds in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), i + 1)
        ref = next((r for r in doc["runs"] if r["dataset"] == ds and r["label"] == "resnet18_28"), None)
        for r in (r for r in doc["runs"] if r["dataset"] == ds):
            c = r["curve"]
            ax.plot(c["seconds"], c["val_acc"], color=colours[r["label"]], lw=1.2, alpha=0.8,
                    label=TTA_LABELS[r["label"]] if r["seed"] == 0 else None)
        if ref is not None:
            ax.axhline(ref["best_val_acc"], color="grey", ls="--", lw=0.8, label="best val ACC of resnet18_28")
        ax.set_xscale("log")
        ax.set_xlabel("wall-clock seconds (training + validation)")
        ax.set_ylabel("val ACC")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------- the command
PARTS = {"tta": part_tta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=tuple(PARTS), default=list(PARTS))
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--reuse", action="store_true", help="read finished runs and measured parts, resume the rest")
    ap.add_argument("--report-only", action="store_true", help="measure nothing; tabulate the cached parts")
    a = ap.parse_args()

    from medmix.inference import set_threads

    set_threads()
    if not a.report_only:
        for p in a.parts:
            t0 = time.perf_counter()
            doc = PARTS[p](a)
            doc["seconds"] = time.perf_counter() - t0
            doc["command"] = command_line()
            save_part(p, doc)
    report()


def report() -> None:
    parts = {p: load_part(p) for p in PARTS}
    md = ["# Speed on this CPU: training, inference, time to accuracy", "",
          f"Command: `python benchmarks/speed.py` (parts run separately: {', '.join(p for p in parts if parts[p])})",
          ""]
    doc: dict = {"parts": parts}
    if parts.get("tta"):
        d = parts["tta"]
        rows, text = tta_summary(d)
        doc["time_to_accuracy"] = rows
        md += ["## Time to accuracy", "", f"Machine: {d['machine']['description']}. Measured in {d['seconds']:.0f} s "
               f"(runs reused from earlier invocations count their own time).", "", text, "",
               "Wall time is the sum of the logged epoch times (training and the per-epoch validation); it leaves "
               "out data loading and model building (about a second). One seed for the reference runs (their cost), "
               "three for the default recipe. Capped epochs: resnet18_28 on PneumoniaMNIST 30 of the recipe's 100 "
               "(its step schedule scaled to 30); medvit_small 20 on RetinaMNIST and 8 on PneumoniaMNIST of the "
               "paper's 50 (cosine over the shortened run).", "", "![time to accuracy](speed.png)", ""]
        tta_figure(d, RESULTS / "speed.png")
    write_results("speed", doc, "\n".join(md))


if __name__ == "__main__":
    main()
