"""Out-of-distribution warning: does an image look like the images the model was trained on?

A classifier answers every question, including the wrong one: a hand X-ray given to a breast-ultrasound model, a
photo or pure noise all get a confident label. Every prediction therefore carries an ``ood_score`` (higher = less
like the training data) and an ``in_distribution`` flag, ``ood_score <= threshold``, where the threshold is fixed on
the validation split so that 95% of the validation images count as in-distribution (95% true-positive rate).

Two scores are implemented (``benchmarks/ood.py`` measures both; see ``results/ood.md``):

* ``mahalanobis`` (Lee et al. 2018): the smallest squared Mahalanobis distance of the image's penultimate features
  (``model.forward_head(model.forward_features(x), pre_logits=True)``) to a class mean, under one covariance shared
  by the classes (Ledoit-Wolf shrinkage), all fitted on the un-augmented training split. Multi-label tasks use one
  Gaussian for all images. The means and the precision matrix are stored in the checkpoint's ``extras``.
* ``energy`` (Liu et al. 2020): ``-T logsumexp(z / T)`` of the logits ``z`` (multi-label: ``-sum_j
  log(1 + exp(z_j))``, the joint energy). Needs nothing but the logits, so an exported ONNX model can compute it.

The default is ``mahalanobis``, chosen by measurement (``results/ood.md``, hybrid_mixer_small at 28 px): AUROC
against all other modalities 1.000 / 0.982 / 1.000 for BreastMNIST / PneumoniaMNIST / RetinaMNIST models, against
Gaussian noise 1.000 / 0.998 / 1.000, where the energy score reaches only 0.62 / 0.67 / 0.41 and 0.17 / 0.57 / 0.39
(a small classifier's logits can be large on images it has never seen).

The model's own score only knows the model's training images. A model trained on 546 ultrasound images may put a
hand X-ray or a CT slice right beside its classes (measured: 25 of 48 MedNIST images passed a quickstart model
before the gate). The **modality gate** adds what every model lacks (:mod:`medmix.modality`): a small network
shipped with medmix that was trained to tell imaging modalities apart. Per run, :func:`fit_gate` fits a Gaussian
per class on the gate's features of the training images and places a threshold on the val images at ``GATE_TPR``
(98 %); the model's own threshold is then placed so that both checks together still keep ``TPR`` (95 %) of the val
images. An image is in distribution only when it passes both (and the blank guard); predictions say which check
flagged it (``flagged_by``) and what the gate takes it for (``looks_like``). ``results/ood.md`` measures the rule
per model and modality.

A blank guard completes the score: an image whose pixel standard deviation is below half the 0.1% quantile of the
training images' (``min_pixel_std``; a constant image) is flagged whatever its score, because a featureless input can
land near a class mean in feature space (measured: a PneumoniaMNIST model's Mahalanobis score alone flags a third of
constant images). At the end of training :func:`fit` stores both thresholds in ``meta["ood"]`` (``method`` names the
one predictions use) and the Mahalanobis statistics in the checkpoint; :class:`Detector` applies them.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.tasks import MULTI_LABEL
from .errors import ConfigError
from .imaging import pixel_std  # noqa: F401  (ood.pixel_std: the blank guard's statistic, torch-free)
from .inference import extract  # noqa: F401  (ood.extract: features for the scores below)
from .modality import gate_available, gate_outputs, load_gate

__all__ = ["DEFAULT_SCORE", "GATE_TPR", "SCORES", "TPR", "Detector", "GateDetector", "energy_score", "extract", "fit",
           "fit_from_features", "fit_gate", "fit_mahalanobis", "mahalanobis_score", "min_pixel_std", "pixel_std",
           "threshold_at_tpr"]

SCORES = ("mahalanobis", "energy")
DEFAULT_SCORE = "mahalanobis"
TPR = 0.95  # share of validation images that count as in-distribution
MIN_STD_QUANTILE = 0.001  # blank guard: half this quantile of the training images' pixel std
MAX_FIT_IMAGES = 20_000  # training images used to fit the Gaussian (a fixed random subset above this)
EXTRA_MEANS = "ood.mahalanobis.means"
EXTRA_PRECISION = "ood.mahalanobis.precision"
GATE_TPR = 0.98  # share of validation images the modality gate keeps (the run's own score keeps TPR of them)
EXTRA_GATE_MEANS = "ood.gate.means"
EXTRA_GATE_PRECISION = "ood.gate.precision"


# ----------------------------------------------------------------------------------------------- scores
def energy_score(logits: Any, temperature: float = 1.0, task: str | None = None) -> np.ndarray:
    """``-T logsumexp(z / T)`` per row (multi-label: ``-T sum_j softplus(z_j / T)``); higher = more unusual."""
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).double()
    t = float(temperature)
    if task == MULTI_LABEL:
        return (-t * torch.nn.functional.softplus(z / t).sum(1)).numpy()
    return (-t * torch.logsumexp(z / t, dim=1)).numpy()


def fit_mahalanobis(features: Any, labels: Any, task: str) -> dict[str, torch.Tensor]:
    """Class means ``(K, D)`` (one row for multi-label tasks) and the precision matrix ``(D, D)`` of the shared
    covariance of the features around their class mean, with Ledoit-Wolf shrinkage. Classes absent from ``labels``
    get no mean (they cannot attract an image)."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ConfigError(f"need at least 2 feature rows of shape (N, D) to fit; got {f.shape}")
    if task == MULTI_LABEL:
        means = f.mean(0, keepdims=True)
        centred = f - means
    else:
        y = np.asarray(labels).reshape(len(f), -1)[:, 0].astype(np.int64)
        classes = np.unique(y)
        means = np.stack([f[y == k].mean(0) for k in classes])
        centred = f - means[np.searchsorted(classes, y)]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    precision = np.linalg.pinv(lw.covariance_, hermitian=True)
    return {EXTRA_MEANS: torch.from_numpy(means).float(), EXTRA_PRECISION: torch.from_numpy(precision).float()}


