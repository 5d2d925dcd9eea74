"""Where did the model look? Class-activation heatmaps (Grad-CAM and friends) built on ``pytorch-grad-cam``.

>>> from medmix.explain import explain
>>> r = explain("runs/quickstart", ["scan.png"], "explanations")[0]
>>> r["png"], r["label"], r["explained_class"], r["cam"].shape
('explanations/scan_gradcam.png', 'malignant', 'malignant', (28, 28))

Images are loaded and converted exactly like :class:`medmix.predict.Predictor` does (same decoding, resize,
normalisation and calibration temperature). The heatmap is taken at ``model.gradcam_layer``, the module whose
output is the model's last 2-D convolutional feature map: the last conv stage for the ResNets, the last conv stage
before tokenisation for the token mixer and the CNN-transformer, the last block of ``features`` for MedViT. A
layer that outputs tokens ``(B, N, D)`` is reshaped back to its 2-D grid (the model's own
``gradcam_reshape_transform`` if it has one, else a square grid, dropping a leading class token).

Each image gets a PNG panel: the input (enlarged with nearest-neighbour so a 28 px image stays readable), the
heatmap over it (the anatomy at full opacity, the map on top with an opacity rising with its value, outlines at 50 %
and 80 % of its maximum) with a colour bar that says what the values mean, and the top-k probabilities with the
explained class marked.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cam_methods import DEFAULT_METHOD, METHODS
from .errors import ConfigError
from .generalist_predictor import GeneralistPredictor
from .imaging import CAM_COLORMAP, CAM_LUT, as_inputs, cam_overlay, enlarged_rgb, ood_warning, resize_cam
from .inference import probabilities
from .paths import check_writable_dir
from .predict import Predictor, load_predictor

__all__ = ["DEFAULT_METHOD", "METHODS", "cam_array", "explain", "resolve_class", "target_layer", "tokens_to_map"]

PANEL_SIDE = 224  # the input is shown at least this many pixels wide
_CHUNK = 32  # images per Grad-CAM forward/backward pass


# ----------------------------------------------------------------------------------------------- the layer
def target_layer(model: nn.Module, x: torch.Tensor | None = None) -> nn.Module:
    """The Grad-CAM target: ``model.gradcam_layer``. A model without it (MedViT) gets the last block of
    ``model.features`` whose output map is at least 2x2 for the input ``x`` (MedViT's last stage is 1x1 at 28 px,
    which cannot localise anything), or simply the last block when no ``x`` is given."""
    layer = getattr(model, "gradcam_layer", None)
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(getattr(model, "backbone", None), nn.Module):  # a generalist: its shared backbone's layer
        return target_layer(model.backbone, x)
    feats = getattr(model, "features", None)
    if not isinstance(feats, nn.Sequential) or len(feats) == 0:
        raise ConfigError(f"{type(model).__name__} has no gradcam_layer: cannot choose a Grad-CAM target layer")
    if x is None:
        return feats[-1]
    sizes: list[tuple[int, ...]] = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(tuple(tokens_to_map(o).shape[-2:])))
             for b in feats]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return next((block for block, hw in zip(reversed(list(feats)), reversed(sizes)) if min(hw) >= 2), feats[-1])


def tokens_to_map(t: torch.Tensor) -> torch.Tensor:
    """``(B, N, D)`` tokens -> ``(B, D, h, w)`` on a square grid (a leading class token is dropped); 4-D maps pass
    through unchanged."""
    if t.ndim != 3:
        return t
    b, n, d = t.shape
    side = math.isqrt(n)
    if side * side != n:
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise ConfigError(f"cannot reshape {n} tokens into a square grid; give the model a "
                              f"gradcam_reshape_transform")
        t = t[:, 1:]
    return t.transpose(1, 2).reshape(b, d, side, side)


def _cam_class(method: str):
    if method not in METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; use one of {', '.join(METHODS)}")
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, METHODS[method])


# ----------------------------------------------------------------------------------------------- the heatmap
def cam_array(model: nn.Module, x: torch.Tensor, target_class: int | Sequence[int] | None = None, *,
              method: str = DEFAULT_METHOD, layer: nn.Module | None = None) -> np.ndarray:
    """Heatmaps ``(B, H, W)`` in [0, 1] at the input size for a normalised float batch ``x`` ``(B, C, H, W)``.

    ``target_class``: one class index for every image, one per image, or None for each image's highest logit.
    Each map is min-max scaled on its own (an all-zero map means no positive evidence for the class).
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if x.ndim != 4 or not torch.is_floating_point(x):
        raise ConfigError(f"expected a float batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    cls = _cam_class(method)
    if isinstance(target_class, (int, np.integer)):
        target_class = [target_class] * len(x)
    ks = None if target_class is None else list(target_class)
    if ks is not None and len(ks) < len(x):
        raise ConfigError(f"target_class has {len(ks)} entries for {len(x)} images")
    if callable(getattr(model, "member_inputs", None)):  # an ensemble: the mean of its members' maps
        if ks is None:
            with torch.no_grad():
                ks = model.eval()(x).argmax(1).tolist()  # the ensemble's class, explained by every member
        maps = np.mean([cam_array(m, xm, ks, method=method) for m, xm in model.member_inputs(x)], axis=0)
        lo, hi = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
        return np.where(hi > lo, (maps - lo) / np.maximum(hi - lo, 1e-12), 0.0).astype(np.float32)
    layer = layer if layer is not None else target_layer(model, x)
    reshape = getattr(model, "gradcam_reshape_transform", None)  # the model's own, else a square grid
    reshape = reshape if callable(reshape) else tokens_to_map
    was_training = model.training
    out: list[np.ndarray] = []
    try:
        # gradients are needed even when the caller runs under no_grad or inference_mode
        with torch.inference_mode(False), torch.enable_grad(), \
                cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            for start in range(0, len(x), _CHUNK):
                xb = x[start:start + _CHUNK].detach().clone().requires_grad_(True)  # grads even for frozen weights
                targets = None if ks is None else [ClassifierOutputTarget(int(k)) for k in ks[start:start + len(xb)]]
                out.append(np.asarray(cam(input_tensor=xb, targets=targets), dtype=np.float32))
    finally:
        model.train(was_training)
    maps = np.concatenate(out) if out else np.zeros((0,) + tuple(x.shape[-2:]), np.float32)
    return np.clip(np.nan_to_num(maps, nan=0.0), 0.0, 1.0)


def resolve_class(target: int | str | None, class_names: Sequence[str]) -> int | None:
    """A class given by name (exact, then case-insensitive) or index (``2``, ``"2"``, ``-1``) -> its index."""
    if target is None:
        return None
    names = list(class_names)
    listing = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
    if isinstance(target, str):
        if target in names:
            return names.index(target)
        folded = [n.casefold() for n in names]
        if folded.count(target.casefold()) == 1:
            return folded.index(target.casefold())
        try:
            target = int(target.strip())
        except ValueError:
            raise ConfigError(f"unknown class {target!r}; the classes are {listing}") from None
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        k = int(target)
        if -len(names) <= k < len(names):
            return k % len(names)
        raise ConfigError(f"class index {k} is out of range; the classes are {listing}")
    raise ConfigError(f"a class must be a name or an index, got {target!r}; the classes are {listing}")


# ----------------------------------------------------------------------------------------------- the panel
def _resize_map(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if m.shape == tuple(hw):
        return m
    t = F.interpolate(torch.from_numpy(m)[None, None], size=hw, mode="bilinear", align_corners=False)
    return np.clip(t[0, 0].numpy(), 0.0, 1.0)


# the names the literature uses, for figure titles and colour-bar labels (the keys are the CLI's --method values)
_METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM", "xgradcam": "XGrad-CAM",
                 "hirescam": "HiResCAM", "eigencam": "EigenCAM"}
_CLASS_AGNOSTIC = {"eigencam"}  # the first principal component of the feature map: the same map for every class
_CONTOUR_LEVELS = (0.5, 0.8)  # outlines of the hot region, as fractions of the map's maximum


def _method_title(method: str) -> str:
    """``"gradcam++"`` -> ``"Grad-CAM++"``; a class-agnostic method says so (``"EigenCAM (class-agnostic)"``)."""
    name = _METHOD_NAMES.get(method, method)
    return f"{name} (class-agnostic)" if method in _CLASS_AGNOSTIC else name


def _evidence_label(method: str, explained: str) -> str:
    """What the colour-bar values mean: the method's evidence for the explained class, min-max scaled per image."""
    what = (f"{_METHOD_NAMES.get(method, method)} activation (class-agnostic)" if method in _CLASS_AGNOSTIC
            else f"{_METHOD_NAMES.get(method, method)} evidence for {explained!r}")
    return f"{what}\nmin-max scaled per image (1 = its strongest)"


def _colour_bar(fig: Any, ax: Any, method: str, explained: str) -> Any:
    """The colour bar beside the overlay: the overlay's colours (:data:`~medmix.imaging.CAM_LUT`) at the opacity they
    are drawn with, over mid-grey, so "low" reads as "just the anatomy"; the contour levels are marked on it."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    v = np.linspace(0.0, 1.0, len(CAM_LUT), dtype=np.float32)
    shown = cam_overlay(np.full((1, len(v), 3), 0.5, np.float32), v[None])[0]  # as drawn over mid-grey
    sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=ListedColormap(shown, name=f"{CAM_COLORMAP}-over-grey"))
    cbar = fig.colorbar(sm, ax=ax, fraction=0.05, pad=0.02, aspect=25)
    cbar.set_ticks([0.0, *_CONTOUR_LEVELS, 1.0], labels=["0 none", *(f"{c:g}" for c in _CONTOUR_LEVELS), "1 max"])
    cbar.ax.tick_params(labelsize=8)
    for level, style in zip(_CONTOUR_LEVELS, ("--", "-")):
        cbar.ax.axhline(level, color="white", lw=1.0, ls=style)
    cbar.set_label(_evidence_label(method, explained), fontsize=8)
    return cbar


def _panel(img: torch.Tensor, cam: np.ndarray, probs: Sequence[tuple[str, float]], explained: str, title: str,
           method: str, warning: str | None = None) -> Any:
    """The figure of one image: the input, the heatmap over it with its colour bar, and the top probabilities
    (``explained`` in red), and ``warning`` (an out-of-distribution verdict) in red under the title. The overlay
    keeps the anatomy at full opacity and lays the heatmap on top with an opacity rising with the map
    (:func:`medmix.imaging.cam_overlay`, the same drawing as the server's), so a reader sees the tissue under a hot
    area and no tint where there is no evidence; thin white outlines mark 50 % (dashed) and 80 % (solid) of the
    map's maximum. Returns the matplotlib figure (the caller saves it)."""
    from matplotlib import patheffects
    from matplotlib.collections import Collection

    from .metrics import _new_figure

    big = enlarged_rgb(img.numpy(), PANEL_SIDE)
    m = resize_cam(cam, big.shape[:2])
    overlay = np.clip(cam_overlay(big, m), 0.0, 1.0)
    fig = _new_figure(12.5, 4.4)
    fig.set_layout_engine("constrained")  # places the colour bar beside the overlay at its height
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.12, 1.05]})
    name = _method_title(method)
    heading = name if method in _CLASS_AGNOSTIC else f"{name} for {explained!r}"
    peak = float(m.max())
    if peak <= 0.0:
        heading += "\n(no positive evidence: nothing drawn)"
    for ax, shown, head in ((axes[0], big, f"input ({img.shape[-1]}x{img.shape[-2]} px)"), (axes[1], overlay, heading)):
        ax.imshow(shown, interpolation="nearest")
        ax.set(xticks=[], yticks=[])
        ax.set_title(head, fontsize=10)
    axes[1].set_xlabel("no tint = no evidence; outlines at 50 % (dashed)\nand 80 % (solid) of the maximum", fontsize=8)
    if peak > 0.0 and np.ptp(m) > 0.0:
        outline = [patheffects.withStroke(linewidth=2.0, foreground="black")]  # visible on dark and bright tissue
        lines = axes[1].contour(m, levels=[c * peak for c in _CONTOUR_LEVELS], colors="white",
                                linewidths=[0.8, 1.1], linestyles=["--", "-"])
        for artist in [lines] if isinstance(lines, Collection) else lines.collections:  # matplotlib < 3.8: per level
            artist.set_path_effects(outline)
    _colour_bar(fig, axes[1], method, explained)
    names, vals = [n for n, _ in probs][::-1], [p for _, p in probs][::-1]
    ax = axes[2]
    ax.barh(range(len(vals)), vals, color=["tab:red" if n == explained else "tab:blue" for n in names])
    ax.set_yticks(range(len(vals)), labels=[n if len(n) <= 28 else n[:27] + "…" for n in names])
    for i, v in enumerate(vals):
        ax.text(min(v + 0.02, 0.98), i, f"{v:.1%}", va="center", ha="right" if v > 0.8 else "left", fontsize=9,
                color="white" if v > 0.8 else "black")
    ax.set(xlim=(0, 1), xlabel="probability (calibrated)")
    ax.set_title(f"top-{len(vals)} probabilities (red: explained)", fontsize=10)
    if warning:
        import textwrap

        title += "\n" + "\n".join(textwrap.wrap(warning, 140))
    fig.suptitle(title, fontsize=10, color="firebrick" if warning else "black")
    return fig


