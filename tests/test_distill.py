"""Distillation (``--teacher``): the soft-label term is Hinton's, a zero weight leaves training exactly as without a
teacher, the teacher must share the data and split, and an ensemble can teach through the command line."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_ema import ARGS, one_thread, same

from medmix.checkpoint import load_checkpoint
from medmix.cli import main
from medmix.engine import train
from medmix.losses import distillation_loss


def test_the_soft_label_term_is_hintons():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    manual = sum((F.softmax(t[i] / 3, 0) * (F.log_softmax(t[i] / 3, 0) - F.log_softmax(s[i] / 3, 0))).sum()
                 for i in range(6)) / 6 * 9
    torch.testing.assert_close(distillation_loss(s, t, False, 3.0), manual)
    assert distillation_loss(t, t, False, 2.0).abs() < 1e-6
    ml = F.binary_cross_entropy_with_logits(s / 2, torch.sigmoid(t / 2)) * 4
    torch.testing.assert_close(distillation_loss(s, t, True, 2.0), ml)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, packed_data):
    out = tmp_path_factory.mktemp("teacher") / "t"
    one_thread(lambda: train(dataset=str(packed_data), out=str(out), epochs=2, **ARGS))
    return out


def test_a_zero_weight_changes_nothing_and_a_full_one_does(teacher, tmp_path, packed_data):
    plain = one_thread(lambda: train(dataset=str(packed_data), out=str(tmp_path / "p"), epochs=2,
                                     **dict(ARGS, model="cnn_transformer")))
    zero = one_thread(lambda: train(dataset=str(packed_data), out=str(tmp_path / "z"), epochs=2, teacher=str(teacher),
                                    distill_weight=0.0, **dict(ARGS, model="cnn_transformer")))
    full = one_thread(lambda: train(dataset=str(packed_data), out=str(tmp_path / "f"), epochs=2, teacher=str(teacher),
                                    distill_weight=1.0, **dict(ARGS, model="cnn_transformer")))
    w_plain, w_zero, w_full = (load_checkpoint(r.run_dir / "last.pth")[0] for r in (plain, zero, full))
    assert same(w_plain, w_zero) and not same(w_plain, w_full)
    cfg = json.loads((full.run_dir / "config.json").read_text())
    assert cfg["teacher"] == str(teacher) and cfg["distill_weight"] == 1.0


def test_a_teacher_of_other_data_or_another_split_is_one_line(teacher, tmp_path, packed_data, trained_run, capsys):
    for t, msg in ((trained_run.run_dir, "was trained on 'breastmnist'"), (teacher, "another train/val/test split")):
        capsys.readouterr()
        seed = "4" if t == teacher else "3"
        assert main(["train", "--dataset", str(packed_data), "--teacher", str(t), "--seed", seed, "--epochs", "1",
                     "--out", str(tmp_path / "bad"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("medmix: error: --teacher") and msg in err and err.count("\n") == 1, err
    assert main(["train", "--dataset", str(packed_data), "--distill-weight", "2", "--out", str(tmp_path / "w")]) == 2


def test_an_ensemble_teaches_through_the_command_line(trained_run, tmp_path, capsys):
    from medmix.data.medmnist import ASSETS

    assert main(["ensemble", str(trained_run.run_dir), "--tta", "hflip", "--out", str(tmp_path / "ens"),
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["train", "--dataset", "breastmnist", "--data-dir", str(ASSETS), "--teacher", str(tmp_path / "ens"),
                 "--model", "cnn_transformer", "--epochs", "1", "--batch-size", "64", "--precision", "fp32",
                 "--no-ood", "--out", str(tmp_path / "student"), "--quiet"]) == 0
    assert (tmp_path / "student" / "best_model.pth").is_file()


def test_teacher_views_identity_drops_the_ensembles_views(trained_run, tmp_path, capsys):
    """A shift-view ensemble with --teacher-views identity teaches exactly as the same members without views."""
    from medmix.data.medmnist import ASSETS

    for tta in ("shift", "none"):
        assert main(["ensemble", str(trained_run.run_dir), "--tta", tta, "--out", str(tmp_path / tta), "--json"]) == 0
    capsys.readouterr()

    def student(name, teacher, *extra):
        assert one_thread(lambda: main(["train", "--dataset", "breastmnist", "--data-dir", str(ASSETS), "--teacher",
                                        str(teacher), "--model", "cnn_transformer", "--epochs", "1", "--batch-size",
                                        "64", "--precision", "fp32", "--no-ood", "--out", str(tmp_path / name),
                                        "--quiet", *extra])) == 0
        return load_checkpoint(tmp_path / name / "last.pth")[0]

    unviewed = student("a", tmp_path / "shift", "--teacher-views", "identity")
    plain = student("b", tmp_path / "none")
    viewed = student("c", tmp_path / "shift")
    assert same(unviewed, plain)
    assert not same(viewed, plain)
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "breastmnist", "--teacher-views", "all"])
    assert e.value.code == 2 and "invalid choice: 'all'" in capsys.readouterr().err
    from medmix.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown teacher_views 'all'"):
        train(dataset="breastmnist", data_dir=str(ASSETS), teacher_views="all")
