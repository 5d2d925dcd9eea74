"""Shared plumbing for the benchmark scripts: seeds, timing, mean +- std, and writing results/<name>.{json,md}."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
# like the command line: $MEDMIX_DATA, else medmnist's own download folder
DEFAULT_DATA = os.environ.get("MEDMIX_DATA", str(Path("~/.medmnist").expanduser()))


def machine() -> dict:
    import torch

    from medmix.inference import bf16_supported, machine_description

    return {"description": machine_description(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "native_bf16": bf16_supported(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = [float(x) for x in values]
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(values: Iterable[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds; a single run is shown without a spread it does not have."""
    v = list(values)
    m, s = mean_std(v)
    return f"{m:.{digits}f}" if len(v) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def write_results(name: str, doc: dict, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    from medmix.training import jsonable as _jsonable

    (RESULTS / f"{name}.json").write_text(json.dumps(_jsonable(doc), indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nwrote {RESULTS / name}.json and .md", file=sys.stderr)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# Published recipes, as TrainConfig fields. "medmix" is the package's own defaults.
RECIPES: dict[str, dict[str, Any]] = {
    "medmix": {},
    # "Medical Image Classification Based on Transformer Model and Ordinal Loss" (Liu): AdamW, lr 1e-3 with cosine
    # decay over 50 epochs, batch 128, random scaling / rotation / cropping / horizontal flip. The paper names no
    # weight decay (torch's AdamW default, 0.01, is used), no warm-up and no augmentation magnitudes (the
    # "medvit_paper" policy's are ours).
    "medvit_paper": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01, schedule="cosine", warmup_epochs=0.0,
                         epochs=50, batch_size=128, augment="medvit_paper"),
    # the official MedMNIST experiments script (MedMNIST v2, Yang et al.): Adam 1e-3, batch 128, 100 epochs, LR x0.1
    # at epochs 50 and 75, best epoch by val AUC, no augmentation, Normalize(mean .5, std .5), fp32, and nothing
    # fitted after training
    "medmnist_official": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="step", warmup_epochs=0.0,
                              epochs=100, batch_size=128, augment="none", normalize="half", bn_recalibrate=False,
                              precision="fp32", monitor="auc"),
    # the same, with medmix's per-dataset augmentation and its automatic precision (bf16 where the CPU has it)
    "medmnist_official_aug": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="step", warmup_epochs=0.0,
                                  epochs=100, batch_size=128, augment=None, normalize="half", bn_recalibrate=False,
                                  precision="auto", monitor="auc"),
}


def recipe(name: str, **overrides: Any) -> dict[str, Any]:
    """TrainConfig keywords of a named recipe; ``overrides`` (those not None) win."""
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return {**RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}}


def train_or_reuse(out: str | Path, reuse: bool, *, reuse_only: bool = False, **train_kwargs: Any):
    """Train into ``out``, or, with ``reuse`` and a finished run there, read its ``metrics.json`` instead, so an
    interrupted benchmark continues where it stopped (an interrupted run is resumed from its last epoch). Returns an
    object with best_epoch, epochs_run, seconds, val, test, precision and machine (where the run was trained), or
    None with ``reuse_only`` when the run is not finished."""
    from types import SimpleNamespace

    out = Path(out)
    if not (reuse and (out / "metrics.json").is_file()):
        if reuse_only:
            return None
        from medmix.engine import TrainConfig, train

        resume = reuse and (out.with_name(out.name + ".partial") / "last.pth").is_file()
        train(TrainConfig(out=str(out), overwrite=not resume, quiet=True, resume=True if resume else None,
                          **train_kwargs))
    d = json.loads((out / "metrics.json").read_text())
    return SimpleNamespace(best_epoch=d["best_epoch"], seconds=d["train_seconds"], val=d["val"], test=d["test"],
                           epochs_run=d.get("epochs_run"),
                           precision=d.get("float_precision", d.get("precision")),
                           machine={"description": d.get("machine"), "native_bf16": d.get("native_bf16")})


def committed_runs(name: str, key: Callable[[dict], tuple], wanted: Callable[[dict], bool], have: list[dict]
                   ) -> list[dict]:
    """Rows of the committed ``results/<name>.json`` that ``wanted`` selects and ``have`` lacks (by ``key``): runs
    measured before whose run directories are not on this machine (``--keep-committed``)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return []
    seen = {key(r) for r in have}
    return [r for r in json.loads(path.read_text()).get("runs", []) if wanted(r) and key(r) not in seen]


def machine_label(m: dict | None) -> str:
    """Short CPU label for a table cell: native bf16 or not (the flag that changes speed and rounding)."""
    if not m or m.get("native_bf16") is None:
        return "?"
    return "AVX-512 BF16/AMX" if m.get("native_bf16") else "AVX2 (no native bf16)"