def mahalanobis_score(features: Any, stats: dict[str, torch.Tensor]) -> np.ndarray:
    """The smallest squared Mahalanobis distance to a class mean, per row; higher = more unusual."""
    f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).double()
    means, prec = stats[EXTRA_MEANS].double(), stats[EXTRA_PRECISION].double()
    if f.ndim != 2 or f.shape[1] != means.shape[1]:
        raise ConfigError(f"features of shape {tuple(f.shape)} do not fit OOD statistics of dimension "
                          f"{means.shape[1]}")
    fp = f @ prec  # (N, D)
    mp = means @ prec  # (K, D)
    # (f - m)^T P (f - m) = f P f - 2 f P m + m P m
    d = (fp * f).sum(1, keepdim=True) - 2.0 * fp @ means.T + (mp * means).sum(1)[None, :]
    return d.min(1).values.clamp_min(0.0).numpy()


def threshold_at_tpr(in_scores: Any, tpr: float = TPR, train_scores: Any = None, passed: Any = None,
                     train_passed: Any = None) -> float:
    """The threshold (``in_distribution = score <= threshold``) at the split-conformal rank: the
    ``ceil(tpr * (n + 1))``-th smallest of the ``n`` held-out scores, so that a new image exchangeable with them
    passes with probability at least ``tpr``. (The plain ``ceil(tpr * n)``-th keeps ``tpr`` of the held-out images
    themselves but only ``ceil(tpr * n) / (n + 1)`` of new ones in expectation: 93.7 % instead of 95 % on
    BreastMNIST's 78 val images.) Given ``train_scores`` (a validation split too small to place it on), of both
    pooled. Beyond the largest score (``n`` too small for the rank) the largest score is used.

    ``passed`` (and ``train_passed``): boolean masks of the images another check already lets through (the modality
    gate); the threshold is then placed so that ``tpr`` of *all* images pass both checks (the largest score of the
    passed ones when that share cannot be reached)."""
    parts = [in_scores] if train_scores is None else [train_scores, in_scores]
    s = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in parts])
    if len(s) == 0 or not np.isfinite(s).all():
        raise ConfigError("need finite in-distribution scores to fix an OOD threshold")
    n = len(s)
    if passed is not None:
        masks = [passed] if train_scores is None else [train_passed, passed]
        keep = np.concatenate([np.asarray(m, dtype=bool).reshape(-1) for m in masks])
        s = s[keep] if keep.any() else s
    s = np.sort(s)
    k = min(len(s) - 1, max(0, int(np.ceil(tpr * (n + 1))) - 1))
    return float(s[k])


