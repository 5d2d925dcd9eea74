"""The package's layers, read from the source (module-level and function-level imports alike): no import cycles,
the bottom layers never reach up, and inference (predict, explain, export, serve) loads no training code."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "medmix"
TRAINING = {"medmix.engine", "medmix.generalist", "medmix.losses", "medmix.distributed", "medmix.quickstart"}
TOP = {"medmix.cli", "medmix.serve", "medmix.serve.app", "medmix.serve.onnx_backend"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in MODULES.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges[mod].add(sub if sub in MODULES else target)
            elif isinstance(node, ast.Import):
                edges[mod].update(a.name for a in node.names)
        edges[mod] = {t for t in edges[mod] if t in MODULES and t != mod}
    return edges


GRAPH = _graph()


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for t in GRAPH.get(m, ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_the_graph_is_read():
    assert len(MODULES) > 30 and "medmix.inference" in GRAPH["medmix.predict"]


def test_no_import_cycles():
    cycles = sorted(m for m in MODULES if m in _closure(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("low", ["medmix.data", "medmix.models", "medmix.metrics", "medmix.losses", "medmix.errors",
                                 "medmix.imaging", "medmix.paths", "medmix.inference", "medmix.checkpoint",
                                 "medmix.ood", "medmix.calibrate"])
def test_lower_layers_never_import_the_loop_the_cli_or_the_server(low):
    above = (TRAINING - {"medmix.losses"}) | TOP | {"medmix.evaluation", "medmix.predict", "medmix.explain"}
    reached = _closure(low) & above
    assert not reached, f"{low} reaches {sorted(reached)}"


@pytest.mark.parametrize("user", ["medmix.inference", "medmix.predict", "medmix.generalist_predictor",
                                  "medmix.explain", "medmix.export", "medmix.serve.app", "medmix.serve.onnx_backend"])
def test_inference_loads_no_training_code(user):
    reached = _closure(user) & TRAINING
    assert not reached, f"{user} reaches training code: {sorted(reached)}"


def test_onnx_server_backend_is_torch_free():
    """The ONNX Runtime backend runs in a server process without torch: it reaches only torch-free modules."""
    torch_free = {"medmix.errors", "medmix.imaging", "medmix._version", "medmix.cam_methods", "medmix.task_kinds",
                  "medmix"}
    assert _closure("medmix.serve.onnx_backend") <= torch_free
