"""ONNX export (self-check, metadata, dynamic batch) and the ONNX Runtime backend (torch parity, no torch import)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from PIL import Image

from medmix.errors import MedmixError


def png_bytes(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, **kw).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    from medmix.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(trained_run.run_dir, out), out


def made_checkpoint(tmp_path, trained_run, *, task: str, classes, channels: int, data_size: int, img_size: int,
                    temperature, seed: int = 0):
    """A random-weight checkpoint of another task/size, built from the trained run's metadata (no training)."""
    from medmix.checkpoint import build_model, load_checkpoint, save_checkpoint

    _, meta, _ = load_checkpoint(trained_run.run_dir)
    meta = {**meta, "task": {"task": task, "class_names": list(classes), "n_channels": channels},
            "data_size": data_size, "img_size": img_size, "temperature": temperature,
            "mean": [0.3, 0.5, 0.4][:channels], "std": [0.2, 0.25, 0.3][:channels],
            "model_kwargs": {**meta["model_kwargs"], "num_classes": len(classes), "in_chans": channels,
                             "img_size": img_size}}
    torch.manual_seed(seed)
    model = build_model(meta)
    path = tmp_path / f"ckpt-{task[:5]}-{channels}-{data_size}-{img_size}.pth"
    save_checkpoint(path, model, meta)
    return path


def varied_inputs(test_images: np.ndarray) -> list[bytes]:
    """PNG inputs that exercise decoding: stored size, enlarged, shrunk, odd sizes, RGB, RGBA, 16-bit."""
    a = test_images
    out = [png_bytes(a[0]), png_bytes(a[1])]
    out.append(png_bytes(np.asarray(Image.fromarray(a[2]).resize((61, 47), Image.Resampling.BILINEAR))))
    out.append(png_bytes(np.asarray(Image.fromarray(a[3]).resize((200, 180), Image.Resampling.BICUBIC))))
    out.append(png_bytes(np.stack([a[4], a[5], a[6]], -1)))
    out.append(png_bytes(np.dstack([a[7], a[8], a[9], np.full_like(a[7], 200)])))
    out.append(png_bytes((a[10].astype(np.uint16) * 257).astype(np.uint16)))
    out.append(png_bytes(a[11][5:20, 3:27]))
    return out


@pytest.fixture(scope="module")
def test_images():
    from medmix.data.medmnist import ASSETS

    with np.load(ASSETS / "breastmnist.npz") as d:
        return d["test_images"][:12].copy()


# ----------------------------------------------------------------------------------------------- export
def test_export_checks_itself_and_embeds_metadata(exported, trained_run):
    import onnx
    import onnxruntime as ort

    from medmix import __version__
    from medmix.checkpoint import load_checkpoint

    r, path = exported
    assert path.is_file() and r["bytes"] == path.stat().st_size
    assert r["max_abs_diff_probabilities"] <= 1e-4 and r["outputs"][:2] == ["logits", "probabilities"]
    _, meta, _ = load_checkpoint(trained_run.run_dir)
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    doc = json.loads(props["medmix"])
    assert doc["classes"] == meta["task"]["class_names"] == json.loads(props["classes"])
    assert doc["task"] == meta["task"] and doc["mean"] == meta["mean"] and doc["std"] == meta["std"]
    assert doc["temperature"] == meta.get("temperature", 1.0) and doc["medmix_version"] == __version__
    assert doc["data_size"] == meta["data_size"] and doc["img_size"] == meta["img_size"]
    if meta.get("ood"):  # the checkpoint's OOD detector travels as an output plus its threshold
        assert doc["ood"]["method"] == meta["ood"]["method"] and doc["ood"]["threshold"] == meta["ood"]["threshold"]
        assert r["outputs"][:3] == ["logits", "probabilities", "ood_score"] and r["max_rel_diff_ood_score"] <= 1e-3
        if meta["ood"].get("gate"):  # and the modality gate as two more outputs with its threshold
            assert r["outputs"][3:] == ["modality_score", "modality_probabilities"]
            assert doc["ood"]["gate"]["threshold"] == meta["ood"]["gate"]["threshold"]
    # dynamic batch axis
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"
    for b in (1, 5):
        logits, probs = sess.run(["logits", "probabilities"], {"input": np.zeros((b, 1, 28, 28), np.float32)})
        assert logits.shape == probs.shape == (b, 2)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_export_refuses_a_bad_check_and_writes_nothing(trained_run, tmp_path):
    from medmix.export import export_onnx

    out = tmp_path / "bad.onnx"
    with pytest.raises(MedmixError, match="disagrees with torch"):
        export_onnx(trained_run.run_dir, out, tolerance=-1.0)
    assert not out.exists()
    with pytest.raises(MedmixError, match="no such checkpoint"):
        export_onnx(tmp_path / "missing.pth", out)


