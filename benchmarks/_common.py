"""Shared plumbing for the benchmark scripts: seeds, timing, mean +- std, and writing results/<name>.{json,md}."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
DEFAULT_DATA = os.environ.get("MEDMIX_DATA", str(ROOT.parent / "shared" / "data"))


def machine() -> dict:
    import torch

    from medmix.engine import bf16_supported, machine_description

    return {"description": machine_description(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "native_bf16": bf16_supported(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = [float(x) for x in values]
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(values: Iterable[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_results(name: str, doc: dict, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    from medmix.engine import _jsonable

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


def train_or_reuse(out: str | Path, reuse: bool, **train_kwargs: Any):
    """Train into ``out``, or, with ``reuse`` and a finished run there, read its ``metrics.json`` instead, so an
    interrupted benchmark continues where it stopped. Returns an object with best_epoch, seconds, val, test."""
    from types import SimpleNamespace

    out = Path(out)
    if reuse and (out / "metrics.json").is_file():
        d = json.loads((out / "metrics.json").read_text())
        return SimpleNamespace(best_epoch=d["best_epoch"], seconds=d["train_seconds"], val=d["val"], test=d["test"])
    from medmix.engine import TrainConfig, train

    return train(TrainConfig(out=str(out), overwrite=True, quiet=True, **train_kwargs))
