"""Corruption robustness: how a trained run's balanced error grows when its test images are degraded the way
MedMNIST-C degrades them.

Source: F. Di Salvo, S. Doerrich, C. Ledig, "MedMNIST-C: Comprehensive benchmark and improved classifier robustness
by simulating realistic image corruptions" (2024), and its package ``medmnistc`` 0.1.0 (Apache-2.0). The corruptions
themselves (what each does, the per-set lists and severity parameters, and where they differ from MedMNIST-C's) are
:mod:`medmix.corruptions`, re-exported here. What this module carries over: the metric (balanced error = 1 -
balanced accuracy, with the same decision rules: argmax for multi-class/ordinal, positive score > threshold for
binary, per label for multi-label), the BE and rBE formulas (:func:`robustness_scores`) and the AlexNet baseline
errors they are normalised by (:data:`ALEXNET_BASELINE`). The package itself is not used; everything here is NumPy,
scikit-learn and the package's own inference, and written anew.

Where this differs from MedMNIST-C, and why:

* **Resolution.** MedMNIST-C corrupts the 224 px test images and its numbers (the AlexNet baseline included) were
  measured at 224 px. Here the images are corrupted as the run's data store them (usually 28 px), with pixel-sized
  parameters scaled to the image (:mod:`medmix.corruptions`); at 28 px the mild blurs leave the images (almost)
  unchanged (``mean_abs_change`` and a note in the results show it) and per-pixel noise hides much more of the
  image. Balanced errors, BE and rBE at 28 px are therefore not the numbers MedMNIST-C would give at 224 px; they
  compare like with like only within one resolution.
* **Randomness.** Every (corruption, severity) has its own generator seeded from ``seed``, the corruption's name
  and the severity (and the chunk of images), so results are reproducible and do not depend on which other
  corruptions are evaluated.
* Kept on purpose: rBE is undefined in spirit where AlexNet's corrupted error is at or below its clean error, e.g.
  PneumoniaMNIST's ``contrast_up`` and ``gamma_corr_up``: the formula is applied anyway and
  :func:`robustness_scores` flags those corruptions.

Data without a MedMNIST-C entry (class folders, packed npz files, MedMNIST sets it does not cover) get a generic
list chosen by the number of channels (:func:`corruptions_for`); no AlexNet baseline exists for them, so BE and rBE
are omitted with a note.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .corruptions import (GENERIC_GRAY, GENERIC_RGB, KINDS, MEDMNIST_C, REFERENCE_SIDE, SEVERITIES,  # noqa: F401
                          Corruption, black_corner, bubble, brightness, characters, check_severities, contrast,
                          corrupt, corruption_set_name, corruptions_for, defocus_blur, gamma_correction,
                          gaussian_blur, gaussian_noise, impulse_noise, jpeg_compression, motion_blur, pixelate,
                          random_corruptions, saturate, shot_noise, speckle_noise, stain_deposit, zoom_blur)
from .errors import ConfigError

CHUNK_PIXELS = 512 * 28 * 28  # pixels corrupted (and scored) at a time: 512 images at 28 px; part of the random
# stream, so a fixed function of the image size
BASELINE_MODEL = "AlexNet (MedMNIST-C baseline, 224 px)"


# MedMNIST-C's AlexNet baseline (medmnistc 0.1.0, utils/baselines.py): clean balanced error and, per corruption,
# the balanced error averaged over the five severities, measured at 224 px.
ALEXNET_BASELINE: dict[str, dict[str, Any]] = {
    "bloodmnist": {"clean": 0.018369282094266692, "corrupted": {
        "pixelate": 0.05975618949678589, "jpeg_compression": 0.13976187053705183,
        "defocus_blur": 0.22399795597780647, "motion_blur": 0.1845192137218041,
        "brightness_up": 0.06946294328845175, "brightness_down": 0.0790077546902872,
        "contrast_up": 0.05215362284240639, "contrast_down": 0.07966068499560328, "saturate": 0.03478558170020538,
        "stain_deposit": 0.18536119379858546, "bubble": 0.12898833684644578}},
    "breastmnist": {"clean": 0.14536340852130336, "corrupted": {
        "pixelate": 0.46127819548872184, "jpeg_compression": 0.2986215538847118,
        "speckle_noise": 0.38709273182957393, "motion_blur": 0.25902255639097743,
        "brightness_up": 0.3197994987468672, "brightness_down": 0.21127819548872181,
        "contrast_down": 0.15864661654135334}},
    "chestmnist": {"clean": 0.2839064387513035, "corrupted": {
        "pixelate": 0.44895070087295996, "jpeg_compression": 0.34575690815860566,
        "gaussian_noise": 0.47688317292098203, "speckle_noise": 0.45687894795025785,
        "impulse_noise": 0.48553631547337917, "shot_noise": 0.4926966815396587,
        "gaussian_blur": 0.3176801263607164, "brightness_up": 0.2993721457134663,
        "brightness_down": 0.29711530406534037, "contrast_up": 0.28751004051276824,
        "contrast_down": 0.2954742427570406, "gamma_corr_up": 0.287462117104012,
        "gamma_corr_down": 0.2891642074561852}},
    "dermamnist": {"clean": 0.3985775597242611, "corrupted": {
        "pixelate": 0.5105118313063095, "jpeg_compression": 0.47716296678659287,
        "gaussian_noise": 0.770161396521756, "speckle_noise": 0.7688784860204994,
        "impulse_noise": 0.7995552265467947, "shot_noise": 0.8391552104792783,
        "defocus_blur": 0.7008318467374395, "motion_blur": 0.6266414682428412, "zoom_blur": 0.5277668583085878,
        "brightness_up": 0.4473990148869178, "brightness_down": 0.5772968080812169,
        "contrast_up": 0.430415384126964, "contrast_down": 0.5398210493891896, "black_corner": 0.7591457853547467,
        "characters": 0.4461917314736283}},
    "octmnist": {"clean": 0.20199999999999996, "corrupted": {
        "pixelate": 0.3124, "jpeg_compression": 0.29640000000000005, "speckle_noise": 0.386,
        "defocus_blur": 0.3084, "motion_blur": 0.4892, "contrast_down": 0.4196}},
    "organamnist": {"clean": 0.050053710403475504, "corrupted": {
        "pixelate": 0.07589728744538755, "jpeg_compression": 0.10233182799848468,
        "gaussian_noise": 0.558867512509986, "speckle_noise": 0.5008977196696448,
        "impulse_noise": 0.6005122792556206, "shot_noise": 0.5704549211261293,
        "gaussian_blur": 0.23340661727240267, "brightness_up": 0.14763547790322412,
        "brightness_down": 0.2646445055204496, "contrast_up": 0.10977873034814234,
        "contrast_down": 0.1268424696095805, "gamma_corr_up": 0.10360009998047674,
        "gamma_corr_down": 0.10577092296366888}},
    "organcmnist": {"clean": 0.07596783210891289, "corrupted": {
        "pixelate": 0.12161270665759313, "jpeg_compression": 0.10754481922990186,
        "gaussian_noise": 0.5736544084235357, "speckle_noise": 0.5130960298987614,
        "impulse_noise": 0.5997780092763433, "shot_noise": 0.5492477253691926,
        "gaussian_blur": 0.316895537101905, "brightness_up": 0.16011849294420644,
        "brightness_down": 0.2324271692594097, "contrast_up": 0.09991836613387597,
        "contrast_down": 0.15327395964015147, "gamma_corr_up": 0.1426418229218433,
        "gamma_corr_down": 0.12390902424472901}},
    "organsmnist": {"clean": 0.24300485476777922, "corrupted": {
        "pixelate": 0.31259415418134306, "jpeg_compression": 0.26996994867350865,
        "gaussian_noise": 0.5889124203738291, "speckle_noise": 0.5450100158501043,
        "impulse_noise": 0.6010108858901404, "shot_noise": 0.5519125643755777,
        "gaussian_blur": 0.4466645657200248, "brightness_up": 0.3598501969979232,
        "brightness_down": 0.3592866403894267, "contrast_up": 0.2871702451645464,
        "contrast_down": 0.3128243336438499, "gamma_corr_up": 0.30253196514691594,
        "gamma_corr_down": 0.3116016263827458}},
    "pathmnist": {"clean": 0.08839299601334816, "corrupted": {
        "pixelate": 0.20934201922262957, "jpeg_compression": 0.24709267033930377,
        "defocus_blur": 0.4621259742146214, "motion_blur": 0.3689076534699618,
        "brightness_up": 0.41551581022730166, "brightness_down": 0.2811688318161528,
        "contrast_up": 0.2338925659881773, "contrast_down": 0.13718687818913905, "saturate": 0.3341143518079194,
        "stain_deposit": 0.24930831751137275, "bubble": 0.10818301335634566}},
    "pneumoniamnist": {"clean": 0.10085470085470083, "corrupted": {
        "pixelate": 0.22102564102564104, "jpeg_compression": 0.2798290598290598,
        "gaussian_noise": 0.4414529914529915, "speckle_noise": 0.3457264957264957,
        "impulse_noise": 0.4581196581196581, "shot_noise": 0.4106837606837607,
        "gaussian_blur": 0.2730769230769231, "brightness_up": 0.14649572649572645,
        "brightness_down": 0.2782051282051282, "contrast_up": 0.09529914529914527,
        "contrast_down": 0.23743589743589744, "gamma_corr_up": 0.09606837606837607,
        "gamma_corr_down": 0.16641025641025642}},
    "retinamnist": {"clean": 0.5582064849927977, "corrupted": {
        "pixelate": 0.6017003263074344, "jpeg_compression": 0.6795223564688244,
        "gaussian_noise": 0.7040832524914012, "speckle_noise": 0.6135258841167651,
        "defocus_blur": 0.6882905018079196, "motion_blur": 0.7075760943057883,
        "brightness_down": 0.5844791133844842, "contrast_down": 0.6092882382338243}},
    "tissuemnist": {"clean": 0.3917787199385978, "corrupted": {
        "pixelate": 0.49272908707597907, "jpeg_compression": 0.508070087070269,
        "impulse_noise": 0.7970869222746931, "gaussian_blur": 0.4805143361974326,
        "brightness_up": 0.4618274173802247, "brightness_down": 0.51981943234386,
        "contrast_up": 0.5026233641102424, "contrast_down": 0.5369342652194591}},
}

FAINT_CHANGE = 0.5  # mean absolute pixel change (gray levels) below which a corruption is reported as faint
RBE_UNSTABLE_BELOW = 0.01  # AlexNet corrupted - clean error below this: rBE of that corruption is ill-conditioned


# ----------------------------------------------------------------------------------------------- metrics
def balanced_error(y_true: Any, y_score: Any, task: str, threshold: Any = 0.5) -> float:
    """``1 - balanced accuracy`` with MedMNIST-C's rules: argmax (multi-class, ordinal), positive score >
    ``threshold`` (binary), and for multi-label the mean over labels of each label's balanced error (``threshold``:
    one value or one per label). Classes absent from ``y_true`` do not count (scikit-learn's convention)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    from .metrics import predict_labels
    from .task_kinds import MULTI_LABEL

    pred = predict_labels(y_score, task, threshold)
    y = np.asarray(y_true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": not an error here
        if task == MULTI_LABEL:
            y = y.reshape(len(y), -1)
            return float(1.0 - np.mean([balanced_accuracy_score(y[:, k], pred[:, k]) for k in range(y.shape[1])]))
        return float(1.0 - balanced_accuracy_score(y.reshape(-1), pred.reshape(-1)))


def robustness_scores(clean_error: float, errors: Mapping[str, Mapping[int, float]],
                      baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """MedMNIST-C's summary of a table of balanced errors ``errors[corruption][severity]``.

    ``mean_corrupted_error``: the mean over corruptions of each one's mean over severities. With the AlexNet
    ``baseline`` of the set (``{"clean": E_clean^A, "corrupted": {c: E_c^A}}``, errors averaged over severities 1-5):

    * per corruption ``be = mean_s E_c,s / E_c^A`` and ``rbe = (mean_s E_c,s - E_clean) / (E_c^A - E_clean^A)``;
    * ``be`` and ``rbe``: the means of those over the corruptions.

    Both need every severity 1..5 (the baseline averages all five) and, for the overall numbers, every corruption
    of the set; otherwise they are ``None`` and ``notes`` says why. ``rbe_unstable`` lists the corruptions whose
    baseline difference ``E_c^A - E_clean^A`` is below :data:`RBE_UNSTABLE_BELOW` (their rBE divides by almost
    nothing, or by a negative number).
    """
    notes: list[str] = []
    per: dict[str, dict[str, Any]] = {}
    for name, by_sev in errors.items():
        vals = [float(v) for v in by_sev.values()]
        per[name] = {"mean_error": float(np.mean(vals)) if vals else float("nan"), "be": None, "rbe": None}
    means = [p["mean_error"] for p in per.values()]
    out: dict[str, Any] = {"clean_error": float(clean_error),
                           "mean_corrupted_error": float(np.mean(means)) if means else float("nan"),
                           "per_corruption": per, "be": None, "rbe": None, "rbe_unstable": [], "notes": notes}
    if baseline is None:
        notes.append("BE and rBE are omitted: MedMNIST-C gives no AlexNet baseline for this data")
        return out
    full = all(set(int(s) for s in by_sev) == set(SEVERITIES) for by_sev in errors.values())
    if not full:
        notes.append("BE and rBE are omitted: they need all five severities (the AlexNet baseline averages "
                     "severities 1-5)")
        return out
    base_clean, base = float(baseline["clean"]), baseline["corrupted"]
    for name, p in per.items():
        if name not in base:
            continue
        p["be"] = p["mean_error"] / float(base[name])
        p["rbe"] = (p["mean_error"] - float(clean_error)) / (float(base[name]) - base_clean)
        if float(base[name]) - base_clean < RBE_UNSTABLE_BELOW:
            out["rbe_unstable"].append(name)
    if set(per) != set(base):
        notes.append(f"overall BE and rBE are omitted: they average all {len(base)} corruptions of the set, "
                     f"{len(set(base) & set(per))} were evaluated")
        return out
    out["be"] = float(np.mean([per[n]["be"] for n in base]))
    out["rbe"] = float(np.mean([per[n]["rbe"] for n in base]))
    if out["rbe_unstable"]:
        notes.append(f"rBE of {', '.join(out['rbe_unstable'])} divides by AlexNet's corrupted - clean error "
                     f"below {RBE_UNSTABLE_BELOW} (MedMNIST-C's formula, applied as defined); it can dominate rBE")
    return out


# ----------------------------------------------------------------------------------------------- evaluation
def _nchw_to_images(x: Any) -> np.ndarray:
    """uint8 torch (N, C, H, W) -> numpy (N, H, W) or (N, H, W, 3)."""
    a = x.numpy()
    return a[:, 0] if a.shape[1] == 1 else np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _images_to_nchw(a: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2)))


def evaluate_corruptions(run: Any, data_dir: str | os.PathLike | None = None, *, split: str = "test",
                         severities: Iterable[int] = SEVERITIES, seed: int = 0, names: Sequence[str] | None = None,
                         batch_size: int = 512, precision: str = "run") -> dict[str, Any]:
    """Score a single-dataset run on corrupted copies of a split (default the test split).

    Every corruption of :func:`corruptions_for` the run's dataset (or the ``names`` among them) is applied at each
    of ``severities``; the images go through the run's own transform in its own precision (``"run"``: the one it
    was evaluated in after training) and are scored with its temperature and threshold, as ``medmix evaluate``
    does. Returns ``clean`` (ACC, AUC, balanced error), ``corruptions[name]`` (kind, parameters, and per severity
    ACC, AUC, balanced error and ``mean_abs_change``, the mean absolute pixel change in gray levels), the
    :func:`robustness_scores` summary (``mean_corrupted_error``, ``be``, ``rbe`` and per corruption), the AlexNet
    ``baseline`` where MedMNIST-C has one, and ``notes``.
    """
    import torch

    from .calibrate import stored_temperature
    from .evaluation import _check_split, score_logits
    from .inference import predict_logits, resolve_precision
    from .run import Run

    _check_split(split)
    sev = check_severities(severities)
    run = Run.of(run).require_single("medmix evaluate --corruptions")
    meta = run.meta
    if precision == "run":
        precision = meta.get("precision") or "auto"
    precision = resolve_precision(precision)
    bundle = run.training_data(data_dir)
    info, data = run.task, bundle.splits[split]
    flag = bundle.name if bundle.source.get("kind") == "medmnist" else None
    table = corruptions_for(flag, info.n_channels)
    set_name = corruption_set_name(flag, info.n_channels)
    if names is not None:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ConfigError(f"unknown corruption {', '.join(map(repr, unknown))} for {set_name}; its corruptions: "
                              f"{', '.join(table)}")
        table = {n: table[n] for n in table if n in set(names)}
    model, tf = run.build_model(), run.transform()
    temperature, threshold = stored_temperature(meta), meta.get("threshold", 0.5)
    labels = data.labels

    def score(logits: Any) -> dict[str, float]:
        m, probs = score_logits(logits, labels, info.task, info.class_names, temperature, threshold)
        return {"acc": float(m["acc"]), "auc": float(m["auc"]),
                "balanced_error": balanced_error(labels.numpy(), probs, info.task, threshold)}

    clean = score(predict_logits(model, data.images, tf, batch_size, precision))
    images = _nchw_to_images(data.images)
    chunk = max(8, CHUNK_PIXELS // (images.shape[1] * images.shape[2]))
    results: dict[str, Any] = {}
    for name, c in table.items():
        rows = {}
        for s in sev:
            logits, change = [], 0.0
            for k, start in enumerate(range(0, len(images), chunk)):
                part = images[start:start + chunk]
                bad = corrupt(part, c, s, seed=(seed, k))
                change += float(np.abs(bad.astype(np.int16) - part.astype(np.int16)).sum())
                logits.append(predict_logits(model, _images_to_nchw(bad), tf, batch_size, precision))
            rows[s] = {**score(torch.cat(logits)), "mean_abs_change": change / max(1, images.size)}
        results[name] = {"kind": c.kind, "params": {s: _plain(c.params[s - 1]) for s in sev}, "severities": rows}
    baseline = ALEXNET_BASELINE.get(flag) if flag else None
    summary = robustness_scores(clean["balanced_error"],
                                {n: {s: r["balanced_error"] for s, r in v["severities"].items()}
                                 for n, v in results.items()}, baseline)
    for n, p in summary["per_corruption"].items():
        results[n].update(mean_balanced_error=p["mean_error"], be=p["be"], rbe=p["rbe"])
    side = int(data.images.shape[-1])
    notes = list(summary["notes"])
    faint = {n: [s for s, row in v["severities"].items() if row["mean_abs_change"] < FAINT_CHANGE]
             for n, v in results.items()}
    faint = {n: f for n, f in faint.items() if f}
    if faint:
        notes.append(f"almost unchanged images (mean |change| below {FAINT_CHANGE} gray levels) at {side} px: "
                     + "; ".join(f"{n} at severit{'y' if len(f) == 1 else 'ies'} {', '.join(map(str, f))}"
                                 for n, f in faint.items())
                     + " (a blur or overlay smaller than a pixel at this resolution)")
    if side != REFERENCE_SIDE:
        notes.append(f"corrupted at {side} px (MedMNIST-C and its AlexNet baseline: 224 px); pixel-sized parameters "
                     f"scaled by {side}/224, value parameters as given: numbers compare with MedMNIST-C's in kind, not "
                     f"exactly")
    return {"kind": "robustness", "dataset": bundle.name, "split": split, "n": len(data), "image_size": side,
            "channels": info.n_channels, "model": meta["model"], "checkpoint": str(run.path),
            "float_precision": precision, "corruption_set": set_name, "severities": list(sev), "seed": seed,
            "task": info.task, "threshold": threshold, "clean": clean, "corruptions": results,
            "mean_corrupted_balanced_error": summary["mean_corrupted_error"], "be": summary["be"],
            "rbe": summary["rbe"], "rbe_unstable": summary["rbe_unstable"],
            "baseline": None if baseline is None else {
                "model": BASELINE_MODEL, "clean_balanced_error": baseline["clean"],
                "corrupted_balanced_error": float(np.mean(list(baseline["corrupted"].values()))),
                "per_corruption": dict(baseline["corrupted"])},
            "source": "MedMNIST-C (Di Salvo, Doerrich, Ledig, 2024); medmnistc 0.1.0 definitions", "notes": notes}


def _plain(v: Any) -> Any:
    return list(_plain(x) for x in v) if isinstance(v, (tuple, list)) else v


# ----------------------------------------------------------------------------------------------- output
def _num(v: Any, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def format_robustness(r: Mapping[str, Any]) -> str:
    """A table of :func:`evaluate_corruptions`'s result: balanced error per corruption (rows) and severity
    (columns), its mean, and the BE / rBE line."""
    sev = r["severities"]
    c = r["clean"]
    width = max([len("corruption")] + [len(n) for n in r["corruptions"]])
    head = f"{'corruption':<{width}} " + " ".join(f"{'sev ' + str(s):>7}" for s in sev) + f" {'mean':>7}"
    has_be = any(v.get("be") is not None for v in r["corruptions"].values())
    if has_be:
        head += f" {'BE':>6} {'rBE':>6}"
    lines = [f"{r['dataset']} {r['split']} split ({r['n']} images, {r['image_size']} px), {r['model']} "
             f"({r['float_precision']}): corruption robustness, MedMNIST-C corruptions ({r['corruption_set']})",
             f"clean: ACC {c['acc']:.4f}  AUC {_num(c['auc'], 4)}  balanced error {c['balanced_error']:.4f}",
             "balanced error under corruption:", head]
    for name, v in r["corruptions"].items():
        row = f"{name:<{width}} " + " ".join(f"{_num(v['severities'][s]['balanced_error']):>7}" for s in sev)
        row += f" {_num(v['mean_balanced_error']):>7}"
        if has_be:
            row += f" {_num(v['be'], 2):>6} {_num(v['rbe'], 2):>6}"
        lines.append(row)
    line = f"mean corrupted balanced error {r['mean_corrupted_balanced_error']:.4f} (clean {c['balanced_error']:.4f})"
    if r["be"] is not None:
        b = r["baseline"]
        line += (f"; BE {r['be']:.3f}, rBE {r['rbe']:.3f} (relative to {b['model']}: clean "
                 f"{b['clean_balanced_error']:.3f}, corrupted {b['corrupted_balanced_error']:.3f})")
    lines.append(line)
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN and infinities become null, keys strings, numpy scalars Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def plot_robustness(r: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """A PNG grid, one panel per corruption: balanced error against severity, the clean error as a dashed line
    (and AlexNet's mean over severities at 224 px, dotted, where MedMNIST-C gives it)."""
    from .metrics import _new_figure, save_figure

    names = list(r["corruptions"])
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = _new_figure(3.0 * cols, 2.4 * rows + 0.6)
    sev = r["severities"]
    clean = r["clean"]["balanced_error"]
    base = (r.get("baseline") or {}).get("per_corruption", {})
    top = max([clean] + [v["severities"][s]["balanced_error"] for v in r["corruptions"].values() for s in sev]
              + list(base.values()))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ys = [r["corruptions"][name]["severities"][s]["balanced_error"] for s in sev]
        ax.plot(sev, ys, "o-", color="tab:red", label="corrupted")
        ax.axhline(clean, ls="--", color="tab:blue", label="clean")
        if name in base:
            ax.axhline(base[name], ls=":", color="gray", label="AlexNet 224 px (mean)")
        ax.set(title=name, xticks=list(SEVERITIES), xlim=(0.7, 5.3), ylim=(0, min(1.0, top * 1.1 + 0.02)))
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("balanced error")
        if i >= len(names) - cols:
            ax.set_xlabel("severity")
        if i == 0:
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"{r['dataset']} {r['split']} ({r['image_size']} px), {r['model']}: MedMNIST-C corruptions",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_robustness(r: dict[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """Write ``robustness.json`` and ``robustness.png`` into the directory ``out``; returns ``r`` with their
    paths (``json``, ``png``)."""
    import json

    from .atomic import atomic_write_text
    from .paths import ensure_dir

    d = ensure_dir(out, "--out")
    r = {**r, "json": str(d / "robustness.json"), "png": str(d / "robustness.png")}
    plot_robustness(r, d / "robustness.png")
    atomic_write_text(d / "robustness.json", json.dumps(jsonable(r), indent=2) + "\n")
    return r