def test_cli_export_json(trained_run, tmp_path, capsys):
    from medmix.cli import main

    out = tmp_path / "cli.onnx"
    assert main(["export", str(trained_run.run_dir), "--onnx", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["onnx"] == str(out) and out.is_file() and r["max_abs_diff_probabilities"] <= 1e-4


# ----------------------------------------------------------------------------------------------- the ONNX backend
def test_onnx_backend_matches_torch_predictor_on_png_inputs(exported, trained_run, test_images):
    from medmix.predict import Predictor
    from medmix.serve.onnx_backend import OnnxPredictor

    _, path = exported
    tp, op = Predictor(trained_run.run_dir), OnnxPredictor(path, threads=1)
    inputs = varied_inputs(test_images)
    for src in inputs:  # the decoded pixels are identical
        np.testing.assert_array_equal(op.load(src), tp.load(src).numpy())
    rng = np.random.default_rng(0)  # and two images unlike the training data, for the OOD flag
    inputs += [png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8)), png_bytes(np.full((40, 40), 255, np.uint8))]
    want, got = tp.predict(inputs), op.predict(inputs)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g.get("in_distribution") for g in got] == [w.get("in_distribution") for w in want]
    for g, w in zip(got, want):
        if "ood_score" in w:
            assert g["ood_score"] == pytest.approx(w["ood_score"], rel=1e-3, abs=1e-3)
    pt = tp.probabilities(torch.stack([tp.load(x) for x in inputs])).numpy()
    po = op.probabilities(np.stack([op.load(x) for x in inputs]))
    assert np.abs(pt - po).max() <= 1e-4
    assert set(got[0]) == set(want[0])
    blank = [png_bytes(np.full((28, 28), v, np.uint8)) for v in (0, 128)]  # the blank guard, as Predictor's
    assert [g["in_distribution"] for g in op.predict(blank)] == [w["in_distribution"] for w in tp.predict(blank)]
    assert all(g["in_distribution"] is False for g in op.predict(blank))


@pytest.mark.parametrize("task,classes,channels,data_size,img_size,temperature", [
    ("multi-label, binary-class", ("a", "b", "c"), 3, 28, 32, [1.5, 0.7, 2.0]),  # bilinear enlarge, per-label T
    ("multi-class", ("x", "y", "z", "w"), 1, 64, 28, 2.5),  # antialiased shrink, scalar T
])
def test_onnx_backend_parity_other_tasks_and_sizes(tmp_path, trained_run, test_images, task, classes, channels,
                                                   data_size, img_size, temperature):
    from medmix.export import export_onnx
    from medmix.predict import Predictor
    from medmix.serve.onnx_backend import OnnxPredictor

    ckpt = made_checkpoint(tmp_path, trained_run, task=task, classes=classes, channels=channels,
                           data_size=data_size, img_size=img_size, temperature=temperature)
    r = export_onnx(ckpt, tmp_path / "m.onnx", check_batch=4)
    assert r["max_abs_diff_probabilities"] <= 1e-4
    op, tp = OnnxPredictor(tmp_path / "m.onnx", threads=1), Predictor(ckpt)
    inputs = varied_inputs(test_images)
    pt = tp.probabilities(torch.stack([tp.load(x) for x in inputs])).numpy()
    po = op.probabilities(np.stack([op.load(x) for x in inputs]))
    assert np.abs(pt - po).max() <= 1e-4
    got, want = op.predict(inputs), tp.predict(inputs)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    # no Mahalanobis statistics in this checkpoint: both fall back to the energy score of its OOD block
    assert (tp.ood is None) == ("ood_score" not in got[0])
    for g, w in zip(got, want):
        if "ood_score" in w:
            assert g["in_distribution"] == w["in_distribution"]
            assert g["ood_score"] == pytest.approx(w["ood_score"], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("src,dst", [(28, 28), (28, 32), (28, 64), (64, 28), (64, 50), (30, 17)])
def test_numpy_transform_matches_batch_transform(src, dst):
    from medmix.data import BatchTransform
    from medmix.serve.onnx_backend import NumpyTransform

    x = torch.randint(0, 256, (3, 3, src, src), dtype=torch.uint8, generator=torch.Generator().manual_seed(src))
    mean, std = [0.2, 0.4, 0.6], [0.3, 0.2, 0.25]
    want = BatchTransform(dst, mean, std)(x).numpy()
    got = NumpyTransform(dst, mean, std)(x.numpy())
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() < 2e-4


def test_onnx_server_without_torch(exported, test_images, tmp_path):
    """The ONNX backend module and an onnx-backend server import, load and predict with torch blocked."""
    _, path = exported
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes(test_images[0]))
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch.") or name.startswith("torchvision"):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import medmix.serve.onnx_backend as ob
        p = ob.OnnxPredictor({str(path)!r}, threads=1)
        r = p.predict([{str(img)!r}])[0]
        from fastapi.testclient import TestClient
        from medmix.serve.app import create_app
        c = TestClient(create_app({str(path)!r}, backend="onnx"))
        body = c.post("/v1/predict", files={{"files": ("x.png", open({str(img)!r}, "rb").read())}}).json()
        assert body["backend"] == "onnx" and body["predictions"][0]["label"] == r["label"], body
        e = c.post("/v1/explain", files={{"files": ("x.png", b"abc")}})
        assert e.status_code == 501 and "torch" in e.json()["detail"], e.text
        assert c.get("/v1/model").json()["explain"] is False
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("OK", r["label"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("OK")


def test_onnx_backend_errors(exported, tmp_path):
    from medmix.errors import CheckpointError, ImageError
    from medmix.serve.onnx_backend import OnnxPredictor

    _, path = exported
    p = OnnxPredictor(path, threads=1)
    with pytest.raises(ImageError, match="not a readable image"):
        p.load(b"hello", "h.png")
    with pytest.raises(ImageError, match="empty"):
        p.load(b"", "e.png")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(CheckpointError):
        OnnxPredictor(bad)
    with pytest.raises(CheckpointError, match="no such"):
        OnnxPredictor(tmp_path / "missing.onnx")
