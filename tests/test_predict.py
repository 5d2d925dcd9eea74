"""Predict: every input format, any size and colour mode, converted like training data; the output contract of
the Python ``Predictor`` and of ``medmix predict`` (human table and ``--json``)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from medmix import Predictor
from medmix.cli import main
from medmix.data import load_dataset
from medmix.data.medmnist import ASSETS
from medmix.errors import ConfigError, ImageError

KEYS = {"file", "label", "index", "confidence", "probabilities"}
OOD_KEYS = {"in_distribution", "ood_score"}  # present when the checkpoint carries OOD statistics (trained runs do)
GATE_KEYS = {"modality_score", "modality_match", "looks_like", "looks_like_probability"}  # and its modality gate
CLASSES = ("malignant", "normal, benign")


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return load_dataset("breastmnist", data_dir=ASSETS).splits["test"].images[:4]


@pytest.fixture
def image_files(tmp_path, test_images) -> dict[str, object]:
    """The same test image in every supported format, plus a large colour photo-like image."""
    a = test_images[0, 0].numpy()
    files = {}
    for ext in ("png", "jpg", "tif", "bmp"):
        files[ext] = tmp_path / f"img.{ext}"
        Image.fromarray(a).save(files[ext])
    files["npy"] = tmp_path / "img.npy"
    np.save(files["npy"], a.astype(np.float32) / 255.0)  # float in [0, 1], as an array export would be
    big = np.random.default_rng(0).integers(0, 256, size=(300, 420, 3), dtype=np.uint8)
    files["big_rgb"] = tmp_path / "big.png"
    Image.fromarray(big).save(files["big_rgb"])
    return files


def check_result(r: dict, name: str) -> None:
    assert set(r) - {"flagged_by"} in (KEYS, KEYS | OOD_KEYS, KEYS | OOD_KEYS | GATE_KEYS)
    if "ood_score" in r:
        assert isinstance(r["in_distribution"], bool) and isinstance(r["ood_score"], float)
    assert r["file"] == name
    assert set(r["probabilities"]) == set(CLASSES)
    probs = list(r["probabilities"].values())
    assert sum(probs) == pytest.approx(1.0, abs=1e-5) and all(0 <= p <= 1 for p in probs)
    assert probs == sorted(probs, reverse=True)  # the distribution is ordered by probability
    assert r["label"] == CLASSES[r["index"]] == next(iter(r["probabilities"]))
    assert r["confidence"] == pytest.approx(max(probs), abs=1e-6)


def test_every_format(trained_run, image_files, test_images):
    p = Predictor(trained_run.run_dir)
    names = [str(f) for f in image_files.values()]
    results = p.predict(names)
    assert len(results) == len(names)
    for r, n in zip(results, names):
        check_result(r, n)
    # lossless formats give exactly the probabilities of the stored training-format image
    ref = p.probabilities(test_images[:1])[0]
    by_ext = dict(zip(image_files, results))
    for ext in ("png", "tif", "bmp", "npy"):
        got = torch.tensor([by_ext[ext]["probabilities"][c] for c in CLASSES])
        assert torch.allclose(got, ref, atol=2e-6), ext
    jpg = torch.tensor([by_ext["jpg"]["probabilities"][c] for c in CLASSES])
    assert torch.allclose(jpg, ref, atol=0.1)  # lossy, but close


def test_inputs_are_converted_like_training_data(trained_run, image_files):
    p = Predictor(trained_run.run_dir)
    x = p.load(str(image_files["big_rgb"]))
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8  # colour -> grey, any size -> stored size
    png = p.load(str(image_files["png"]))
    assert torch.equal(png, p.load(np.asarray(Image.open(image_files["png"]))))  # path and array agree
    assert torch.equal(png, p.load(image_files["png"].read_bytes()))  # and raw bytes


def test_in_memory_inputs_and_top_k(trained_run, test_images):
    p = Predictor(trained_run.run_dir)
    results = p.predict([test_images[i, 0].numpy() for i in range(4)], top_k=1)
    assert [r["file"] for r in results] == [f"image[{i}]" for i in range(4)]
    probs = p.probabilities(test_images)
    for r, row in zip(results, probs):
        assert len(r["probabilities"]) == 1
        assert r["index"] == int(row.argmax()) and r["confidence"] == pytest.approx(float(row.max()), abs=1e-6)
    with pytest.raises(ConfigError):
        p.predict([])


def test_undecodable_image(trained_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but the rest is garbage")
    with pytest.raises(ImageError, match="bad.png"):
        Predictor(trained_run.run_dir).predict([str(bad)])


def test_cli_json(trained_run, image_files, capsys):
    files = [str(image_files[k]) for k in ("png", "jpg", "npy", "big_rgb")]
    assert main(["predict", str(trained_run.run_dir), *files, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and len(out) == 4
    for r, f in zip(out, files):
        check_result(r, f)


def test_cli_top_k(trained_run, image_files, capsys):
    assert main(["predict", str(trained_run.run_dir / "best_model.pth"), str(image_files["png"]), "--json",
                 "--top-k", "1"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert list(r["probabilities"]) == [r["label"]]


def test_cli_human_table_is_sorted(trained_run, image_files, capsys):
    files = [str(image_files["png"]), str(image_files["bmp"])]
    assert main(["predict", str(trained_run.run_dir), *files]) == 0
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2
    for block, f in zip(blocks, files):
        head, *rows = block.splitlines()
        assert head.startswith(f + ": ") and "confidence" in head
        assert len(rows) == 2
        names = [next(c for c in CLASSES if row.strip().startswith(c)) for row in rows]
        pcts = [float(re.search(r"([\d.]+)%", row).group(1)) for row in rows]
        assert sorted(names) == sorted(CLASSES)
        assert pcts == sorted(pcts, reverse=True) and sum(pcts) == pytest.approx(100, abs=0.02)
        assert names[0] in head  # the label is the most probable class
