"""The optimiser choices: each trains, stores its own state for resuming, and a wrong name is one line."""
from __future__ import annotations

import pytest
from test_ema import ARGS, one_thread

from medmix.checkpoint import load_checkpoint
from medmix.cli import main
from medmix.engine import train


@pytest.mark.parametrize("name,state_key", [("adam", "exp_avg"), ("adamw", "exp_avg"), ("sgd", "momentum_buffer")])
def test_each_optimiser_trains_and_keeps_its_state(name, state_key, tmp_path, packed_data):
    r = one_thread(lambda: train(dataset=str(packed_data), out=str(tmp_path / name), epochs=1, optimizer=name,
                                 weight_decay=1e-4, **ARGS))
    ts = load_checkpoint(r.run_dir / "last.pth")[2]
    group = ts["optimizer"]["param_groups"][0]
    assert state_key in next(iter(ts["optimizer"]["state"].values()))
    assert group["weight_decay"] == 1e-4
    if name == "sgd":
        assert group["nesterov"] and group["momentum"] == 0.9


def test_an_unknown_optimiser_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse refuses a value outside the choices
        main(["train", "--dataset", "breastmnist", "--optimizer", "lion", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "invalid choice: 'lion'" in capsys.readouterr().err