def min_pixel_std(train_images: Any) -> float:
    """Blank guard: half the ``MIN_STD_QUANTILE`` quantile of the images' :func:`pixel_std`, 4 decimals (0 if none)."""
    return round(0.5 * float(np.quantile(pixel_std(train_images), MIN_STD_QUANTILE)), 4) if len(train_images) else 0.0


# ----------------------------------------------------------------------------------------------- fitting
def fit_from_features(train_features: Any, train_labels: Any, val_logits: Any, val_features: Any, task: str, *,
                      method: str = DEFAULT_SCORE, tpr: float = TPR, energy_temperature: float = 1.0,
                      train_logits: Any = None, passed: tuple[Any, Any] | None = None
                      ) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta block, checkpoint extras)`` from features of the training split and logits/features of the validation
    split. The block: ``method`` (the score predictions use), ``threshold`` (its), ``thresholds`` (both scores),
    ``temperature`` (of the energy), ``tpr``, ``split`` ("val"), ``n_val``, ``n_fit``, ``feature_dim``.

    ``train_logits`` given (a validation split too small to place a threshold on): the thresholds are placed on the
    training and validation scores pooled (``split`` "train+val"); training images sit closer to the statistics
    fitted on them, so the threshold is stricter. ``passed``: the (val, train) masks of images the modality gate
    lets through; the thresholds then keep ``tpr`` of the images through both checks together."""
    if method not in SCORES:
        raise ConfigError(f"unknown OOD score {method!r}; use one of {', '.join(SCORES)}")
    stats = fit_mahalanobis(train_features, train_labels, task)

    def scores(logits: Any, features: Any) -> dict[str, np.ndarray]:
        return {"mahalanobis": mahalanobis_score(features, stats),
                "energy": energy_score(logits, energy_temperature, task)}

    val_scores = scores(val_logits, val_features)
    train_scores = scores(train_logits, train_features) if train_logits is not None else {}
    pv, pt = passed if passed is not None else (None, None)
    thresholds = {k: threshold_at_tpr(v, tpr, train_scores.get(k), pv, pt) for k, v in val_scores.items()}
    block = {"method": method, "threshold": thresholds[method], "thresholds": thresholds,
             "temperature": float(energy_temperature), "tpr": float(tpr),
             "split": "val" if train_logits is None else "train+val",
             "n_val": len(val_scores["energy"]), "n_fit": int(np.asarray(train_features).shape[0]),
             "feature_dim": int(stats[EXTRA_MEANS].shape[1]), "n_means": int(stats[EXTRA_MEANS].shape[0])}
    return block, stats


def fit(model: nn.Module, train_images: torch.Tensor, train_labels: Any, val_images: torch.Tensor, transform,
        task: str, *, method: str = DEFAULT_SCORE, tpr: float = TPR, batch_size: int = 256,
        max_fit_images: int = MAX_FIT_IMAGES, seed: int = 0, val: tuple[torch.Tensor, torch.Tensor] | None = None,
        pool_train: bool = False, gate: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fit the OOD statistics of ``model`` on un-augmented training images (``transform`` must not augment) and
    fix the thresholds on the validation images (``pool_train``: on the training and validation images together);
    ``val`` may pass their already computed ``(logits, features)``. ``gate``: also fit the modality gate's Gaussian
    (:mod:`medmix.modality`, ``block["gate"]``) on the same uint8 images.
    Returns ``(meta["ood"] block, checkpoint extras)``."""
    labels = torch.as_tensor(np.asarray(train_labels)) if not isinstance(train_labels, torch.Tensor) else train_labels
    min_std = min_pixel_std(train_images)
    if len(train_images) > max_fit_images:
        idx = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:max_fit_images]
        train_images, labels = train_images[idx], labels[idx]
    train_logits, train_features = extract(model, train_images, transform, batch_size)
    val_logits, val_features = val if val is not None else extract(model, val_images, transform, batch_size)
    gate_block, gate_stats, passed = None, {}, None
    if gate and gate_available():  # first: the model's own threshold is placed on the images the gate passes
        gate_block, gate_stats, passed = fit_gate(train_images, labels.numpy(), val_images, task,
                                                  pool_train=pool_train)
    block, stats = fit_from_features(train_features, labels.numpy(), val_logits, val_features, task, method=method,
                                     tpr=tpr, train_logits=train_logits if pool_train else None, passed=passed)
    block["min_pixel_std"] = min_std
    if gate_block is not None:
        block["gate"] = gate_block
        stats.update(gate_stats)
    return block, stats