def _stem(name: str, i: int, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._")
    stem = f"image{i}" if name == f"image[{i}]" or not stem else stem
    base, k = stem, 1
    while stem in used:
        k += 1
        stem = f"{base}-{k}"
    used.add(stem)
    return stem


# ----------------------------------------------------------------------------------------------- the API
def explain(checkpoint: Any, images: Iterable[Any], out_dir: str | os.PathLike, *, method: str = DEFAULT_METHOD,
            target_class: int | str | None = None, top_k: int = 3) -> list[dict]:
    """Heatmap panels for ``images`` (paths, bytes, PIL images or arrays) under ``out_dir``.

    ``checkpoint``: a checkpoint file, a run directory or a :class:`~medmix.predict.Predictor`. ``target_class``
    (name or index) is explained for every image; by default each image's predicted (most probable) class.
    Returns one dict per image: ``file``, ``png`` (``<stem>_<method>.png``, e.g. ``scan_gradcam.png``), ``label``,
    ``confidence``, ``explained_class``, ``explained_index``, ``explained_probability``, ``probabilities`` (top-k)
    and ``cam`` (float32 ``(H, W)`` in [0, 1] at the size of the loaded image), then, when the checkpoint has OOD
    data, the out-of-distribution verdict as :class:`~medmix.predict.Predictor` reports it (``in_distribution``,
    ``ood_score`` and the modality gate's fields); the panel shows it as a warning under the title. A generalist
    routes each image to a dataset and explains that head's class; its results add ``dataset``,
    ``dataset_confidence`` (after ``png``) and ``in_distribution`` (last) when it has an OOD threshold.
    """
    from .metrics import save_figure

    _cam_class(method)  # fail on an unknown method before loading anything
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    out = check_writable_dir(out_dir, "--out")  # (~ expanded)
    if not isinstance(checkpoint, (Predictor, GeneralistPredictor)):
        checkpoint = load_predictor(checkpoint)
    items, names = as_inputs(images)
    if not isinstance(checkpoint, GeneralistPredictor):
        resolve_class(target_class, checkpoint.class_names)  # an unknown class fails before loading
    batch = torch.stack([checkpoint.load(x, n) for x, n in zip(items, names)])
    cams, rows = explained(checkpoint, batch, target_class, method)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{out}: exists and is not a directory; --out needs a directory for the panels") from None
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    used: set[str] = set()
    results = []
    for i, (name, img, cam, (classes, p, k, label, conf, route, head, tail)) in enumerate(
            zip(names, batch, cams, rows)):
        order = torch.argsort(p, descending=True).tolist()[:top_k]
        top = [(classes[j], float(p[j])) for j in order]
        if k not in order:  # always show the explained class
            top.append((classes[k], float(p[k])))
        cam = _resize_map(cam, tuple(img.shape[-2:]))
        png = out / f"{_stem(name, i, used)}_{method.replace('+', 'p')}.png"
        what = "class-agnostic map" if method in _CLASS_AGNOSTIC else f"explaining {classes[k]!r}"
        title = f"{Path(name).name}: {route}{label} ({conf:.1%})  -  {checkpoint.meta['model']}, {what}"
        save_figure(_panel(img, cam, top, classes[k], title, method, ood_warning(tail)), png)
        results.append({"file": name, "png": str(png), **head, "label": label, "confidence": conf,
                        "explained_class": classes[k], "explained_index": k, "explained_probability": float(p[k]),
                        "method": method, "probabilities": {n: round(v, 6) for n, v in top}, "cam": cam, **tail})
    return results


def explained(pred: Any, batch: torch.Tensor, target_class: int | str | None, method: str
              ) -> tuple[np.ndarray, list[tuple]]:
    """The heatmaps of uint8 images ``batch`` (``pred``: a Predictor or a GeneralistPredictor) for ``target_class``
    (name or index; default each image's most probable class) and per image ``(class names, probabilities,
    explained class index, label, confidence, routing text, result fields placed after "png", result fields placed
    last)``. A generalist routes each image (``pred.analyse``) and explains its head's class, at that class's column
    of the model output."""
    if not isinstance(pred, GeneralistPredictor):
        fixed = resolve_class(target_class, pred.class_names)
        logits, oods = pred.logits_and_ood(batch)  # the OOD verdict rides along with the one forward pass
        probs = probabilities(logits, pred.info.task, pred.temperature)
        targets = [fixed if fixed is not None else int(torch.argmax(p)) for p in probs]
        cams = cam_array(pred.model, pred.transform(batch), targets, method=method)
        answers = [pred._describe("", p, None) for p in probs]
        return cams, [(pred.class_names, p, k, d["label"], float(d["confidence"]), "", {}, o or {})
                      for p, k, d, o in zip(probs, targets, answers, oods)]
    a = pred.analyse(batch)
    rows, columns = [], []
    for i in range(len(batch)):
        k, p = pred.head_probabilities(a, i)
        d, classes, best = pred.datasets[k], pred.infos[k].class_names, int(torch.argmax(p))
        j = resolve_class(target_class, classes) if target_class is not None else best
        route = float(a["router"][i, k])
        tail = {} if a["in_distribution"] is None else {"in_distribution": bool(a["in_distribution"][i])}
        rows.append((classes, p, j, classes[best], float(p[best]), f"routed to {d['name']} ({route:.1%}) -> ",
                     {"dataset": d["name"], "dataset_confidence": round(route, 6)}, tail))
        columns.append(d["columns"][0] + j)
    return cam_array(pred.model, pred.transform(batch), columns, method=method), rows
