"""Which Grad-CAM method is faithful, and is the heat on the image border the model's evidence? Measured with ROAD.

    python benchmarks/explain.py [--datasets breastmnist pneumoniamnist retinamnist] [--seeds 0 1 2] [--reuse]

Writes results/explain.{json,md,png}. For each set the default model is trained with medmix's defaults, once per
seed (with ``--reuse`` a finished run in runs/bench/explain is read back). On the first ``--images`` images of
``--split`` (default val: the default method is a choice, so it is made off the test split), each method of
``medmix explain`` explains the predicted class, and each map is scored with pytorch-grad-cam's ROAD
(remove-and-debias, Rong et al. 2022; ``ROADCombined`` over removal percentiles 20/40/60/80: half the drop in the
class's softmax score when the least relevant pixels are imputed away minus when the most relevant are; higher =
the map ranks pixels by what the model uses). Three reference maps with no model behind them are scored the same
way: uniform noise, a centred Gaussian blob (the anatomy's usual place) and a border ring. If the methods' heat
on the border were an artefact (zero padding, the coarse token grid, upsampling), the border ring would score below
the centred blob; if the ring scores as high as the methods do, the border carries what the model uses.

Also reported: the share of each map's mass in the outer ring of ``--ring`` pixels (the ring's share of the image
area is the value of a flat map) and the share of images whose hottest pixel lies in that ring.

The method with the highest ROAD averaged over the sets and seeds is reported as the one the default should be
(``chosen``); ``src/medmix/cam_methods.py`` holds the default itself.

A ground-truth check of ROAD itself (``--synthetic-seeds``): the one-quadrant task of the test suite
(tests/_quadrant.py: the label depends only on a blob in the top-right quadrant) is trained once per seed, and each
method's share of heatmap mass in that quadrant is reported beside its ROAD on the same maps, and beside the ROAD
of the true quadrant as a map. Where the two disagree, ROAD is not measuring localisation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from _common import DEFAULT_DATA, RESULTS, command_line, machine, table, write_results

from medmix.cam_methods import DEFAULT_METHOD, METHODS
from medmix.engine import train
from medmix.explain import cam_array
from medmix.predict import Predictor

PERCENTILES = [20, 40, 60, 80]


def reference_maps(n: int, h: int, w: int, ring: int, seed: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blob = np.exp(-(((yy - (h - 1) / 2) / (h / 4)) ** 2 + ((xx - (w - 1) / 2) / (w / 4)) ** 2) / 2)
    border = np.zeros((h, w), np.float32)
    border[:ring], border[-ring:], border[:, :ring], border[:, -ring:] = 1, 1, 1, 1
    rng = np.random.default_rng(seed)
    return {"(reference) uniform noise": rng.random((n, h, w), dtype=np.float32),
            "(reference) centred blob": np.repeat(blob[None], n, 0),
            "(reference) border ring": np.repeat(border[None], n, 0)}


def ring_stats(maps: np.ndarray, ring: int) -> tuple[float, float]:
    """Mean share of each map's mass in the outer ring; share of maps whose maximum lies in it."""
    inner = np.zeros(maps.shape[1:], bool)
    inner[ring:-ring, ring:-ring] = True
    mass = maps.reshape(len(maps), -1).sum(1)
    in_ring = maps[:, ~inner].sum(1) / np.maximum(mass, 1e-12)
    peak = np.unravel_index(maps.reshape(len(maps), -1).argmax(1), maps.shape[1:])
    on_ring = ~inner[peak]
    return float(np.mean(in_ring)), float(np.mean(on_ring))


def road_scores(model, x: torch.Tensor, maps: np.ndarray, classes: list[int]) -> np.ndarray:
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    metric = ROADCombined(percentiles=PERCENTILES)
    out = []
    for i in range(0, len(x), 32):
        targets = [ClassifierOutputSoftmaxTarget(k) for k in classes[i:i + 32]]
        with torch.no_grad():
            out.append(np.asarray(metric(x[i:i + 32], maps[i:i + 32], targets, model), dtype=np.float64))
    return np.concatenate(out)


