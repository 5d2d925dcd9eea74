"""Foreign-modality warning: what share of each other modality does the deployed rule flag, per model?

    python benchmarks/ood.py [--data-dir ~/medmnist] [--datasets breastmnist pneumoniamnist retinamnist] [--reuse]

Models (seed 0): the one ``medmix quickstart`` trains (its recipe, embedded BreastMNIST), and the package's default
model on each real set found in the data dir, trained into runs/bench/ood/<name> (``--reuse``: a finished run is
read back). Each is asked through :class:`medmix.predict.Predictor`, exactly as ``predict`` / ``explain`` / ``serve``
answer: ``in_distribution`` false when the model's own feature score, the modality gate or the blank guard flags
the image (:mod:`medmix.ood`, :mod:`medmix.modality`; thresholds fixed on the val split at training end).

Images, converted like ``predict`` converts a user's file (channels matched, resized to the model's size):

* own: the model's test split (the goal: at most 5 % flagged);
* other modalities (the goal: at least 95 % of each flagged): the test splits of the other MedMNIST files, MedNIST's
  test split (medmix's seed-0 split, ``--mednist-n`` per class; these were not seen by the gate, which trained on
  the train split), the DICOM test files pydicom ships (CT, MR, ultrasound and others; single-frame ones, decoded by
  medmix's DICOM path), and 600 random crops of pictures the gate never saw;
* same modality from another source (reported, not counted): MedNIST chest X-rays for a PneumoniaMNIST model;
* Gaussian noise and constant images.

Per set: the share flagged by the deployed rule, and by the model's own score and the gate alone (each at its
deployed threshold). Writes results/ood.{json,md}.

Threshold rule, checked on val only (``--halves``): each run's val images are split at random into halves many
times; the gate's and the own score's thresholds are placed on one half by a rule and the share flagged is counted
on the other half. Rules: ``plain`` (the ``ceil(tpr * n)``-th held-out score: keeps exactly 95 % of the images it
was placed on) and ``conformal`` (the ``ceil(tpr * (n + 1))``-th, what :func:`medmix.ood.threshold_at_tpr` uses).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _common import DEFAULT_DATA, ROOT, command_line, machine, table, train_or_reuse, write_results

DATASETS = ("breastmnist", "pneumoniamnist", "retinamnist")
MODALITY = {"breastmnist": "breast ultrasound", "pneumoniamnist": "chest X-ray", "retinamnist": "retinal fundus photo"}
MEDNIST = {"AbdomenCT": "abdomen CT", "BreastMRI": "breast MRI", "CXR": "chest X-ray", "ChestCT": "chest CT",
           "Hand": "hand X-ray", "HeadCT": "head CT"}


def foreign_sets(data_dir: Path, mednist_n: int) -> dict[str, tuple[str, list]]:
    """{set name: (modality, raw images or DICOM paths)} of everything that is not one particular model's own."""
    from medmix.data import load_dataset
    from medmix.data.medmnist import file_name

    sets: dict[str, tuple[str, list]] = {}
    for ds, modality in MODALITY.items():
        if (data_dir / file_name(ds, 28)).is_file():
            test = load_dataset(ds, data_dir=str(data_dir), size=28).splits["test"]
            sets[f"{ds} test"] = (modality, list(test.images.permute(0, 2, 3, 1).numpy()))
    if (data_dir / "mednist.npz").is_file():
        b = load_dataset("mednist", data_dir=str(data_dir), size=64, seed=0)
        te = b.splits["test"]
        y = te.labels.reshape(len(te.labels), -1)[:, 0].numpy()
        rng = np.random.default_rng(0)
        for k, c in enumerate(b.info.class_names):
            idx = np.sort(rng.choice(np.flatnonzero(y == k), size=min(mednist_n, int((y == k).sum())), replace=False))
            sets[f"MedNIST {c} (test)"] = (MEDNIST[c], list(te.images[idx, 0].numpy()))
    import pydicom
    from pydicom.data import get_testdata_files

    by_mod: dict[str, list] = {}
    for f in sorted(get_testdata_files("*.dcm")):
        try:
            d = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - pydicom's deliberately broken test files
            continue
        if "PixelData" in d or d.get("Rows"):
            by_mod.setdefault(str(d.get("Modality", "?")), []).append(f)
    for mod, files in sorted(by_mod.items()):
        if mod in ("CT", "MR", "US", "CR", "DX", "MG", "NM", "OT", "RG", "XA", "PT"):
            sets[f"pydicom test files, {mod}"] = (f"DICOM {mod}", files)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from modality_gate import EVAL_PHOTOS, crops

    sets["pictures the gate never saw"] = ("natural photo", list(crops(EVAL_PHOTOS, 600, 3).permute(0, 2, 3, 1)
                                                                 .numpy()))
    return sets