# ----------------------------------------------------------------------------------------------- modality gate
def fit_gate(train_images: torch.Tensor, train_labels: Any, val_images: torch.Tensor, task: str, *,
             tpr: float = GATE_TPR, pool_train: bool = False
             ) -> tuple[dict, dict[str, torch.Tensor], tuple[np.ndarray, np.ndarray | None]]:
    """The gate block of ``meta["ood"]``, its checkpoint extras and the (val, train or None) masks of the images it
    passes, fitted on a run's (un-augmented) uint8 training images and thresholded on its validation images
    (``pool_train``: on both together). The block: ``threshold``, ``tpr``, ``n_fit``, ``feature_dim``, ``gate`` (the
    weights' md5), ``modalities`` (the gate's most probable modality over the training images, as shares) and
    ``split``."""
    _, info = load_gate()
    f_train, p_train = gate_outputs(train_images)
    f_val, _ = gate_outputs(val_images)
    raw = fit_mahalanobis(f_train, train_labels, task)  # keyed as ood's own statistics, for mahalanobis_score
    val_scores = mahalanobis_score(f_val, raw)
    train_scores = mahalanobis_score(f_train, raw) if pool_train else None
    stats = {EXTRA_GATE_MEANS: raw[EXTRA_MEANS], EXTRA_GATE_PRECISION: raw[EXTRA_PRECISION]}
    top = np.bincount(p_train.argmax(1), minlength=len(info["classes"])) / max(1, len(p_train))
    t = threshold_at_tpr(val_scores, tpr, train_scores)
    block = {"threshold": t, "tpr": float(tpr),
             "split": "train+val" if pool_train else "val", "n_fit": int(len(f_train)),
             "feature_dim": int(f_train.shape[1]), "gate": info["md5"],
             "modalities": {c: round(float(s), 4) for c, s in zip(info["classes"], top) if s > 0}}
    return block, stats, (val_scores <= t, None if train_scores is None else train_scores <= t)


class GateDetector:
    """Applies a checkpoint's gate block (``meta["ood"]["gate"]``) and statistics to uint8 images."""

    def __init__(self, block: dict, extras: dict[str, torch.Tensor]) -> None:
        if EXTRA_GATE_MEANS not in extras or EXTRA_GATE_PRECISION not in extras:
            raise ConfigError("this checkpoint has a modality-gate block but no gate statistics")
        self.block, self.threshold = block, float(block["threshold"])
        self.stats = {EXTRA_MEANS: extras[EXTRA_GATE_MEANS], EXTRA_PRECISION: extras[EXTRA_GATE_PRECISION]}
        model, info = load_gate()
        if block.get("gate") != info["md5"]:
            raise ConfigError("this checkpoint's modality-gate statistics were fitted on another version of the gate "
                              f"(weights {block.get('gate')}, installed {info['md5']})")
        self.classes = list(info["classes"])

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, list[tuple[str, float]]]:
        """Per image: the gate score (higher = less like the run's training modality), ``in_distribution``
        (score at or below the threshold) and the gate's most probable modality with its probability."""
        f, p = gate_outputs(images)
        s = mahalanobis_score(f, self.stats) if len(f) else np.zeros(0)
        k = p.argmax(1) if len(p) else np.zeros(0, dtype=int)
        return s, s <= self.threshold, [(self.classes[j], float(p[i, j])) for i, j in enumerate(k)]


