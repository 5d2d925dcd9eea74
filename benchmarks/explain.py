"""Which Grad-CAM method is faithful, and is the heat on the image border the model's evidence? Measured with ROAD.

    python benchmarks/explain.py [--datasets breastmnist pneumoniamnist retinamnist] [--images 200] [--reuse]

Writes results/explain.{json,md}. For each set the default model is trained with medmix's defaults (seed 0; with
``--reuse`` a finished run in runs/bench/explain is read back). On the first ``--images`` images of ``--split``
(default val: the default method is a choice, so it is made off the test split), each method
of ``medmix explain`` explains the predicted class, and each map is scored with pytorch-grad-cam's ROAD
(remove-and-debias, Rong et al. 2022; ``ROADCombined`` over removal percentiles 20/40/60/80: half the drop in the
class's softmax score when the least relevant pixels are imputed away minus when the most relevant are; higher =
the map ranks pixels by what the model uses). Three reference maps with no model behind them are scored the same
way: uniform noise, a centred Gaussian blob (the anatomy's usual place) and a border ring. If the methods' heat
on the border were an artefact (zero padding, the coarse token grid, upsampling), the border ring would score below
the centred blob; if the ring scores as high as the methods do, the border carries what the model uses.

Also reported: the share of each map's mass in the outer ring of ``--ring`` pixels (the ring's share of the image
area is the value of a flat map) and the share of images whose hottest pixel lies in that ring.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _common import DEFAULT_DATA, command_line, machine, table, write_results

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist", "retinamnist"])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--split", default="val", choices=["val", "test"], help="images the maps are scored on")
    ap.add_argument("--ring", type=int, default=3, help="border ring width in pixels (28 px images: 3)")
    ap.add_argument("--out", default="runs/bench/explain")
    ap.add_argument("--reuse", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows, doc = [], {"command": command_line(), "machine": machine(), "percentiles": PERCENTILES, "ring": a.ring,
                     "sets": {}}
    for name in a.datasets:
        run = Path(a.out) / f"{name}-hybrid_mixer_small-s0"
        if not (a.reuse and (run / "best_model.pth").is_file()):
            train(dataset=name, data_dir=a.data_dir, seed=0, out=str(run), overwrite=True, quiet=True)
        p = Predictor(run)
        from medmix.run import Run

        bundle = Run.load(run).training_data(a.data_dir)
        images = bundle.splits[a.split].images[:a.images]
        x = p.transform(images).contiguous()
        classes = p.probabilities(images).argmax(1).tolist()
        h, w = x.shape[-2:]
        maps = {m: cam_array(p.model, x, classes, method=m) for m in METHODS}
        maps.update(reference_maps(len(x), h, w, a.ring, 0))
        area = 1.0 - (h - 2 * a.ring) * (w - 2 * a.ring) / (h * w)
        per = {}
        for method, mp in maps.items():
            s = road_scores(p.model, x, mp, classes)
            mass, peak = ring_stats(mp, a.ring)
            per[method] = {"road": float(s.mean()), "road_sem": float(s.std(ddof=1) / np.sqrt(len(s))),
                           "ring_mass": mass, "ring_peak": peak}
            rows.append([name, method + (" (default)" if method == DEFAULT_METHOD else ""),
                         f"{s.mean():.4f} ± {s.std(ddof=1) / np.sqrt(len(s)):.4f}", f"{mass:.2f}", f"{peak:.2f}"])
        doc["sets"][name] = {"run": str(run), "n_images": len(x), "img_size": int(h), "ring_area_share": area,
                             "methods": per}
        print(name, {k: round(v["road"], 4) for k, v in per.items()}, flush=True)
    md = [f"# Grad-CAM faithfulness (ROAD) and border heat (`{command_line()}`)", "",
          f"Machine: {doc['machine']['description']}. Default model (hybrid_mixer_small, medmix's defaults, seed 0) "
          f"per set; the first {a.images} {a.split} images; each method explains the predicted class. ROAD combined "
          f"over removal percentiles {PERCENTILES} (mean ± standard error over images; higher is more faithful). "
          f"Ring: the outer {a.ring} px, whose share of the image area is "
          + ", ".join(f"{v['ring_area_share']:.2f} ({k})" for k, v in doc["sets"].items()) + ".", "",
          table(["set", "method", "ROAD (higher better)", "mass in border ring", "maximum in border ring"], rows), ""]
    write_results("explain", doc, "\n".join(md))


if __name__ == "__main__":
    main()
