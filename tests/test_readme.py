"""The README is what a stranger reads first: its quick start is what CI runs, and it speaks in the project's own
voice (papers by title, data paths a user has, no planning shorthand)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_quick_start_verbatim():
    """.ci/run reads the quick-start block itself; the same awk program must find the README's two commands."""
    ci = (ROOT / ".ci" / "run").read_text()
    program = re.search(r"awk '([^']+)' README.md", ci).group(1)
    found = subprocess.run(["awk", program, str(ROOT / "README.md")], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert found == ['pip install -e . && medmix quickstart', 'pip install -e ".[dev]" && pytest']
    assert "python3 -m venv" in ci and "mktemp -d" in ci  # a new environment outside the checkout, every run


def test_no_planning_shorthand_or_developer_paths():
    for pattern in (r"\bissue[ -]?\d", r"\bseed's\b", r"\b(first|second|third) seed\b", r"seed (paper|report)",
                    r"\.\./shared", r"\b\d{3} tests\b"):
        hits = re.findall(pattern, README, flags=re.IGNORECASE)
        assert not hits, (pattern, hits)


def test_papers_are_cited_by_title_and_extras_are_named():
    for title in ("Hybrid Convolutional Neural Network with Global Token Mixer for Medical Image Classification",
                  "A CNN + Transformer model for Medical MNIST",
                  "Medical Image Classification Based on Transformer Model and Ordinal Loss"):
        assert title in " ".join(README.split())  # line breaks inside a title are fine
    for extra in ("`serve`", "`onnx`", "`all`", "`dev`"):
        assert extra in README
    assert "chromium-driver" in README
