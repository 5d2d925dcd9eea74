"""`--loss corn`: the CORN head's outputs are a rank-consistent class distribution whose conditional logits the loss
recovers exactly, the loss is coral-pytorch's, and a CORN model trains, predicts, evaluates and exports like any."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import write_official_npz
from test_ema import one_thread

from medmix.cli import main
from medmix.losses import build_loss
from medmix.models import create_model
from medmix.models.rank_head import CornHead, rank_logits


def test_the_head_is_a_rank_consistent_distribution_whose_logits_come_back_exactly():
    torch.manual_seed(0)
    head = CornHead(16, 5)
    x = torch.randn(32, 16)
    lp = head(x)
    p = lp.exp()
    torch.testing.assert_close(p.sum(1), torch.ones(32))
    above = 1 - p.cumsum(1)[:, :-1]  # P(y > k)
    assert (above[:, 1:] <= above[:, :-1] + 1e-6).all()  # never rises with k
    torch.testing.assert_close(rank_logits(lp), head.linear(x), rtol=1e-4, atol=1e-4)


def test_the_loss_is_coral_pytorchs_corn_loss():
    from coral_pytorch.losses import corn_loss

    torch.manual_seed(1)
    head, y = CornHead(8, 5), torch.randint(0, 5, (40,))
    x = torch.randn(40, 8)
    ours = build_loss("corn", "ordinal-regression", 5)(head(x), y)
    torch.testing.assert_close(ours, corn_loss(head.linear(x), y, 5), rtol=1e-5, atol=1e-6)


def test_corn_is_refused_outside_ordinal_tasks():
    from medmix.errors import ConfigError

    with pytest.raises(ConfigError, match="needs task 'ordinal-regression'"):
        build_loss("corn", "multi-class", 4)


def test_any_model_takes_the_corn_head():
    for name in ("hybrid_mixer_small", "resnet18_28", "cnn_transformer"):
        m = create_model(name, num_classes=5, in_chans=3, img_size=28, ordinal_head="corn").eval()
        out = m(torch.randn(2, 3, 28, 28))
        assert out.shape == (2, 5) and torch.allclose(out.exp().sum(1), torch.ones(2), atol=1e-5)


def test_a_corn_run_trains_predicts_and_exports(tmp_path, capsys):
    write_official_npz(tmp_path / "retinamnist.npz", 5, sizes=(60, 25, 25), channels=3)
    out = tmp_path / "run"
    assert one_thread(lambda: main(["train", "--dataset", "retinamnist", "--data-dir", str(tmp_path), "--loss", "corn",
                                    "--epochs", "2", "--batch-size", "16", "--precision", "fp32", "--out", str(out),
                                    "--quiet", "--json"])) == 0
    test = json.loads(capsys.readouterr().out)["test"]
    assert {"mae", "qwk", "acc", "auc"} <= set(test)
    assert main(["evaluate", str(out), "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(test["acc"])
    assert main(["export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff_probabilities"] < 1e-4
