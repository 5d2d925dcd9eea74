"""``medmix export --int8``: ONNX Runtime static quantization (QDQ), calibrated on the run's training images, checked
against the fp32 graph on the val split at export time (refused beyond the tolerance), and served by the ONNX
backend."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from PIL import Image

from medmix.errors import ConfigError, MedmixError


def metadata(path) -> dict:
    import onnx

    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["medmix"])


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """The trained run exported twice: fp32 and int8 (default settings)."""
    from medmix.export import export_onnx

    d = tmp_path_factory.mktemp("int8")
    r32, r8 = export_onnx(trained_run.run_dir, d / "model.onnx"), export_onnx(trained_run.run_dir,
                                                                              d / "model_int8.onnx", int8=True)
    return r32, d / "model.onnx", r8, d / "model_int8.onnx"


@pytest.fixture(scope="module")
def val_outputs(exports, trained_run):
    """Both files run here in ONNX Runtime on the val split, preprocessed like the export's check (run.transform)."""
    import onnxruntime as ort

    from medmix.run import Run

    run = Run.load(trained_run.run_dir)
    val = run.training_data().splits["val"]
    x = run.transform(channels_last=False)(val.images).numpy()
    out = {}
    for name, path in (("fp32", exports[1]), ("int8", exports[3])):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        out[name] = dict(zip(names, sess.run(names, {"input": x})))
    return run, val, out


def test_int8_file_is_qdq_quantized_and_keeps_the_fp32_metadata(exports):
    import onnx

    r32, p32, r8, p8 = exports
    graph = onnx.load(str(p8)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 4  # the conv and matmul weights are stored as int8
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in onnx.load(str(p32)).graph.node}
    assert r8["bytes"] == p8.stat().st_size < 0.6 * p32.stat().st_size
    m32, m8 = metadata(p32), metadata(p8)
    gate = (m32.get("ood") or {}).get("gate")
    if gate:  # the fp32 file carries the modality gate, the graph that was quantized does not (said in the metadata)
        assert m8["ood"]["gate"] is None and "int8 graphs carry no modality gate" in m8["ood"]["gate_note"]
        assert r8["int8"]["fp32_bytes"] < r32["bytes"] == p32.stat().st_size
        assert m32["output_names"][3:] == ["modality_score", "modality_probabilities"]
        m32 = {**m32, "ood": {k: v for k, v in m32["ood"].items() if k != "gate"},
               "output_names": m32["output_names"][:3]}
        m8 = {**m8, "ood": {k: v for k, v in m8["ood"].items() if k not in ("gate", "gate_note")}}
    else:
        assert r8["int8"]["fp32_bytes"] == r32["bytes"] == p32.stat().st_size
    assert set(m8) == set(m32) | {"int8"}
    assert {k: v for k, v in m8.items() if k != "int8"} == m32  # same classes, task, normalisation, OOD, outputs
    assert m8["int8"] == r8["int8"]
    q = m8["int8"]
    assert (q["format"], q["activation_type"], q["weight_type"], q["per_channel"]) == ("QDQ", "QUInt8", "QInt8", True)
    assert q["calibration_images"] == 256 and q["calibration_split"] == "train" and q["split"] == "val"
    assert q["within_tolerance"] is True and q["forced"] is False
    assert r8["outputs"] == r32["outputs"][:3] and r8["max_abs_diff_probabilities"] <= 1e-4  # the fp32 check ran


def test_int8_parity_in_the_metadata_matches_a_recomputation(exports, val_outputs):
    from medmix.metrics import medmnist_acc, medmnist_auc, predict_labels
    from medmix.ood import Detector

    q = metadata(exports[3])["int8"]
    run, val, out = val_outputs
    labels, task, threshold = val.labels.numpy(), run.meta["task"]["task"], run.meta.get("threshold", 0.5)
    assert q["n"] == len(labels) == 78
    for name in ("fp32", "int8"):
        p = out[name]["probabilities"]
        assert q[f"{name}_acc"] == pytest.approx(medmnist_acc(labels, p, task, threshold), abs=1e-12)
        assert q[f"{name}_auc"] == pytest.approx(medmnist_auc(labels, p, task), abs=1e-12)
    p32, p8 = out["fp32"]["probabilities"], out["int8"]["probabilities"]
    assert 0 < np.abs(p32 - p8).max() == pytest.approx(q["max_abs_diff_probabilities"], abs=1e-7)  # really int8
    agree = float(np.mean(predict_labels(p32, task, threshold) == predict_labels(p8, task, threshold)))
    assert q["label_agreement"] == pytest.approx(agree) and agree >= 0.9  # int8 agrees with fp32 on most images
    assert q["fp32_acc"] - q["int8_acc"] <= 0.005 and q["fp32_auc"] - q["int8_auc"] <= 0.005
    detector = Detector.from_checkpoint(run.meta, run.extras)
    if detector is not None:
        flags = [detector.flags(out[k]["ood_score"], val.images) for k in ("fp32", "int8")]
        assert q["ood_flag_agreement"] == pytest.approx(float(np.mean(flags[0] == flags[1])))
        # the OOD subgraph stays float: int8 scores follow the fp32 ones
        assert np.corrcoef(out["fp32"]["ood_score"], out["int8"]["ood_score"])[0, 1] > 0.95


