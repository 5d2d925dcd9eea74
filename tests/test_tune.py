"""`medmix tune`: an Optuna study over recipes that never reads the test split, writes a config `medmix train
--config` reproduces, is shared by several processes through one storage, and continues a trial killed mid-way."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from medmix.cli import main
from medmix.data.medmnist import ASSETS
from medmix.engine import SingleTask
from medmix.tune import parse_budget

pytest.importorskip("optuna")
TUNE = ["--data-dir", str(ASSETS), "--epochs", "2", "--models", "cnn_transformer", "--precision", "fp32"]


@pytest.mark.parametrize("text,seconds", [("20m", 1200), ("90s", 90), ("1h30m", 5400), ("1.5h", 5400), ("45", 45)])
def test_budgets(text, seconds):
    assert parse_budget(text) == seconds


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "study"
    seen: list[str] = []
    original = SingleTask._evaluate

    def spy(self, model, split, **kw):
        seen.append(split)
        return original(self, model, split, **kw)

    SingleTask._evaluate = spy
    try:
        assert main(["tune", "breastmnist", "--trials", "2", "--out", str(out), "--json", *TUNE]) == 0
    finally:
        SingleTask._evaluate = original
    return out, seen


def test_the_study_never_reads_the_test_split(study):
    out, seen = study
    assert seen and "test" not in seen and "val" in seen
    for run in (out / "trials").iterdir():
        assert json.loads((run / "metrics.json").read_text())["test"] == {}
        assert not (run / "confusion_test.png").exists()


def test_the_best_recipe_is_reproduced_by_train_config(study, tmp_path, capsys):
    out, _ = study
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best"]
    assert best["value"] == max(t["value"] for t in summary["trials"] if t["value"] is not None)
    capsys.readouterr()
    assert main(["train", "--config", str(out / "best.json"), "--out", str(tmp_path / "again"), "--json"]) == 0
    val = json.loads(capsys.readouterr().out)["val"]
    trial = next(t for t in summary["trials"] if t["number"] == best["number"])
    assert val["auc"] == trial["val"]["auc"] and val["acc"] == trial["val"]["acc"]


def test_two_processes_share_one_study(tmp_path):
    storage = tmp_path / "shared.journal"
    cmd = [sys.executable, "-m", "medmix", "tune", "breastmnist", "--trials", "1", "--storage", str(storage),
           "--out", str(tmp_path / "s"), "--json", *TUNE]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-500:] for r in results]
    final = max((json.loads(r[0]) for r in results), key=lambda d: d["n_complete"])
    assert final["n_complete"] == 2
    assert sorted(t["number"] for t in final["trials"]) == [0, 1]
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    trials = optuna.load_study(study_name="medmix-breastmnist",
                               storage=JournalStorage(JournalFileBackend(str(storage)))).trials
    assert len({t.user_attrs["owner"]["pid"] for t in trials}) == 2  # both processes ran trials


KILLER = r'''
import os, signal, sys
import medmix.tune as tune

original = tune._trial_task

def killing(trial, *args):
    cls = original(trial, *args)

    class Killed(cls):
        def validate(self):
            v = super().validate()
            if trial.number == 1 and self._epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # after epoch 2's checkpoint of the second trial
            return v

    return Killed

tune._trial_task = killing
from medmix.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_killed_study_resumes_its_interrupted_trial(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    args = ["tune", "breastmnist", "--trials", "2", "--out", str(tmp_path / "k"), *TUNE[:3], "3", *TUNE[4:]]
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-800:]
    partial = tmp_path / "k" / "trials" / "trial-0001.partial"
    assert (partial / "last.pth").is_file()
    p = subprocess.run([sys.executable, "-m", "medmix", *args[:3], "1", *args[4:], "--json"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-800:]
    assert "resuming interrupted trial(s) 1" not in p.stderr  # --json: quiet
    doc = json.loads(p.stdout)
    states = {t["number"]: t["state"] for t in doc["trials"]}
    assert states == {0: "complete", 1: "fail", 2: "complete"}
    run = tmp_path / "k" / "trials" / "trial-0001"
    assert run.is_dir() and not partial.exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]  # epochs 1-2 from before the kill, 3 after


def test_the_budget_stops_a_running_trial_at_an_epoch_and_the_next_tune_resumes_it(tmp_path, capsys, monkeypatch):
    begin = SingleTask.begin_epoch

    def slow_first_epoch(self, epoch):  # epoch 1 ends past the 1 s budget on any machine
        begin(self, epoch)
        if epoch == 1:
            time.sleep(1.5)

    monkeypatch.setattr(SingleTask, "begin_epoch", slow_first_epoch)
    out = tmp_path / "b"
    args = ["tune", "breastmnist", "--out", str(out), *TUNE[:3], "3", *TUNE[4:]]
    assert main([*args, "--budget", "1s"]) == 0
    captured = capsys.readouterr()
    assert "trial 0: budget spent; stopped after epoch 1" in captured.err
    assert "failed" not in captured.err and "Traceback" not in captured.err
    assert "no trial finished yet" in captured.out
    doc = json.loads((out / "summary.json").read_text())
    assert [(t["number"], t["state"], t["stopped_at_budget"]) for t in doc["trials"]] == [(0, "fail", True)]
    partial = out / "trials" / "trial-0000.partial"
    assert (partial / "last.pth").is_file()  # the stopped trial's epoch 1, kept for the next tune
    assert main([*args, "--trials", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(t["number"], t["state"], t["retry_of"]) for t in doc["trials"]] == [(0, "fail", None), (1, "complete", 0)]
    assert doc["best"]["number"] == 1
    run = out / "trials" / "trial-0000"
    assert run.is_dir() and not partial.exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]  # epoch 1 before the budget stopped it, 2-3 in the second tune
    assert main([*args, "--trials", "1", "--json"]) == 0  # taken up once: a third tune runs a new trial
    doc = json.loads(capsys.readouterr().out)
    assert [(t["number"], t["retry_of"]) for t in doc["trials"]] == [(0, None), (1, 0), (2, None)]


def test_tune_takes_a_class_folder_dataset(tmp_path):
    from conftest import write_class_folders

    root = tmp_path / "folders"
    write_class_folders(root, counts=(70, 70), side=28)
    assert main(["tune", str(root), "--trials", "1", "--out", str(tmp_path / "f"), *TUNE[2:]]) == 0
    assert json.loads((tmp_path / "f" / "best.json").read_text())["dataset"] == str(root)


@pytest.mark.parametrize("argv,msg", [(["--budget", "soon"], "--budget 'soon' is not a duration"),
                                      (["--trials", "0"], "--trials must be a positive integer"),
                                      (["--models", "nope"], "unknown model")])
def test_bad_tune_options_are_one_line(argv, msg, tmp_path, capsys):
    assert main(["tune", "breastmnist", "--data-dir", str(ASSETS), "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmix: error:") and msg in err.lower() and err.count("\n") == 1, err


def test_a_bad_config_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"dataset": "breastmnist", "learning_rate": 1}))
    assert main(["train", "--config", str(f)]) == 2
    assert "unknown setting(s) learning_rate" in capsys.readouterr().err


def test_recipe_tuned_starts_from_the_shipped_recipe_and_given_options_win(tmp_path, capsys):
    from medmix.recipes import TUNED

    out = tmp_path / "t"
    assert main(["train", "--dataset", "breastmnist", "--data-dir", str(ASSETS), "--recipe", "tuned", "--epochs", "1",
                 "--precision", "fp32", "--out", str(out), "--quiet", "--no-ood", "--no-calibrate"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    want = TUNED["breastmnist"][0]
    assert cfg["model"] == want["model"] == "cnn_transformer" and cfg["lr"] == want["lr"]
    assert cfg["label_smoothing"] == want["label_smoothing"] and cfg["epochs"] == 1  # the option given wins
    capsys.readouterr()
    assert main(["train", "--dataset", "pathmnist", "--recipe", "tuned", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medmix: error: no tuned recipe for 'pathmnist'")


def test_recipe_auto_is_the_default_and_uses_a_tuned_recipe_only_where_it_won_on_val(tmp_path, capsys):
    from medmix.recipes import TUNED, recipe

    base = ["--data-dir", str(ASSETS), "--epochs", "1", "--precision", "fp32", "--no-ood", "--no-calibrate"]
    assert main(["train", "--dataset", "breastmnist", *base, "--out", str(tmp_path / "auto")]) == 0
    cfg = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert cfg["model"] == TUNED["breastmnist"].settings["model"] == "cnn_transformer"
    assert cfg["lr"] == TUNED["breastmnist"].settings["lr"] and cfg["epochs"] == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("breastmnist's tuned recipe: model cnn_transformer") and "--recipe default" in err[0]
    assert err[1].startswith("training ")  # the note comes with the training log, after the settings were accepted
    # --recipe default: the package defaults; a model given on the command line wins over the tuned one
    assert main(["train", "--dataset", "breastmnist", *base, "--recipe", "default", "--out", str(tmp_path / "d"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model"] == "hybrid_mixer_small"
    assert main(["train", "--dataset", "breastmnist", *base, "--model", "resnet18_28", "--out", str(tmp_path / "m"),
                 "--quiet"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model"] == "resnet18_28" and cfg["label_smoothing"] == TUNED["breastmnist"].settings["label_smoothing"]
    # a tuned recipe whose val gain was within noise, a dataset without one, several datasets: the package defaults
    assert not TUNED["retinamnist"].is_default and recipe("auto", "retinamnist") == {}
    assert not TUNED["pneumoniamnist"].is_default and recipe("auto", "pneumoniamnist") == {}
    assert recipe("auto", "pathmnist") == {} and recipe("auto", None) == {}
    assert recipe("tuned", "retinamnist")["model_kwargs"] == {"embed_dim": 96, "depth": 2}
    # a config file is taken as it is: auto adds nothing under it
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"dataset": "breastmnist", "epochs": 1}))
    assert main(["train", "--config", str(f), *base, "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model"] == "hybrid_mixer_small"


def test_every_tuned_recipe_is_a_valid_config():
    from medmix.config import TrainConfig
    from medmix.engine import check_recipe
    from medmix.recipes import TUNED

    for name, t in TUNED.items():
        check_recipe(TrainConfig(dataset=name, **t.settings))
        assert "val ACC" in t.provenance and "test ACC" in t.provenance
        assert len(t.val_acc) == len(t.defaults_val_acc) >= 3 and all(0 <= v <= 1 for v in t.val_acc)


def test_a_tuned_recipe_is_the_default_only_for_a_val_gain_above_the_defaults_standard_error():
    from medmix.recipes import Tuned

    defaults = (0.80, 0.84, 0.88)  # mean 0.84, sample std 0.04, standard error 0.0231
    assert Tuned({}, "", (0.87, 0.87, 0.87), defaults).is_default  # +0.030
    assert not Tuned({}, "", (0.86, 0.86, 0.86), defaults).is_default  # +0.020: within noise
    assert not Tuned({}, "", (0.83, 0.83, 0.83), defaults).is_default  # a loss
