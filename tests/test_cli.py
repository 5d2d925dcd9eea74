"""The ``medmix`` command: listings, an end-to-end train -> evaluate -> predict on generated data, and every bad
input the issue names ending as exactly one line on stderr with exit code 2 and no traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_class_folders, write_official_npz, write_packed_npz
from medmnist import INFO
from PIL import Image

from medmix.cli import main


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch):
    """``medmix train/evaluate`` set torch's thread count for the machine; keep the suite's single thread."""
    import medmix.inference

    monkeypatch.setattr(medmix.inference, "set_threads", lambda: None)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("medmix: error: ")
    return lines[0]


# ----------------------------------------------------------------------------------------------- listings
def test_datasets_json(tmp_path, monkeypatch, capsys):
    d, env = tmp_path / "data", tmp_path / "env"
    write_official_npz(d / "chestmnist.npz", 14, multi_label=True)
    write_official_npz(d / "bloodmnist_64.npz", 8, sizes=(8, 4, 4), side=64, channels=3)
    write_official_npz(env / "pneumoniamnist.npz", 2)
    monkeypatch.setenv("MEDMIX_DATA", str(env))
    rc, out, err = run(["datasets", "--data-dir", d, "--json"], capsys)
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"breastmnist", "pneumoniamnist", "chestmnist", "bloodmnist", "mednist"} <= set(rows)
    assert all(r["data_dir"] == str(d) for r in rows.values())  # --data-dir wins over $MEDMIX_DATA
    assert rows["chestmnist"]["local_sizes"] == [28] and rows["bloodmnist"]["local_sizes"] == [64]
    assert rows["pneumoniamnist"]["local_sizes"] == []
    assert rows["chestmnist"]["task"] == INFO["chestmnist"]["task"] and rows["chestmnist"]["n_classes"] == 14
    assert rows["bloodmnist"]["n_channels"] == 3
    assert rows["breastmnist"]["split_sizes"] == INFO["breastmnist"]["n_samples"]
    assert rows["breastmnist"]["classes"] == ["malignant", "normal, benign"]

    rc, out, err = run(["datasets", "--json"], capsys)  # no --data-dir: $MEDMIX_DATA
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["pneumoniamnist"]["data_dir"] == str(env) and rows["pneumoniamnist"]["local_sizes"] == [28]
    assert rows["breastmnist"]["local_sizes"] == [28]  # the embedded copy

    rc, out, err = run(["datasets", "--data-dir", d], capsys)
    assert rc == 0 and "chestmnist" in out and "multi-label" in out


def test_datasets_survives_a_corrupt_packed_file(tmp_path, capsys):
    (tmp_path / "mednist.npz").write_bytes(b"PK\x03\x04 broken")
    rc, out, err = run(["datasets", "--data-dir", tmp_path, "--json"], capsys)
    assert rc == 0, err
    assert {r["name"]: r for r in json.loads(out)}["mednist"]["local_sizes"] == [64]


def test_models_json(monkeypatch, capsys):
    import medmix.catalog

    # building and costing every model of the zoo takes a long while on a loaded 2-core machine; the listing's
    # plumbing is the same for the two hybrid models (other families have their own tests)
    monkeypatch.setattr(medmix.catalog, "list_models", lambda: ["hybrid_mixer_base", "hybrid_mixer_small"])
    rc, out, err = run(["models", "--json", "--img-size", "64", "--in-chans", "3"], capsys)
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"hybrid_mixer_base", "hybrid_mixer_small"}
    for r in rows.values():
        assert r["family"] == "hybrid_mixer" and r["img_size"] == 64 and r["in_chans"] == 3
        assert r["params"] > 0 and r["macs"] > 0
    assert rows["hybrid_mixer_base"]["params"] > rows["hybrid_mixer_small"]["params"]
    rc, out, err = run(["models"], capsys)
    assert rc == 0 and "hybrid_mixer_small" in out and "MMACs@28" in out


# ----------------------------------------------------------------------------------------------- end to end
def test_train_evaluate_predict_rgb(tmp_path, capsys):
    d = tmp_path / "data"
    write_official_npz(d / "bloodmnist.npz", 8, sizes=(32, 16, 16), channels=3)
    out_dir = tmp_path / "run"
    rc, out, err = run(["train", "--dataset", "bloodmnist", "--data-dir", d, "--epochs", "1", "--batch-size", "16",
                        "--precision", "fp32", "--seed", "3", "--out", out_dir, "--json"], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["run_dir"] == str(out_dir) and summary["best_epoch"] == 1
    assert summary["test"]["n"] == 16 and {"acc", "auc", "f1"} <= set(summary["test"])

    rc, out, err = run(["evaluate", out_dir, "--json", "--precision", "fp32"], capsys)  # data found via the run
    assert rc == 0, err
    m = json.loads(out)
    assert m["n"] == 16 and m["acc"] == pytest.approx(summary["test"]["acc"])

    img = tmp_path / "cell.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(img)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((28, 28), 99, dtype=np.uint8)).save(gray)  # a grey image for an RGB model
    rc, out, err = run(["predict", out_dir, img, gray, "--json", "--top-k", "3"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert len(res) == 2 and all(len(r["probabilities"]) == 3 for r in res)
    assert all(r["label"] in INFO["bloodmnist"]["label"].values() for r in res)


def test_multilabel_predict_output(chest_npz, tmp_path, capsys):
    path, _ = chest_npz
    out_dir = tmp_path / "ml"
    rc, out, err = run(["train", "--dataset", path, "--epochs", "1", "--batch-size", "20", "--precision", "fp32",
                        "--out", out_dir, "--quiet"], capsys)
    assert rc == 0, err
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(img)
    rc, out, err = run(["predict", out_dir, img, "--json"], capsys)
    assert rc == 0, err
    (r,) = json.loads(out)
    assert len(r["probabilities"]) == 14 and isinstance(r["labels"], list)
    assert all(c in r["probabilities"] for c in r["labels"])


# ----------------------------------------------------------------------------------------------- bad input
def corrupt_member(path) -> None:
    """Damage the compressed data inside a valid zip/npz (the directory still reads)."""
    b = bytearray(path.read_bytes())
    for i in range(len(b) // 4, len(b) // 4 + 64):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.fixture
def bad(tmp_path):
    """Builds the bad input of one case and returns its argv and a fragment the message must contain."""
    d = tmp_path / "d"
    d.mkdir()

    def make(case: str) -> tuple[list, str]:
        if case == "unknown_dataset":
            return ["train", "--dataset", "nosuchmnist"], "breastmnist"
        if case == "unknown_model":
            return ["train", "--dataset", "breastmnist", "--model", "resnet9000"], "hybrid_mixer_small"
        if case == "missing_npz":
            return ["train", "--dataset", "pneumoniamnist", "--data-dir", d], INFO["pneumoniamnist"]["MD5"]
        if case == "missing_npz_path":
            return ["train", "--dataset", d / "nothing.npz"], "nothing.npz"
        if case == "corrupt_npz":
            (d / "pneumoniamnist.npz").write_bytes(b"this is not a zip file at all" * 20)
            return ["train", "--dataset", "pneumoniamnist", "--data-dir", d], "pneumoniamnist.npz"
        if case == "corrupt_npz_path":
            (d / "stuff.npz").write_bytes(b"\x00" * 100)
            return ["train", "--dataset", d / "stuff.npz"], "stuff.npz"
        if case == "corrupt_official_member":
            write_official_npz(d / "breastmnist.npz", 2)
            corrupt_member(d / "breastmnist.npz")
            return ["train", "--dataset", "breastmnist", "--data-dir", d], "breastmnist.npz"
        if case == "corrupt_packed_member":
            write_packed_npz(d / "packed.npz")
            corrupt_member(d / "packed.npz")
            return ["train", "--dataset", d / "packed.npz"], "packed.npz"
        if case == "wrong_keys_official":
            np.savez(d / "pneumoniamnist.npz", x=np.zeros(3), y=np.zeros(3))
            return ["train", "--dataset", "pneumoniamnist", "--data-dir", d], "train_images"
        if case == "wrong_keys_packed":
            np.savez(d / "mine.npz", imgs=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
            return ["train", "--dataset", d / "mine.npz"], "classes"
        if case == "labels_out_of_range_official":
            arrays = write_official_npz(d / "breastmnist.npz", 2)
            arrays["test_labels"][0] = 7
            np.savez(d / "breastmnist.npz", **arrays)
            return ["train", "--dataset", "breastmnist", "--data-dir", d], "0..1"
        if case == "labels_out_of_range_packed":
            np.savez(d / "mine.npz", images=np.zeros((30, 8, 8), np.uint8), labels=np.arange(30) % 4,
                     classes=np.array(["a", "b", "c"]))
            return ["train", "--dataset", d / "mine.npz"], "0..2"
        if case == "undecodable_folder_image":
            root = write_class_folders(d / "folders", counts=(5, 5), side=16, classes=("a", "b"))
            (root / "a" / "zzz.jpg").write_bytes(b"\xff\xd8\xff garbage")
            return ["train", "--dataset", root], "zzz.jpg"
        raise AssertionError(case)

    return make


TRAIN_CASES = ["unknown_dataset", "unknown_model", "missing_npz", "missing_npz_path", "corrupt_npz",
               "corrupt_npz_path", "corrupt_official_member", "corrupt_packed_member", "wrong_keys_official",
               "wrong_keys_packed", "labels_out_of_range_official", "labels_out_of_range_packed",
               "undecodable_folder_image"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_bad_training_input(bad, case, tmp_path, capsys):
    argv, fragment = bad(case)
    out_dir = tmp_path / "run"
    rc, _, err = run([*argv, "--epochs", "1", "--out", out_dir], capsys)
    line = assert_one_line_error(rc, err)
    assert fragment in line
    assert not out_dir.exists()


def test_missing_npz_message_names_file_md5_and_directory(tmp_path, capsys):
    d = tmp_path / "where"
    rc, _, err = run(["train", "--dataset", "retinamnist", "--data-dir", d, "--size", "64"], capsys)
    line = assert_one_line_error(rc, err)
    assert "retinamnist_64.npz" in line and INFO["retinamnist"]["MD5_64"] in line and str(d) in line


@pytest.fixture
def checkpoint_cases(tmp_path, trained_run):
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 50)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((trained_run.run_dir / "best_model.pth").read_bytes()[:5000])
    undecodable = tmp_path / "photo.png"
    undecodable.write_bytes(b"\x89PNG\r\n\x1a\nnope")
    run_dir = str(trained_run.run_dir)
    return {
        "predict_missing_checkpoint": (["predict", tmp_path / "nope.pth", img], "nope.pth"),
        "predict_run_dir_without_checkpoint": (["predict", tmp_path, img], "best_model.pth"),
        "predict_corrupt_checkpoint": (["predict", garbage, img], "garbage.pth"),
        "predict_truncated_checkpoint": (["predict", truncated, img], "truncated.pth"),
        "predict_undecodable_image": (["predict", run_dir, undecodable], "photo.png"),
        "predict_missing_image": (["predict", run_dir, tmp_path / "absent.png"], "absent.png"),
        "predict_directory_as_image": (["predict", run_dir, tmp_path], "directory"),
        "evaluate_missing_checkpoint": (["evaluate", tmp_path / "nope.pth"], "nope.pth"),
        "evaluate_corrupt_checkpoint": (["evaluate", garbage], "garbage.pth"),
    }


@pytest.mark.parametrize("case", ["predict_missing_checkpoint", "predict_run_dir_without_checkpoint",
                                  "predict_corrupt_checkpoint", "predict_truncated_checkpoint",
                                  "predict_undecodable_image", "predict_missing_image", "predict_directory_as_image",
                                  "evaluate_missing_checkpoint", "evaluate_corrupt_checkpoint"])
def test_bad_checkpoint_or_image(checkpoint_cases, case, capsys):
    argv, fragment = checkpoint_cases[case]
    rc, out, err = run(argv, capsys)
    assert fragment in assert_one_line_error(rc, err)
    assert out == ""


def test_real_process_exit_code_and_stderr(tmp_path):
    """One real ``python -m medmix`` process (slow to start, so only one): exit code 2, one stderr line."""
    p = subprocess.run([sys.executable, "-m", "medmix", "train", "--dataset", "nosuchmnist", "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       check=False)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("medmix: error: unknown dataset 'nosuchmnist'") and "breastmnist" in p.stderr
    assert p.stdout == ""


def test_every_option_has_help_with_its_default():
    """`medmix COMMAND --help` documents every option; each that takes a value says its default (or that it is
    required)."""
    import argparse

    from medmix.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing, no_default = [], []
    for name, sp in sub.choices.items():
        for a in sp._actions:
            if not a.option_strings or a.dest == "help":
                continue
            if not a.help:
                missing.append(f"{name} {a.option_strings[0]}")
            elif a.nargs != 0 and "default" not in a.help and "required" not in a.help:
                no_default.append(f"{name} {a.option_strings[0]}: {a.help}")
    assert not missing, missing
    assert not no_default, no_default


def test_help_shows_real_defaults(capsys):
    from medmix.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--lr LR peak learning rate (default: 0.001)" in out
    assert "(default: hybrid_mixer_small)" in out and "(default: 30)" in out


def test_train_options_come_from_the_config_dataclasses():
    """One place for defaults and help: every medmix.config field with an option has it, with the field's default,
    and building the parser imports no torch (the CLI's --help stays fast)."""
    import argparse
    import subprocess
    import sys
    from dataclasses import fields

    from medmix.cli import build_parser
    from medmix.config import GeneralistConfig, TrainConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    opts = {a.dest: a for a in sub.choices["train"]._actions}
    for cls in (TrainConfig, GeneralistConfig):
        for f in fields(cls):
            if not f.metadata.get("cli", True):
                continue
            dest = f.metadata["flag"].replace("-", "_") if f.metadata.get("flag") else f.name
            assert dest in opts, f.name
            default = opts[dest].default.value
            if not f.metadata.get("flag") and f.name not in ("resume", "ddp"):
                assert default == f.default, (f.name, default, f.default)
            assert opts[dest].help.startswith(f.metadata["help"][:20].replace("%%", "%")) or \
                opts[dest].help.startswith(f.metadata["help"][:20]), f.name
    code = "import sys, medmix.cli; medmix.cli.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