def synthetic(seeds: list[int], steps: int = 40) -> dict:
    """Quadrant mass and ROAD per method on the test suite's one-quadrant task, one model per training seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _quadrant import KWARGS, MODEL, QUADRANT, SIDE, make_images, quadrant_mass, train_quadrant

    from medmix.data import BatchTransform
    from medmix.models import create_model

    held, held_labels = make_images(96, seed=5)
    truth = np.zeros((SIDE, SIDE), np.float32)
    truth[QUADRANT] = 1
    out: dict = {m: {"mass": [], "road": []} for m in METHODS}
    out["(reference) true quadrant"] = {"mass": [], "road": []}
    for seed in seeds:
        state, mean, std = train_quadrant(seed, steps)
        model = create_model(MODEL, **KWARGS)
        model.load_state_dict(state)
        model.eval()
        xt = BatchTransform(SIDE, mean, std)(torch.from_numpy(held[held_labels == 1])[:, None]).contiguous()
        classes = [1] * len(xt)
        maps = {m: cam_array(model, xt, 1, method=m) for m in METHODS}
        maps["(reference) true quadrant"] = np.repeat(truth[None], len(xt), 0)
        for m, mp in maps.items():
            out[m]["mass"].append(quadrant_mass(mp)["top-right"])
            out[m]["road"].append(float(road_scores(model, xt, mp, classes).mean()))
        print("synthetic seed", seed, {m: round(v["road"][-1], 3) for m, v in out.items()}, flush=True)
    return out


def figure(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(METHODS)
    sets = list(doc["sets"])
    fig, axes = plt.subplots(1, 2 if doc.get("synthetic") else 1, figsize=(12, 4), squeeze=False)
    ax = axes[0, 0]
    w = 0.8 / max(len(sets), 1)
    for j, name in enumerate(sets):
        per = doc["sets"][name]["methods"]
        ax.bar(np.arange(len(methods)) + j * w, [per[m]["road"] for m in methods], w,
               yerr=[per[m]["road_seed_std"] for m in methods], label=name, capsize=2)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(np.arange(len(methods)) + w * (len(sets) - 1) / 2, methods, rotation=20)
    ax.set_ylabel("ROAD (higher = more faithful)")
    ax.set_title(f"{doc['split']} split, mean ± std over seeds {doc['seeds']}")
    ax.legend(fontsize=8)
    if doc.get("synthetic"):
        ax = axes[0, 1]
        syn = doc["synthetic"]
        for m in methods:
            ax.scatter(syn[m]["mass"], syn[m]["road"], label=m, s=18)
        ax.axvline(0.25, color="grey", lw=0.5, ls="--")
        ax.set_xlabel("heatmap mass in the informative quadrant (0.25 = flat)")
        ax.set_ylabel("ROAD")
        ax.set_title("one-quadrant task, one point per training seed")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist", "retinamnist"])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the default model")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--split", default="val", choices=["val", "test"], help="images the maps are scored on")
    ap.add_argument("--ring", type=int, default=3, help="border ring width in pixels (28 px images: 3)")
    ap.add_argument("--synthetic-seeds", type=int, default=4, help="training seeds of the one-quadrant check; 0: skip")
    ap.add_argument("--out", default="runs/bench/explain")
    ap.add_argument("--reuse", action="store_true")
    a = ap.parse_args()
    from medmix.run import Run

    torch.manual_seed(0)
    rows, doc = [], {"command": command_line(), "machine": machine(), "percentiles": PERCENTILES, "ring": a.ring,
                     "split": a.split, "seeds": a.seeds, "sets": {}}
    for name in a.datasets:
        per_seed: dict[str, list[dict]] = {}
        for seed in a.seeds:
            run = Path(a.out) / f"{name}-hybrid_mixer_small-s{seed}"
            if not (a.reuse and (run / "best_model.pth").is_file()):
                train(dataset=name, data_dir=a.data_dir, seed=seed, out=str(run), overwrite=True, quiet=True)
            p = Predictor(run)
            bundle = Run.load(run).training_data(a.data_dir)
            images = bundle.splits[a.split].images[:a.images]
            x = p.transform(images).contiguous()
            classes = p.probabilities(images).argmax(1).tolist()
            h, w = x.shape[-2:]
            maps = {m: cam_array(p.model, x, classes, method=m) for m in METHODS}
            maps.update(reference_maps(len(x), h, w, a.ring, seed))
            for method, mp in maps.items():
                s = road_scores(p.model, x, mp, classes)
                mass, peak = ring_stats(mp, a.ring)
                per_seed.setdefault(method, []).append(
                    {"road": float(s.mean()), "road_sem": float(s.std(ddof=1) / np.sqrt(len(s))),
                     "ring_mass": mass, "ring_peak": peak})
            print(name, seed, {k: round(v[-1]["road"], 4) for k, v in per_seed.items()}, flush=True)
        per = {}
        for method, runs in per_seed.items():
            roads = [r["road"] for r in runs]
            per[method] = {"road": statistics.mean(roads),
                           "road_seed_std": statistics.stdev(roads) if len(roads) > 1 else 0.0,
                           "road_per_seed": roads, "road_sem_per_seed": [r["road_sem"] for r in runs],
                           "ring_mass": statistics.mean(r["ring_mass"] for r in runs),
                           "ring_peak": statistics.mean(r["ring_peak"] for r in runs)}
            m = per[method]
            rows.append([name, method + (" (current default)" if method == DEFAULT_METHOD else ""),
                         f"{m['road']:.4f} ± {m['road_seed_std']:.4f}",
                         " ".join(f"{v:.3f}" for v in roads), f"{m['ring_mass']:.2f}", f"{m['ring_peak']:.2f}"])
        area = 1.0 - (h - 2 * a.ring) * (w - 2 * a.ring) / (h * w)
        doc["sets"][name] = {"runs": [str(Path(a.out) / f"{name}-hybrid_mixer_small-s{s}") for s in a.seeds],
                             "n_images": len(x), "img_size": int(h), "ring_area_share": area, "methods": per}
    overall = {m: statistics.mean(doc["sets"][n]["methods"][m]["road"] for n in doc["sets"]) for m in METHODS}
    doc["overall_road"] = overall
    doc["chosen"] = max(overall, key=overall.get)
    summary = [[m + (" (current default)" if m == DEFAULT_METHOD else "")]
               + [f"{doc['sets'][n]['methods'][m]['road']:.3f}" for n in doc["sets"]] + [f"{overall[m]:.3f}"]
               for m in sorted(METHODS, key=overall.get, reverse=True)]
    md = [f"# Grad-CAM faithfulness (ROAD) and border heat (`{command_line()}`)", "",
          f"Machine: {doc['machine']['description']}. Default model (hybrid_mixer_small, medmix's defaults) per set, "
          f"trained once per seed {a.seeds}; the first {a.images} {a.split} images; each method explains the "
          f"predicted class. ROAD combined over removal percentiles {PERCENTILES} (higher is more faithful). "
          f"Ring: the outer {a.ring} px, whose share of the image area is "
          + ", ".join(f"{v['ring_area_share']:.2f} ({k})" for k, v in doc["sets"].items()) + ".", "",
          "## ROAD per method, mean over seeds", "",
          table(["method"] + list(doc["sets"]) + ["mean"], summary), "",
          f"Highest mean ROAD: **{doc['chosen']}**.", "",
          "## Per set (mean ± std over seeds; per-seed values; border ring statistics averaged over seeds)", "",
          table(["set", "method", "ROAD", "ROAD per seed", "mass in border ring", "maximum in border ring"], rows),
          ""]
    if a.synthetic_seeds > 0:
        syn = synthetic(list(range(a.synthetic_seeds)))
        doc["synthetic"] = syn
        md += ["## Ground truth: the one-quadrant task", "",
               f"hybrid_mixer_small trained for 40 steps per seed ({a.synthetic_seeds} seeds) on the test suite's "
               "task whose label depends only on a blob in the top-right quadrant; 48 held-out class-1 images. "
               "Mass: share of the heatmap in that quadrant (0.25 = a flat map).", "",
               table(["method", "quadrant mass per seed", "min mass", "ROAD per seed", "mean ROAD"],
                     [[m, " ".join(f"{v:.2f}" for v in syn[m]["mass"]), f"{min(syn[m]['mass']):.2f}",
                       " ".join(f"{v:.3f}" for v in syn[m]["road"]), f"{statistics.mean(syn[m]['road']):.3f}"]
                      for m in syn]), ""]
    write_results("explain", doc, "\n".join(md))
    figure(doc, RESULTS / "explain.png")


if __name__ == "__main__":
    main()
