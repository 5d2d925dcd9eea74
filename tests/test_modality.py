"""The modality gate: the shipped weights, the gate's view of an image, its per-run fit at training end, and the
foreign-modality warning in predict, explain (text, JSON, panel) and the HTTP API, on pydicom's real CT/MR files."""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from medmix.cli import main
from medmix.data import load_dataset
from medmix.data.medmnist import ASSETS
from medmix.modality import GATE_FILE, GATE_INFO, gate_inputs, gate_outputs, load_gate
from medmix.ood import GATE_TPR, TPR, Detector, threshold_at_tpr
from medmix.predict import Predictor

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def dcm(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    return str(path)


@pytest.fixture(scope="module")
def breast():
    return load_dataset("breastmnist", data_dir=ASSETS)


def test_gate_view_is_three_channels_at_28_px_in_minus_one_to_one():
    grey = torch.full((2, 1, 64, 64), 255, dtype=torch.uint8)
    x = gate_inputs(grey)
    assert x.shape == (2, 3, 28, 28) and torch.allclose(x, torch.ones_like(x))
    rgb = torch.zeros((1, 3, 28, 28), dtype=torch.uint8)
    assert torch.equal(gate_inputs(rgb), -torch.ones(1, 3, 28, 28))
    from medmix.errors import ConfigError

    with pytest.raises(ConfigError, match="1 or 3"):
        gate_inputs(torch.zeros((1, 4, 28, 28), dtype=torch.uint8))


def test_shipped_weights_match_their_metadata_and_notice():
    info = json.loads(GATE_INFO.read_text())
    assert hashlib.md5(GATE_FILE.read_bytes()).hexdigest() == info["md5"]
    model, loaded = load_gate()
    assert loaded["classes"] == info["classes"] and model.num_classes == len(info["classes"])
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    assert GATE_FILE.stat().st_size < 1_000_000  # small enough to ship in the wheel
    notice = (ASSETS / "NOTICE.md").read_text()
    assert "modality_gate" in notice and "CC BY-SA 4.0" in notice and "CC BY 4.0" in notice
    f, p = gate_outputs(torch.zeros((0, 1, 28, 28), dtype=torch.uint8))
    assert f.shape == (0, model.num_features) and p.shape == (0, model.num_classes)


def test_gate_tells_the_embedded_ultrasound_from_pydicoms_ct_and_mr(breast):
    """The shipped weights themselves: BreastMNIST test images are taken for ultrasound, a real CT slice is not
    (its percentile window makes it look unlike MedNIST's CT slices: the gate may call it another modality; the
    per-run Gaussian is what flags it, tested below)."""
    from medmix.imaging import load_image_np

    _, p = gate_outputs(breast.splits["test"].images)
    classes = load_gate()[1]["classes"]
    assert np.mean(p.argmax(1) == classes.index("breast ultrasound")) >= 0.95
    ct = torch.from_numpy(load_image_np(dcm("CT_small.dcm"), 1, 28))[None]
    assert classes[int(gate_outputs(ct)[1].argmax())] != "breast ultrasound"


def test_threshold_with_a_passed_mask_keeps_the_share_of_all_images():
    s = np.arange(100, dtype=float)
    assert threshold_at_tpr(s, 0.95) == 95.0  # 96 of 100 kept: the split-conformal rank ceil(0.95 * 101)
    passed = np.ones(100, bool)
    passed[[0, 1]] = False  # two images already flagged by the gate: two more for the score to flag
    assert threshold_at_tpr(s, 0.95, passed=passed) == 97.0
    assert threshold_at_tpr(s, 0.95, passed=np.arange(100) < 50) == 49.0  # unreachable: the largest passed score


def test_runs_carry_a_gate_fit_and_keep_the_val_share_together(trained_run, breast):
    p = Predictor(trained_run.run_dir)
    gate = p.meta["ood"]["gate"]
    assert gate["tpr"] == GATE_TPR and gate["gate"] == load_gate()[1]["md5"] and gate["n_fit"] == 546
    assert max(gate["modalities"], key=gate["modalities"].get) == "breast ultrasound"
    _, res = p.logits_and_ood(breast.splits["val"].images)
    kept = np.mean([r["in_distribution"] for r in res])
    assert kept >= TPR - 1 / 78  # both checks together keep 95 % of val (78 images)
    assert np.mean([r["modality_match"] for r in res]) >= GATE_TPR - 1 / 78
    assert all({"modality_score", "modality_match", "looks_like", "looks_like_probability"} <= set(r) for r in res)
    assert all(("flagged_by" in r) == (not r["in_distribution"]) for r in res)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_predict_flags_real_ct_and_mr_for_a_breast_ultrasound_model(trained_run, capsys, name):
    assert main(["predict", str(trained_run.run_dir), dcm(name), "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["in_distribution"] is False and "modality" in r["flagged_by"] and r["modality_match"] is False
    assert r["looks_like"] != "breast ultrasound"
    assert main(["predict", str(trained_run.run_dir), dcm(name)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: out of distribution (modality score" in out and f"it looks like a {r['looks_like']}" in out


def test_explain_reports_the_verdict_in_text_json_and_panel(trained_run, tmp_path, capsys, breast):
    from PIL import Image

    Image.fromarray(breast.splits["test"].images[0, 0].numpy()).save(tmp_path / "own.png")
    args = ["explain", str(trained_run.run_dir), dcm("CT_small.dcm"), str(tmp_path / "own.png"),
            "--out", str(tmp_path / "x")]
    assert main(args + ["--json"]) == 0
    ct, own = json.loads(capsys.readouterr().out)
    assert ct["in_distribution"] is False and ct["modality_match"] is False and "looks_like" in ct
    assert isinstance(own["in_distribution"], bool) and "ood_score" in own
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].strip().startswith("WARNING: out of distribution")  # under the CT's line
    assert ct["png"].endswith(".png") and (tmp_path / "x" / ct["png"].split("/")[-1]).is_file()


def test_explain_panel_draws_the_warning(trained_run, tmp_path, monkeypatch):
    import medmix.explain as ex

    titles = []
    real = ex._panel
    monkeypatch.setattr(ex, "_panel", lambda *a, **k: titles.append(a[6] if len(a) > 6 else k.get("warning"))
                        or real(*a, **k))
    ex.explain(trained_run.run_dir, [dcm("CT_small.dcm")], tmp_path)
    assert titles and titles[0].startswith("WARNING: out of distribution")


def test_a_checkpoint_fitted_on_another_gate_warns_and_keeps_its_own_score(trained_run):
    p = Predictor(trained_run.run_dir)
    block = json.loads(json.dumps(p.meta["ood"]))
    block["gate"]["gate"] = "0" * 32
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = Detector(block, p.run.extras, task=p.info.task)
    assert d.gate is None and any("another version of the gate" in str(x.message) for x in w)
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8))
    logits, feats = __import__("medmix.inference", fromlist=["extract"]).extract(p.model, noise, p.transform)
    res = d(logits, feats, noise)
    assert all("modality_score" not in r and r["in_distribution"] is False for r in res)


def test_http_api_answers_a_dicom_upload_with_the_gate_fields(trained_run):
    from fastapi.testclient import TestClient

    from medmix.serve.app import create_app

    with open(dcm("CT_small.dcm"), "rb") as f:
        data = f.read()
    with TestClient(create_app(trained_run.run_dir)) as c:
        r = c.post("/v1/predict", files={"files": ("ct.dcm", data, "application/dicom")})
        assert r.status_code == 200, r.text
        (p,) = r.json()["predictions"]
        assert p["in_distribution"] is False and p["modality_match"] is False and "modality" in p["flagged_by"]
        info = c.get("/v1/model").json()
        assert info["ood"]["gate"]["threshold"] > 0


def test_onnx_export_carries_the_gate_and_the_onnx_backend_answers_like_torch(trained_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from medmix.export import export_onnx
    from medmix.serve.onnx_backend import OnnxPredictor

    r = export_onnx(trained_run.run_dir, tmp_path / "m.onnx")
    assert r["outputs"][-2:] == ["modality_score", "modality_probabilities"] and r["ood"]["gate"]["threshold"] > 0
    files = [dcm("CT_small.dcm"), dcm("MR_small.dcm")]
    got, want = OnnxPredictor(tmp_path / "m.onnx").predict(files), Predictor(trained_run.run_dir).predict(files)
    for g, w in zip(got, want):
        assert g["in_distribution"] == w["in_distribution"] is False and g["flagged_by"] == w["flagged_by"]
        assert g["looks_like"] == w["looks_like"]
        assert g["modality_score"] == pytest.approx(w["modality_score"], rel=1e-3)


def test_int8_export_states_that_it_carries_no_gate(trained_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from medmix.export import export_onnx

    r = export_onnx(trained_run.run_dir, tmp_path / "q.onnx", int8=True, int8_force=True, data_dir=ASSETS,
                    calibration_images=32)
    assert "modality_score" not in r["outputs"] and r["ood"]["gate"] is None
    assert "int8 graphs carry no modality gate" in r["ood"]["gate_note"]
