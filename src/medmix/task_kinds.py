"""The four task kinds, as medmnist's ``INFO[flag]["task"]`` strings (so the official evaluator's semantics apply).
The one definition; torch-free, so the ONNX Runtime server can use it too."""
from __future__ import annotations

MULTI_CLASS = "multi-class"
BINARY = "binary-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"
TASKS = (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)