def synthetic(n_channels: int, side: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mu, sd = rng.uniform(32, 224, (n, 1, 1, 1)), rng.uniform(10, 80, (n, 1, 1, 1))
    noise = np.clip(rng.normal(mu, sd, (n, n_channels, side, side)), 0, 255).round().astype(np.uint8)
    levels = np.linspace(0, 255, 32).round()[:, None, None, None]
    const = np.ascontiguousarray(np.broadcast_to(levels, (32, n_channels, side, side)).astype(np.uint8))
    return {"Gaussian noise": noise, "constant images": const}


def rates(pred, images) -> dict:
    _, res = pred.logits_and_ood(images)
    flag = np.array([not r["in_distribution"] for r in res])
    own = np.array(["features" in r.get("flagged_by", []) for r in res])
    gate = np.array([r.get("modality_match") is False for r in res])
    looks = {}
    for r in res:
        looks[r.get("looks_like", "-")] = looks.get(r.get("looks_like", "-"), 0) + 1
    return {"n": len(res), "flagged": float(flag.mean()), "by_features": float(own.mean()),
            "by_gate": float(gate.mean()), "looks_like": max(looks, key=looks.get) if looks else "-"}


def rank_threshold(scores: np.ndarray, tpr: float, rule: str, passed: np.ndarray | None = None) -> float:
    """``conformal``: medmix's own :func:`medmix.ood.threshold_at_tpr`; ``plain``: the same with the
    ``ceil(tpr * n)``-th score, the rule it replaced."""
    from medmix.ood import threshold_at_tpr

    if rule == "conformal":
        return threshold_at_tpr(scores, tpr, passed=passed)
    s = np.sort(scores if passed is None or not passed.any() else scores[passed])
    return float(s[min(len(s) - 1, max(0, int(np.ceil(tpr * len(scores))) - 1))])


def val_halves(pred, images, n_splits: int, seed: int = 0) -> dict:
    """Mean share of held-out val halves flagged (own score or gate) with thresholds placed on the other half."""
    from medmix.ood import GATE_TPR, TPR

    _, res = pred.logits_and_ood(images)
    own = np.array([r["ood_score"] for r in res], dtype=np.float64)
    gate = np.array([r.get("modality_score", -np.inf) for r in res], dtype=np.float64)
    rng = np.random.default_rng(seed)
    out = {}
    for rule in ("plain", "conformal"):
        flagged = []
        for _ in range(n_splits):
            perm = rng.permutation(len(own))
            a, b = perm[:len(own) // 2], perm[len(own) // 2:]
            tg = rank_threshold(gate[a], GATE_TPR, rule)
            to = rank_threshold(own[a], TPR, rule, passed=gate[a] <= tg)
            flagged.append(float(((gate[b] > tg) | (own[b] > to)).mean()))
        out[rule] = {"mean": float(np.mean(flagged)), "std": float(np.std(flagged))}
    out["n_val"] = len(own)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--mednist-n", type=int, default=500, help="MedNIST test images per class")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--halves", type=int, default=1000, help="random val half-splits of the threshold-rule check")
    a = ap.parse_args()

    import torch

    from medmix.data.medmnist import ASSETS, file_name
    from medmix.inference import set_threads
    from medmix.predict import Predictor
    from medmix.quickstart import quickstart

    set_threads()
    data_dir = Path(a.data_dir).expanduser()
    t0 = time.perf_counter()
    root = ROOT / "runs" / "bench" / "ood"
    models: list[tuple[str, str, Path]] = []
    qs = root / "quickstart"
    if not (a.reuse and (qs / "metrics.json").is_file()):
        quickstart(out=str(qs), quiet=True)
    models.append(("quickstart (BreastMNIST, embedded)", "breastmnist", qs))
    for ds in a.datasets:
        if (data_dir / file_name(ds, 28)).is_file():
            out = root / f"{ds}-s0"
            train_or_reuse(out, a.reuse, dataset=ds, data_dir=str(data_dir), seed=0)
            models.append((f"default model, {ds}", ds, out))
    foreign = foreign_sets(data_dir, a.mednist_n)
    results = []
    for title, ds, run in models:
        pred = Predictor(run)
        own_modality = MODALITY[ds]
        src = str(ASSETS) if "embedded" in title else str(data_dir)
        from medmix.run import Run

        bundle = Run.load(run).training_data(src)
        test = bundle.splits["test"]
        halves = val_halves(pred, bundle.splits["val"].images, a.halves)
        rows = {"own test split": {"modality": own_modality, "kind": "own", **rates(pred, test.images)}}
        for name, (modality, items) in foreign.items():
            if name.startswith(ds):
                continue
            loaded, skipped = [], 0
            for i, x in enumerate(items):
                try:
                    loaded.append(pred.load(x, f"{name}[{i}]"))
                except Exception:  # noqa: BLE001 - multi-frame or undecodable DICOM: refused with one line
                    skipped += 1
            if not loaded:
                continue
            kind = "same modality" if modality == own_modality else "other modality"
            rows[name] = {"modality": modality, "kind": kind, "skipped": skipped,
                          **rates(pred, torch.stack(loaded))}
        side = int(pred.meta["data_size"])
        for name, arr in synthetic(pred.info.n_channels, side, 200).items():
            rows[name] = {"modality": "synthetic", "kind": "synthetic", **rates(pred, torch.from_numpy(arr))}
        others = {k: v for k, v in rows.items() if v["kind"] == "other modality"}
        worst = min(others, key=lambda k: others[k]["flagged"]) if others else None
        met = bool(rows["own test split"]["flagged"] <= 0.05 and all(v["flagged"] >= 0.95 for v in others.values()))
        gate_block = (pred.meta.get("ood") or {}).get("gate") or {}
        res = {"model": title, "dataset": ds, "run": str(run.relative_to(ROOT)), "arch": pred.meta["model"],
               "test_acc": (pred.meta.get("test_metrics") or {}).get("acc"), "goal_met": met, "worst": worst,
               "own_threshold": pred.ood.threshold if pred.ood else None,
               "gate_threshold": gate_block.get("threshold"), "gate_modalities": gate_block.get("modalities"),
               "val_halves": halves, "sets": rows}
        results.append(res)
        print(f"{title}: own flagged {rows['own test split']['flagged']:.3f}; worst other "
              f"{worst} {others[worst]['flagged'] if worst else float('nan'):.3f}", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0

    m = machine()
    md = ["# Foreign-modality warning: the deployed rule per model and modality", "",
          f"Command: `{command_line()}`  ", f"Machine: {m['description']}; total {total / 60:.1f} min.", "",
          ("Flagged = `in_distribution` false as `medmix predict` reports it: the model's own feature score "
           "(Mahalanobis), the modality gate (a Gaussian per run on the shipped ModalityNet's features) or the blank "
           "guard. Thresholds were fixed on each run's val split at training end at the split-conformal rank: "
           "a new image like the val images passes both with probability at least 95 %. Goal: at most 5 % of the "
           "model's own test images flagged, at least 95 % of every other modality's."), "",
          table(["model", "test ACC", "own test flagged", "other modalities: lowest flagged (set)", "goal met"],
                [[r["model"], f"{r['test_acc']:.3f}" if r["test_acc"] is not None else "-",
                  f"{r['sets']['own test split']['flagged']:.1%}",
                  f"{r['sets'][r['worst']]['flagged']:.1%} ({r['worst']})" if r["worst"] else "-",
                  "yes" if r["goal_met"] else "no"] for r in results]), "",
          "## Threshold rule, checked on val halves only", "",
          (f"Each run's val split halved at random {a.halves} times; thresholds placed on one half (gate at 98 %, "
           "then the own score so that both keep 95 %), share of the other half flagged (mean ± std). The target "
           "is 5 %. `plain`: the ceil(0.95 n)-th score; `conformal`: the ceil(0.95 (n + 1))-th, the deployed rule."),
          "",
          table(["model", "val images", "plain", "conformal (deployed)"],
                [[r["model"], r["val_halves"]["n_val"]]
                 + [f"{r['val_halves'][k]['mean']:.1%} ± {r['val_halves'][k]['std']:.1%}"
                    for k in ("plain", "conformal")] for r in results]), ""]
    for r in results:
        md += [f"## {r['model']} (`{r['arch']}`, run `{r['run']}`)", "",
               f"Thresholds: own score {r['own_threshold']:.4g}, gate {r['gate_threshold']:.4g}; the gate sees "
               f"the training images as {r['gate_modalities']}." if r["gate_threshold"] is not None else
               "No modality gate in this checkpoint.", "",
               table(["images", "modality", "n", "flagged", "by own score", "by gate", "gate: mostly looks like"],
                     [[name, v["modality"] + ("" if v["kind"] != "same modality" else " (same modality)"),
                       v["n"], f"{v['flagged']:.1%}", f"{v['by_features']:.1%}", f"{v['by_gate']:.1%}",
                       v["looks_like"]] for name, v in r["sets"].items()]), ""]
    write_results("ood", {"command": command_line(), "machine": m, "total_seconds": total, "results": results},
                  "\n".join(md))


if __name__ == "__main__":
    main()