# ----------------------------------------------------------------------------------------------- applying
class Detector:
    """Applies a checkpoint's OOD block (``meta["ood"]``) and statistics (its extras) to logits and features."""

    def __init__(self, block: dict, extras: dict[str, torch.Tensor] | None = None, method: str | None = None,
                 task: str | None = None) -> None:
        self.block = block
        self.task = task
        self.method = method or str(block.get("method", DEFAULT_SCORE))
        thresholds = dict(block.get("thresholds") or {})
        if self.method == block.get("method") and block.get("threshold") is not None:
            thresholds.setdefault(self.method, block["threshold"])
        if self.method not in SCORES or thresholds.get(self.method) is None:
            raise ConfigError(f"this checkpoint has no threshold for the OOD score {self.method!r}")
        self.threshold = float(thresholds[self.method])
        self.temperature = float(block.get("temperature", 1.0))
        self.min_pixel_std = float(block.get("min_pixel_std") or 0.0)
        self.stats = None
        self.gate: GateDetector | None = None
        if isinstance(block.get("gate"), dict):
            try:
                self.gate = GateDetector(block["gate"], extras or {})
            except ConfigError as e:  # a checkpoint fitted on another gate version: its own score still works
                warnings.warn(f"modality gate not used: {e}", stacklevel=2)
        if self.method == "mahalanobis":
            if not extras or EXTRA_MEANS not in extras or EXTRA_PRECISION not in extras:
                raise ConfigError("this checkpoint has no Mahalanobis statistics")
            self.stats = {k: extras[k] for k in (EXTRA_MEANS, EXTRA_PRECISION)}

    @classmethod
    def from_checkpoint(cls, meta: dict, extras: dict[str, torch.Tensor] | None, method: str | None = None
                        ) -> Detector | None:
        """The detector of a checkpoint, or None when it carries no usable OOD data (older checkpoints). When the
        stored score's statistics are missing it falls back to the energy score if that has a threshold."""
        block = meta.get("ood")
        if not isinstance(block, dict):
            return None
        task = (meta.get("task") or {}).get("task")
        if method is not None:
            return cls(block, extras, method, task)
        for stored_or_energy in (None, "energy"):
            with contextlib.suppress(ConfigError):
                return cls(block, extras, stored_or_energy, task)
        return None

    @property
    def needs_features(self) -> bool:
        return self.method == "mahalanobis"

    def scores(self, logits: Any, features: Any = None) -> np.ndarray:
        if self.method == "mahalanobis":
            if features is None:
                raise ConfigError("the Mahalanobis OOD score needs the penultimate features")
            return mahalanobis_score(features, self.stats)
        return energy_score(logits, self.temperature, self.task)

    def flags(self, scores: Any, images: Any = None, gate: tuple | None = None) -> np.ndarray:
        """``in_distribution`` per row: score at or below the threshold and, given the uint8 ``images``, not blank
        and passed by the modality gate (``gate``: its already computed ``GateDetector`` output)."""
        ok = np.asarray(scores, dtype=np.float64) <= self.threshold
        if images is not None and self.min_pixel_std > 0:
            ok &= pixel_std(images) >= self.min_pixel_std
        if images is not None and self.gate is not None:
            ok &= (gate if gate is not None else self.gate(torch.as_tensor(images)))[1]
        return ok

    def __call__(self, logits: Any, features: Any = None, images: Any = None) -> list[dict]:
        """One ``{"in_distribution": bool, "ood_score": float}`` per row; ``images`` (uint8, as given to the model)
        enable the blank guard and, when the checkpoint has one, the modality gate, which adds ``modality_score``,
        ``modality_match`` (its own verdict) and ``looks_like`` / ``looks_like_probability`` (the gate's most
        probable modality); a flagged row adds ``flagged_by``: which of "features" (the model's own score),
        "modality" (the gate) and "blank" (the blank guard) flagged it."""
        s = self.scores(logits, features)
        g = self.gate(torch.as_tensor(images)) if images is not None and self.gate is not None else None
        flags = self.flags(s, images, g)
        blank = (pixel_std(images) < self.min_pixel_std if images is not None and self.min_pixel_std > 0
                 else np.zeros(len(s), dtype=bool))
        out = []
        for i, (v, f) in enumerate(zip(s, flags)):
            r = {"in_distribution": bool(f), "ood_score": round(float(v), 6)}
            if g is not None:
                r.update(modality_score=round(float(g[0][i]), 6), modality_match=bool(g[1][i]), looks_like=g[2][i][0],
                         looks_like_probability=round(g[2][i][1], 6))
            if not f:  # which checks flagged it: the model's own score, the modality gate, the blank guard
                r["flagged_by"] = [n for n, hit in (("features", float(v) > self.threshold),
                                                    ("modality", g is not None and not g[1][i]),
                                                    ("blank", bool(blank[i]))) if hit]
            out.append(r)
        return out