def test_int8_refuses_beyond_the_tolerance_and_leaves_no_file(trained_run, tmp_path, capsys):
    from medmix.export import export_onnx

    out = tmp_path / "out" / "refused.onnx"
    with pytest.raises(MedmixError, match=r"loses too much .* ACC \d\.\d{4} -> \d\.\d{4}, AUC \d\.\d{4} -> "
                                          r"\d\.\d{4} .*no file was written") as e:
        export_onnx(trained_run.run_dir, out, int8=True, int8_tolerance=(-1.0, -1.0))
    assert "\n" not in str(e.value) and "--int8-force" in str(e.value)
    assert not out.exists() and not any(tmp_path.rglob("*.onnx"))
    capsys.readouterr()
    r = export_onnx(trained_run.run_dir, out, int8=True, int8_tolerance=(-1.0, -1.0), int8_force=True,
                    calibration_images=16)
    err = capsys.readouterr().err
    assert "medmix: warning:" in err and "--int8-force" in err
    q = metadata(out)["int8"]
    assert q == r["int8"] and q["forced"] is True and q["within_tolerance"] is False and q["calibration_images"] == 16


def test_int8_argument_errors(trained_run, tmp_path):
    from medmix.checkpoint import load_checkpoint, save_checkpoint
    from medmix.export import export_onnx

    out = tmp_path / "m.onnx"
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="--calibration-images"):
            export_onnx(trained_run.run_dir, out, int8=True, calibration_images=bad)
    with pytest.raises(ConfigError, match="--opset 13"):
        export_onnx(trained_run.run_dir, out, opset=11, int8=True)
    # the run's data cannot be found: one line that says --int8 needs them and how to point at them
    with pytest.raises(ConfigError, match=r"--int8 .*training data .*cannot be loaded.*--data-dir DIR or "
                                          r"MEDMIX_DATA"):
        export_onnx(trained_run.run_dir, out, int8=True, data_dir=tmp_path / "empty")
    state, meta, _, extras = load_checkpoint(trained_run.run_dir, extras=True)
    moved = tmp_path / "moved.pth"
    save_checkpoint(moved, state, {**meta, "data_source": {"kind": "folder", "path": str(tmp_path / "gone")}},
                    extras=extras)
    with pytest.raises(ConfigError, match=r"cannot be loaded .*put them back there"):
        export_onnx(moved, out, int8=True)
    generalist = tmp_path / "gen.pth"
    save_checkpoint(generalist, state, {**meta, "kind": "generalist"}, extras=extras)
    with pytest.raises(ConfigError, match="generalist checkpoint .*--int8 supports single-dataset"):
        export_onnx(generalist, out, int8=True)
    assert not out.exists()


def test_cli_export_int8(trained_run, tmp_path, capsys):
    from medmix.cli import main

    out = tmp_path / "cli_int8.onnx"
    assert main(["export", str(trained_run.run_dir), "--onnx", str(out), "--int8"]) == 0
    text = capsys.readouterr().out
    q = metadata(out)["int8"]
    assert f"int8 (QDQ, 256 calibration images) against fp32 on val (78 images): ACC {q['fp32_acc']:.4f} -> " \
           f"{q['int8_acc']:.4f}, AUC {q['fp32_auc']:.4f} -> {q['int8_auc']:.4f}" in text
    assert f"size: fp32 {q['fp32_bytes'] / 1e6:.2f} MB -> int8 {out.stat().st_size / 1e6:.2f} MB" in text
    assert main(["export", str(trained_run.run_dir), "--onnx", str(tmp_path / "j.onnx"), "--int8",
                 "--calibration-images", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["int8"]["calibration_images"] == 10
    for argv, why in ((["--int8", "--calibration-images", "0"], "--calibration-images must be a positive"),
                      (["--calibration-images", "10"], "--calibration-images only applies with --int8"),
                      (["--int8-force"], "--int8-force only applies with --int8")):
        bad = tmp_path / "bad.onnx"
        assert main(["export", str(trained_run.run_dir), "--onnx", str(bad), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("medmix: error:") and why in err and err.count("\n") == 1 and not bad.exists()


def test_serve_int8_file(exports, trained_run):
    """`medmix serve CKPT --backend onnx --onnx model_int8.onnx`: the app answers predictions from the int8 file."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from medmix.data.medmnist import ASSETS
    from medmix.serve.app import create_app
    from medmix.serve.onnx_backend import OnnxPredictor

    _, p32, _, p8 = exports
    with np.load(ASSETS / "breastmnist.npz") as d:
        images = d["test_images"][:12].copy()
    inputs = [png_bytes(a) for a in images]
    want = OnnxPredictor(p32, threads=1).predict(inputs)
    got = OnnxPredictor(p8, threads=1).predict(inputs)
    gate = {"modality_score", "modality_match", "looks_like", "looks_like_probability", "flagged_by"}
    assert set(got[0]) - gate == set(want[0]) - gate  # same answer fields, OOD included (int8: no modality gate)
    assert np.mean([g["label"] == w["label"] for g, w in zip(got, want)]) >= 0.9
    with TestClient(create_app(trained_run.run_dir, backend="onnx", onnx_path=p8)) as c:
        body = c.post("/v1/predict", files=[("files", (f"{i}.png", b)) for i, b in enumerate(inputs[:3])]).json()
        assert body["backend"] == "onnx" and len(body["predictions"]) == 3, body
        assert [p["label"] for p in body["predictions"]] == [g["label"] for g in got[:3]]
        assert c.get("/v1/model").json()["classes"] == metadata(p8)["classes"]
