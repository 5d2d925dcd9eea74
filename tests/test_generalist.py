"""The generalist (medmix.generalist): common format, temperature sampling, joint training with a modality router,
routed and forced prediction, per-dataset evaluation, checkpoint round trip, and the CLI around them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import class_images, write_official_npz

from medmix.cli import main
from medmix.data.mixture import LUMA, MixedBatchSampler, common_channels, sampling_weights, to_common_format
from medmix.errors import ConfigError
from medmix.generalist import (GeneralistPredictor, evaluate_generalist, evaluate_heads, is_generalist,
                               parse_datasets, train_generalist)
from medmix.metrics import compute_metrics
from medmix.models.multihead import MultiHeadClassifier, head_layout


# ----------------------------------------------------------------------------------------------- data
def test_sampling_weights_follow_the_temperature_rule():
    sizes = [4708, 546, 1080, 41267]
    np.testing.assert_allclose(sampling_weights(sizes, 1.0), np.array(sizes) / sum(sizes))
    root = np.sqrt(sizes)
    np.testing.assert_allclose(sampling_weights(sizes, 2.0), root / root.sum())
    np.testing.assert_allclose(sampling_weights(sizes, float("inf")), [0.25] * 4)
    assert sampling_weights(sizes, 2.0)[1] > sizes[1] / sum(sizes)  # the small set is not drowned
    for bad in ([], [10, 0]):
        with pytest.raises(ConfigError):
            sampling_weights(bad)
    with pytest.raises(ConfigError, match="temperature"):
        sampling_weights([1, 2], 0.0)


def test_sampler_proportions_and_no_repeat_before_a_pass():
    sizes, w = [30, 500, 70], sampling_weights([30, 500, 70], 2.0)
    s = MixedBatchSampler(sizes, 64, w, torch.Generator().manual_seed(0))
    counts = np.zeros(3)
    seen_small: list[int] = []
    for batch in s.batches(400):
        assert sum(len(idx) for _, idx in batch) == 64
        assert [d for d, _ in batch] == sorted(d for d, _ in batch)
        for d, idx in batch:
            counts[d] += len(idx)
            assert int(idx.min()) >= 0 and int(idx.max()) < sizes[d]
            if d == 0:
                seen_small.extend(idx.tolist())
    # proportions within 1% of the target over 25,600 draws
    np.testing.assert_allclose(counts / counts.sum(), w, atol=0.01)
    # every image of a dataset is drawn once before any is drawn twice
    first = seen_small[:30]
    assert sorted(first) == list(range(30))


def test_sampler_is_deterministic_given_the_generator():
    def draw(seed):
        s = MixedBatchSampler([10, 20], 8, [0.5, 0.5], torch.Generator().manual_seed(seed))
        return [(d, idx.tolist()) for b in s.batches(5) for d, idx in b]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_common_format_replicates_gray_and_reduces_colour():
    gray = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    rgb = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    g3 = to_common_format(gray, 28, 3)
    assert g3.shape == (5, 3, 28, 28) and g3.dtype == torch.uint8
    assert torch.equal(g3[:, 0], gray[:, 0]) and torch.equal(g3[:, 2], gray[:, 0])
    r1 = to_common_format(rgb, 64, 1)
    expected = (rgb.float() * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True).round()
    assert torch.equal(r1, expected.to(torch.uint8))
    small = to_common_format(rgb, 28, 3)
    assert small.shape == (4, 3, 28, 28)
    flat = torch.full((2, 1, 64, 64), 77, dtype=torch.uint8)
    assert torch.equal(to_common_format(flat, 28, 1), torch.full((2, 1, 28, 28), 77, dtype=torch.uint8))
    assert common_channels([1, 1]) == 1 and common_channels([1, 3]) == 3
    with pytest.raises(ConfigError):
        to_common_format(gray.float(), 28, 3)
    with pytest.raises(ConfigError):
        to_common_format(gray, 28, 2)


def test_parse_datasets():
    assert parse_datasets("a, b,c") == ("a", "b", "c")
    for bad in ("a,,b", "a,b,a", ""):
        with pytest.raises(ConfigError):
            parse_datasets(bad)


# ----------------------------------------------------------------------------------------------- model
def test_multihead_layout_and_gradients():
    assert head_layout([2, 5]) == [(0, 2), (2, 4), (4, 9)]
    m = MultiHeadClassifier("hybrid_mixer_small", [2, 5], in_chans=3, img_size=28)
    x = torch.randn(4, 3, 28, 28)
    out = m(x)
    assert out.shape == (4, 2 + 2 + 5)
    mod, h0, h1 = m.split(out)
    assert mod.shape == (4, 2) and h0.shape == (4, 2) and h1.shape == (4, 5)
    h1.sum().backward()  # a head's loss reaches the shared backbone but not the other head
    assert m.heads[0].weight.grad is None or float(m.heads[0].weight.grad.abs().sum()) == 0.0
    assert float(m.heads[1].weight.grad.abs().sum()) > 0
    conv = next(p for n, p in m.backbone.named_parameters() if p.ndim == 4)  # the first convolution
    assert conv.grad is not None and float(conv.grad.abs().sum()) > 0
    router = m.backbone.get_classifier().weight.grad  # the router's weights get nothing from a task head
    assert router is None or float(router.abs().sum()) == 0.0
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (4, m.num_features)


@pytest.mark.parametrize("backbone", ["cnn_transformer", "resnet18_28", "medvit_small"])
def test_any_registered_backbone_with_its_classifier_as_router(backbone):
    torch.manual_seed(0)
    m = MultiHeadClassifier(backbone, [3, 2], in_chans=3, img_size=28).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = m(x)
        f = m.forward_features(x)
        router = m.backbone.forward_head(f)  # the backbone's own head, built with one class per dataset
    assert out.shape == (2, 2 + 3 + 2)
    torch.testing.assert_close(out[:, :2], router)


# ----------------------------------------------------------------------------------------------- training
def _two_modalities(root: Path) -> Path:
    """'pneumoniamnist' (official layout, vertical bars, 28 px) and 'stripes' (packed, horizontal bars, 32 px):
    the router has to learn the orientation, not the brightness."""
    write_official_npz(root / "pneumoniamnist.npz", 2, sizes=(96, 32, 32))
    rng = np.random.default_rng(5)
    labels = rng.permutation(np.repeat(np.arange(3), 40)).astype(np.int64)
    images = np.ascontiguousarray(class_images(labels, 32, 1, seed=9).transpose(0, 2, 1))
    np.savez_compressed(root / "stripes.npz", images=images, labels=labels, classes=np.array(["a", "b", "c"]))
    return root


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    root = _two_modalities(tmp_path_factory.mktemp("gen-data"))
    out = tmp_path_factory.mktemp("gen-runs") / "gen"
    r = train_generalist(datasets=("pneumoniamnist", str(root / "stripes.npz")), data_dir=str(root), epochs=3,
                         steps_per_epoch=12, batch_size=32, lr=3e-3, precision="fp32", seed=0, out=str(out),
                         quiet=True)
    return r, root


def test_generalist_routes_held_out_images_far_above_chance(gen_run):
    r, _ = gen_run
    assert r.test["routing_acc"] >= 0.9  # chance: 0.5
    for name, m in r.test["datasets"].items():
        assert m["routing_acc"] >= 0.85, name
    conf = np.asarray(r.test["routing_confusion"])
    assert conf.sum() == r.test["n"] == 32 + 18  # pneumonia test + 15% of 120 stripes
    assert r.test["routing_acc"] == pytest.approx(np.trace(conf) / conf.sum())


def test_run_directory_and_checkpoint(gen_run):
    r, _ = gen_run
    d = r.run_dir
    for f in ("best_model.pth", "metrics.json", "log.jsonl", "log.csv", "curves.png", "routing_confusion_test.png",
              "config.json", "split_stripes.json"):
        assert (d / f).is_file(), f
    assert not d.with_name(d.name + ".partial").exists()
    doc = json.loads((d / "metrics.json").read_text())
    assert doc["datasets"] == ["pneumoniamnist", "stripes"]
    assert len([json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]) == 3
    from medmix.checkpoint import load_checkpoint

    _, meta, _, extras = load_checkpoint(d / "best_model.pth", extras=True)
    assert is_generalist(meta)
    ds = meta["generalist"]["datasets"]
    assert [x["name"] for x in ds] == ["pneumoniamnist", "stripes"]
    assert ds[0]["task"]["class_names"] == ["normal", "pneumonia"] and ds[1]["task"]["class_names"] == ["a", "b", "c"]
    assert [x["columns"] for x in ds] == [[2, 4], [4, 7]]
    assert meta["generalist"]["channels"] == 1 and meta["img_size"] == 28
    assert set(meta["ood"]["thresholds_by_dataset"]) == {"pneumoniamnist", "stripes"}
    assert extras and meta["ood"]["n_means"] == 2 + 3  # one Gaussian per (dataset, class)


def test_checkpoint_round_trip_gives_the_training_numbers(gen_run):
    r, _ = gen_run
    m = evaluate_generalist(r.run_dir)
    assert m["routing_acc"] == pytest.approx(r.test["routing_acc"])
    for name in ("pneumoniamnist", "stripes"):
        assert m["datasets"][name]["acc"] == pytest.approx(r.test["datasets"][name]["acc"])
        assert m["datasets"][name]["auc"] == pytest.approx(r.test["datasets"][name]["auc"])
    assert m["end_to_end_acc"] == pytest.approx(r.test["end_to_end_acc"])


def test_per_dataset_metrics_are_the_official_ones_and_end_to_end_counts_routing(gen_run):
    from medmix.checkpoint import load_checkpoint
    from medmix.data import BatchTransform
    from medmix.inference import probabilities
    from medmix.checkpoint import build_model
    from medmix.generalist import _members_of

    r, root = gen_run
    state, meta, _ = load_checkpoint(r.run_dir / "best_model.pth")
    model = build_model(meta, state)
    members = _members_of(meta, r.run_dir, root)
    tf = BatchTransform(meta["img_size"], meta["mean"], meta["std"])
    m = evaluate_heads(model, members, "test", tf, meta)
    for k, mem in enumerate(members):
        d = meta["generalist"]["datasets"][k]
        x = tf(mem.splits["test"].images)
        with torch.no_grad():
            logits = model.eval()(x)
        a, b = d["columns"]
        probs = probabilities(logits[:, a:b], mem.info.task, d["temperature"]).numpy()
        ref = compute_metrics(mem.splits["test"].labels.numpy(), probs, mem.info.task, mem.info.class_names)
        assert m["datasets"][mem.name]["acc"] == pytest.approx(ref["acc"])
        assert m["datasets"][mem.name]["auc"] == pytest.approx(ref["auc"])
        routed = logits[:, :2].argmax(1).numpy()
        right = probs.argmax(1) == mem.splits["test"].labels.numpy().reshape(-1)
        assert m["datasets"][mem.name]["end_to_end_acc"] == pytest.approx(np.mean(right & (routed == k)))


def test_predict_routes_and_forces(gen_run, tmp_path):
    from PIL import Image

    r, root = gen_run
    with np.load(root / "pneumoniamnist.npz") as z:
        img = z["test_images"][0]
    Image.fromarray(img).save(tmp_path / "p.png")
    p = GeneralistPredictor(r.run_dir)
    out = p.predict([str(tmp_path / "p.png")])[0]
    assert out["dataset"] == "pneumoniamnist" and out["routed"] is True
    assert out["label"] in ("normal", "pneumonia")
    assert set(out["probabilities"]) == {"normal", "pneumonia"}
    assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(out["dataset_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert out["dataset_confidence"] == max(out["dataset_probabilities"].values())
    assert isinstance(out["in_distribution"], bool) and "ood_score" in out
    forced = p.predict([str(tmp_path / "p.png")], dataset="stripes")[0]
    assert forced["dataset"] == "stripes" and forced["routed"] is False
    assert set(forced["probabilities"]) == {"a", "b", "c"}
    assert forced["dataset_confidence"] == out["dataset_probabilities"]["stripes"]
    with pytest.raises(ConfigError, match="not one of"):
        p.predict([str(tmp_path / "p.png")], dataset="retinamnist")
    noise = np.zeros((28, 28), dtype=np.uint8)  # a blank image is flagged whatever the router says
    assert p.predict([noise])[0]["in_distribution"] is False


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def _keep_threads(monkeypatch):
    import medmix.inference

    monkeypatch.setattr(medmix.inference, "set_threads", lambda: None)


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_train_evaluate_predict(tmp_path, capsys, _keep_threads):
    root = _two_modalities(tmp_path / "data")
    out = tmp_path / "cli-gen"
    rc, o, e = run(["train", "--dataset", f"pneumoniamnist,{root / 'stripes.npz'}", "--data-dir", root, "--epochs",
                    "1", "--steps-per-epoch", "4", "--batch-size", "16", "--out", out, "--quiet", "--json"], capsys)
    assert rc == 0, e
    s = json.loads(o)
    assert set(s["test"]["datasets"]) == {"pneumoniamnist", "stripes"} and 0 <= s["test"]["routing_acc"] <= 1
    rc, o, e = run(["evaluate", out, "--split", "val", "--out", tmp_path / "ev"], capsys)
    assert rc == 0, e
    assert "routing accuracy over all images" in o and "stripes" in o
    assert (tmp_path / "ev" / "routing_confusion_val.png").is_file()
    img = tmp_path / "x.npy"
    np.save(img, np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8))
    rc, o, e = run(["predict", out, img, "--dataset", "stripes", "--json"], capsys)
    assert rc == 0, e
    r = json.loads(o)[0]
    assert r["dataset"] == "stripes" and r["routed"] is False and set(r["probabilities"]) == {"a", "b", "c"}
    rc, o, e = run(["predict", out, img], capsys)
    assert rc == 0 and "router confidence" in o


@pytest.mark.parametrize("argv, message", [
    (["--loss", "ordinal"], "--loss cannot be used when training on several datasets"),
    (["--tune-threshold"], "--tune-threshold cannot be used"),
    (["--augment", "none"], "--augment cannot be used"),
])
def test_cli_refuses_single_dataset_options_for_a_generalist(tmp_path, capsys, argv, message, _keep_threads):
    rc, _, e = run(["train", "--dataset", "breastmnist,retinamnist", *argv, "--out", tmp_path / "x"], capsys)
    assert rc == 2 and message in e and len(e.strip().splitlines()) == 1


def test_cli_refuses_generalist_options_for_one_dataset(tmp_path, capsys, _keep_threads):
    rc, _, e = run(["train", "--dataset", "breastmnist", "--modality-weight", "2", "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "--modality-weight only apply when training on several datasets" in e


def test_report_of_a_generalist_has_one_report_per_head(gen_run, tmp_path, capsys, _keep_threads):
    r, root = gen_run
    rc, out, e = run(["evaluate", r.run_dir, "--data-dir", root, "--report", tmp_path / "rep", "--json"], capsys)
    assert rc == 0, e
    m = json.loads(out)
    index = (tmp_path / "rep" / "report.md").read_text()
    assert m["report"] == str(tmp_path / "rep" / "report.md") and "Routing accuracy" in index
    for name in ("pneumoniamnist", "stripes"):
        head = (tmp_path / "rep" / name / "report.md").read_text()
        assert f"({name}/report.md)" in index and name in head
        assert f"{m['datasets'][name]['acc']:.4f}" in head  # the head's own official ACC, as evaluate reports it


def test_export_a_generalist_and_route_in_onnx_runtime(gen_run, tmp_path, capsys, _keep_threads):
    """`medmix export` on a generalist: one graph with the router and every head (parity-checked against torch at
    export), and the ONNX Runtime predictor routes as GeneralistPredictor does (dataset, label, confidence, OOD)."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from medmix.generalist_predictor import GeneralistPredictor
    from medmix.serve.onnx_backend import OnnxPredictor

    r, root = gen_run
    rc, out, err = run(["export", r.run_dir, "--onnx", tmp_path / "gen.onnx", "--json"], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["max_abs_diff_probabilities"] <= 1e-4 and doc["outputs"][-1] == "ood_score"
    images = [np.load(root / "pneumoniamnist.npz")["test_images"][i] for i in range(4)] + \
        [np.load(root / "stripes.npz")["images"][i] for i in range(4)] + [np.zeros((28, 28), np.uint8)]
    paths = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    torch_predictor = GeneralistPredictor(r.run_dir)
    want = torch_predictor.predict(paths)
    got = OnnxPredictor(tmp_path / "gen.onnx").predict(paths)
    thresholds = torch_predictor.ood["thresholds_by_dataset"]
    for w, g in zip(want, got):
        assert (g["dataset"], g["label"]) == (w["dataset"], w["label"])
        assert g["ood_score"] == pytest.approx(w["ood_score"], rel=1e-4)
        # the verdict agrees, except for a score within the engines' rounding of its threshold: the thresholds sit
        # on a held-out score (the split-conformal rank), and these generated test images can repeat a val image
        if abs(w["ood_score"] - float(thresholds[w["dataset"]])) > 1e-4 * abs(w["ood_score"]):
            assert g["in_distribution"] == w["in_distribution"]
        assert g["confidence"] == pytest.approx(w["confidence"], abs=1e-4)
        assert g["dataset_confidence"] == pytest.approx(w["dataset_confidence"], abs=1e-4)
    assert {g["dataset"] for g in got[:8]} == {"pneumoniamnist", "stripes"} and got[-1]["in_distribution"] is False
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from medmix.serve.app import create_app

    with TestClient(create_app(tmp_path / "gen.onnx", backend="onnx")) as c:  # `medmix serve --backend onnx`
        (p,) = c.post("/v1/predict", files={"files": ("5.png", open(paths[5], "rb").read())}).json()["predictions"]
    assert p["dataset"] == got[5]["dataset"] == "stripes" and p["label"] == got[5]["label"]


def test_missing_dataset_file_is_named(tmp_path, capsys, _keep_threads):
    write_official_npz(tmp_path / "pneumoniamnist.npz", 2)
    rc, _, e = run(["train", "--dataset", "pneumoniamnist,pathmnist", "--data-dir", tmp_path, "--out",
                    tmp_path / "x"], capsys)
    assert rc == 2 and "pathmnist.npz not found" in e and len(e.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_blank_guard_is_the_routed_datasets(gen_run):
    """One dataset with blank images (MedNIST has constant slices) must not switch the guard off for the others."""
    r, _ = gen_run
    p = GeneralistPredictor(r.run_dir)
    guard = p.ood["min_pixel_std_by_dataset"]
    assert set(guard) == {"pneumoniamnist", "stripes"} and all(v > 0 for v in guard.values())
    blank = torch.full((4, 1, 28, 28), 90, dtype=torch.uint8)
    p.ood["min_pixel_std_by_dataset"] = {"pneumoniamnist": 0.0, "stripes": guard["stripes"]}
    assert not p.analyse(blank, dataset="stripes")["in_distribution"].any()
    textured = torch.from_numpy(class_images(np.zeros(4, dtype=np.int64), 28, 1, seed=3)[:, None])
    p.ood["min_pixel_std_by_dataset"] = {"pneumoniamnist": 0.0, "stripes": 1e9}
    assert not p.analyse(textured, dataset="stripes")["in_distribution"].any()  # the guard of the routed head


def test_small_validation_splits_fall_back_per_dataset(gen_run):
    """32 val images (pneumoniamnist) are too few for a temperature, 18 (stripes) also for an OOD threshold of its
    own: each head falls back separately and the checkpoint records why."""
    from medmix.checkpoint import load_checkpoint
    from medmix.small_data import MIN_VAL_FOR_OOD_THRESHOLD, MIN_VAL_FOR_TEMPERATURE

    r, _ = gen_run
    _, meta, _ = load_checkpoint(r.run_dir / "best_model.pth")
    names = [d["name"] for d in meta["generalist"]["datasets"]]
    assert all(d["temperature"] == 1.0 for d in meta["generalist"]["datasets"])
    split = meta["ood"]["split_by_dataset"]
    assert split[names[0]] == "val" and split[names[1]] == "train+val"
    assert 18 < MIN_VAL_FOR_OOD_THRESHOLD <= 32 < MIN_VAL_FOR_TEMPERATURE
    assert sum("no confidence temperature" in w for w in meta["warnings"]) == 2
    assert sum("out-of-distribution threshold" in w for w in meta["warnings"]) == 1


GEN_KILLER = r'''
import os, signal, sys
import torch
import medmix.inference
from medmix.data.mixture import MixedBatchSampler

torch.set_num_threads(1)  # the same arithmetic as the in-process reference
medmix.inference.set_threads = lambda: None
kill_at, calls = int(sys.argv[1]), [0]
original = MixedBatchSampler.next_batch


def next_batch(self):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self)


MixedBatchSampler.next_batch = next_batch
from medmix.cli import main
sys.exit(main(sys.argv[2:]))
'''


def test_generalist_killed_mid_epoch_resumes_bit_identically(tmp_path, capsys, _keep_threads):
    """kill -9 in the middle of epoch 2, then `medmix train --resume RUN.partial`: the same weights and metrics as
    the run that was never interrupted (the sampler's permutations and the generator are restored)."""
    import signal
    import subprocess
    import sys

    from medmix.checkpoint import load_checkpoint

    root = _two_modalities(tmp_path / "data")
    args = ["--dataset", f"pneumoniamnist,{root / 'stripes.npz'}", "--data-dir", str(root), "--epochs", "3",
            "--steps-per-epoch", "6", "--batch-size", "32", "--lr", "3e-3", "--precision", "fp32", "--quiet"]
    assert main(["train", *args, "--out", str(tmp_path / "ref")]) == 0
    script = tmp_path / "killer.py"
    script.write_text(GEN_KILLER)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(script), "9", "train", *args, "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    _, _, ts = load_checkpoint(out.with_name("run.partial") / "last.pth")
    assert ts["epoch"] == 1 and "sampler" in ts["task"]  # killed at batch 3 of epoch 2
    capsys.readouterr()
    assert main(["train", "--resume", str(out.with_name("run.partial")), "--quiet"]) == 0, capsys.readouterr().err
    resumed = json.loads((out / "metrics.json").read_text())
    expected = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert resumed["val"] == expected["val"] and resumed["test"] == expected["test"]
    a, b = load_checkpoint(out / "best_model.pth")[0], load_checkpoint(tmp_path / "ref" / "best_model.pth")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_generalist_continues_a_finished_run_for_more_epochs(gen_run, tmp_path, capsys, _keep_threads):
    import shutil

    r, _ = gen_run
    run = tmp_path / "gen"
    shutil.copytree(r.run_dir, run)
    assert main(["train", "--resume", str(run), "--epochs", "4", "--quiet"]) == 0, capsys.readouterr().err
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["epochs_run"] == 4 and doc["kind"] == "generalist"


def test_calibrate_a_generalist_refits_every_head_and_the_router(gen_run, tmp_path, capsys, _keep_threads):
    """`medmix calibrate` on a generalist: the router's temperature and each head's with enough val images are
    refitted on val and stored (same weights); the head with too few val images keeps T = 1 and says why."""
    import shutil

    from medmix.checkpoint import load_checkpoint

    r, root = gen_run
    run_dir = tmp_path / "gen"
    shutil.copytree(r.run_dir, run_dir)
    state0, meta0, _ = load_checkpoint(run_dir / "best_model.pth")
    g0 = meta0["generalist"]
    g0["modality_temperature"] = 7.0  # as if never fitted: calibrate must replace it
    from medmix.checkpoint import save_checkpoint

    save_checkpoint(run_dir / "best_model.pth", state0, meta0,
                    extras=load_checkpoint(run_dir / "best_model.pth", extras=True)[3])
    rc, out, err = run(["calibrate", run_dir, "--data-dir", root, "--json"], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["kind"] == "generalist" and doc["previous_router_temperature"] == 7.0
    assert doc["router_temperature"] != 7.0 and doc["router_calibration"]["nll_after"] <= \
        doc["router_calibration"]["nll_before"] + 1e-9
    state, meta, _ = load_checkpoint(run_dir / "best_model.pth")
    assert meta["generalist"]["modality_temperature"] == doc["router_temperature"]
    assert all(torch.equal(state[k], state0[k]) for k in state0)
    assert all(h["temperature"] == 1.0 for h in doc["heads"].values())  # 32 and 18 val images: below 50
    rc, out, _ = run(["calibrate", run_dir, "--data-dir", root], capsys)
    assert rc == 0 and "router temperature" in out and "not fitted (too few val images)" in out


def test_explain_a_generalist_explains_the_routed_head(gen_run, tmp_path, capsys, _keep_threads):
    """Grad-CAM of a generalist: each image goes to the dataset the router picks, and the heatmap explains that
    head's class (its own column of the output); the panel, the text and the JSON name the dataset."""
    from PIL import Image

    r, root = gen_run
    data = np.load(root / "pneumoniamnist.npz")
    stripes = np.load(root / "stripes.npz")
    Image.fromarray(data["test_images"][0]).save(tmp_path / "bars.png")
    Image.fromarray(stripes["images"][0]).save(tmp_path / "stripes.png")
    rc, out, err = run(["explain", r.run_dir, tmp_path / "bars.png", tmp_path / "stripes.png", "--out",
                        tmp_path / "cam", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert [x["dataset"] for x in res] == ["pneumoniamnist", "stripes"]  # the router tells them apart
    for x in res:
        assert Path(x["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert x["explained_class"] == x["label"] and 0 < x["dataset_confidence"] <= 1
    assert res[0]["label"] in ("normal", "pneumonia") and res[1]["label"] in ("a", "b", "c")
    rc, out, _ = run(["explain", r.run_dir, tmp_path / "bars.png", "--out", tmp_path / "cam2"], capsys)
    assert rc == 0 and "routed to pneumoniamnist" in out


def test_serve_a_generalist_answers_with_the_routed_dataset(gen_run, tmp_path, _keep_threads):
    """`medmix serve` on a generalist: /v1/predict gives the routed dataset, its confidence, the label and the OOD
    verdict (as GeneralistPredictor), /v1/model lists the datasets, /v1/explain draws the routed head's class."""
    import io

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from PIL import Image

    from medmix.generalist_predictor import GeneralistPredictor
    from medmix.serve.app import create_app

    r, root = gen_run
    buf = io.BytesIO()
    Image.fromarray(np.load(root / "stripes.npz")["images"][3]).save(buf, format="PNG")
    data = buf.getvalue()
    want = GeneralistPredictor(r.run_dir).predict([data])[0]
    with TestClient(create_app(r.run_dir)) as c:
        info = c.get("/v1/model").json()
        assert [d["dataset"] for d in info["generalist"]] == ["pneumoniamnist", "stripes"]
        (p,) = c.post("/v1/predict", files={"files": ("s.png", data, "image/png")}).json()["predictions"]
        assert p["dataset"] == want["dataset"] == "stripes" and p["label"] == want["label"]
        assert p["dataset_confidence"] == pytest.approx(want["dataset_confidence"], abs=1e-6)
        assert p["in_distribution"] == want["in_distribution"]
        e = c.post("/v1/explain", files={"files": ("s.png", data, "image/png")})
        assert e.status_code == 200 and e.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert e.headers["X-Medmix-Dataset"] == "stripes" and e.headers["X-Medmix-Label"] == want["label"]
        page = c.get("/").text
        assert "routed to" in page  # the page shows the routed dataset
