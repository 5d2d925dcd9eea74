"""The ``medmix`` command: parses arguments, calls the library, prints. No logic of its own.

Library errors (:class:`medmix.errors.MedmixError`) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Any, Callable, Sequence

from ._version import __version__
from .cam_methods import DEFAULT_METHOD as DEFAULT_CAM_METHOD
from .cam_methods import METHODS as CAM_METHODS
from .config import GeneralistConfig, TrainConfig
from .errors import ConfigError, MedmixError, require_extra
from .paths import check_writable_file
from .recipes import TUNED

# subcommand -> (help, option adders, function, whether it sets the torch threads first), in `medmix --help` order
COMMANDS: dict[str, tuple[str, tuple[Callable, ...], Callable, bool]] = {}


def command(name: str, summary: str, *options: Callable, threads: bool = False) -> Callable:
    """Declare the decorated function as ``medmix NAME``; ``options`` add its arguments to the subparser."""
    def register(func: Callable) -> Callable:
        COMMANDS[name] = (summary, options, func, threads)
        return func

    return register


def arg(*names: str, **kw: Any) -> Callable:
    """An option for :func:`command`: the arguments of argparse's ``add_argument``."""
    return lambda parser: parser.add_argument(*names, **kw)


def _help(name: str) -> str:
    return TrainConfig.__dataclass_fields__[name].metadata["help"]


JSON = arg("--json", action="store_true", help="print machine-readable JSON on stdout instead of text")
DATA_DIR = arg("--data-dir", default=None, help=_help("data_dir"))
CHECKPOINT = arg("checkpoint", help="best_model.pth or a run directory")
IMAGES = arg("images", nargs="+", help="PNG/JPEG/TIFF/BMP files or .npy arrays")


def _print_json(obj: Any) -> None:
    from .training import jsonable

    print(json.dumps(jsonable(obj), indent=2))


@command("datasets", "list known datasets and whether their files are present", DATA_DIR, JSON)
def cmd_datasets(a: argparse.Namespace) -> None:
    from .catalog import dataset_table

    rows = dataset_table(a.data_dir)
    if a.json:
        return _print_json(rows)
    print(f"{'dataset':<16} {'task':<26} {'ch':>2} {'classes':>7} {'train/val/test':>22}  local")
    for r in rows:
        sizes = "/".join(str(r["split_sizes"][k]) for k in ("train", "val", "test")) if r["split_sizes"] \
            else f"{r['n_images']} -> 70/15/15" if r.get("n_images") else "70/15/15 split"
        local = ", ".join(str(s) for s in r["local_sizes"]) or "-"
        print(f"{r['name']:<16} {r['task']:<26} {r['n_channels']:>2} {r['n_classes'] or '?':>7} {sizes:>22}  {local}")
    print(f"\ndata dir: {rows[0]['data_dir'] if rows else '-'}  (--data-dir or $MEDMIX_DATA)")


@command("models", "list models with parameters and MACs",
         arg("--img-size", type=int, default=28, help="input side used to count MACs"),
         arg("--in-chans", type=int, default=1, help="input channels used to count parameters and MACs"),
         arg("--num-classes", type=int, default=2, help="classes of the head used to count parameters"), JSON)
def cmd_models(a: argparse.Namespace) -> None:
    from .catalog import model_table

    rows = model_table(a.img_size, a.in_chans, a.num_classes)
    if a.json:
        return _print_json(rows)
    print(f"{'model':<22} {'family':<16} {'params':>9} {'MMACs@' + str(a.img_size):>12}  paper")
    for r in rows:
        macs = f"{r['macs'] / 1e6:.1f}" if r["macs"] is not None else "n/a"
        print(f"{r['name']:<22} {r['family']:<16} {r['params'] / 1e6:8.2f}M {macs:>12}  {r['paper']}")


class _Default:
    """An option's default value, marked so that ``train`` can tell it from a value given on the command line (a
    resumed run keeps its stored settings unless told otherwise)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, _Default) else value


def _cli_fields(cls) -> list:
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


# `medmix train` options that are config fields (medmix.config) of the same name, plus --dataset; the boolean
# fields switched off by a --no-X flag are handled by _config_kwargs
TRAIN_FIELDS = ("dataset",) + tuple(f.name for f in _cli_fields(TrainConfig) if not f.metadata.get("flag"))
SINGLE_ONLY = tuple(n for n in TRAIN_FIELDS[1:] if n not in GeneralistConfig.__dataclass_fields__)
GENERALIST_ONLY = tuple(f.name for f in _cli_fields(GeneralistConfig) if f.name not in TrainConfig.__dataclass_fields__)


def _train_options(parser: argparse.ArgumentParser) -> None:
    """--dataset, and an option per config field (medmix.config) with the field's help, default, type and choices."""
    parser.add_argument("--dataset", default=_Default(None), help=_help("dataset"))
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a JSON file of these settings (e.g. `medmix tune`'s best.json, or a run's config.json); "
                             "options given on the command line win (default: none)")
    parser.add_argument("--recipe", default="auto", choices=("auto", "default", "tuned"),
                        help="tuned: start from the recipe `medmix tune` found for this dataset (medmix.recipes; "
                             "--config and the options given win); default: the options' defaults; auto (the "
                             "default): the tuned recipe where it beat the options' defaults on val ("
                             + ", ".join(k for k, t in TUNED.items() if t.is_default) + "), else the options' "
                             "defaults; not applied with --config or --resume")
    several = parser.add_argument_group("several datasets (--dataset a,b,...)")
    for f in _cli_fields(TrainConfig) + [f for f in _cli_fields(GeneralistConfig) if f.name in GENERALIST_ONLY]:
        m = f.metadata
        if f.name == "resume":
            kw = {"nargs": "?", "const": True, "default": None, "metavar": "RUN_DIR"}
        elif m.get("flag") or f.default is False or f.name == "ddp":
            kw = {"action": "store_true", "default": None if f.name == "ddp" else False}
        else:
            kw = {"type": m.get("type") or type(f.default), "default": f.default, "choices": m.get("choices")}
        kw["default"] = _Default(kw["default"])  # marked, so that given options can be told apart (see train_kwargs)
        group = several if f.name in GENERALIST_ONLY else parser
        group.add_argument("--" + (m.get("flag") or f.name.replace("_", "-")), help=m["help"], **kw)


def _config_kwargs(a: argparse.Namespace, cls, refused: Sequence[str], why: str) -> dict:
    """The ``cls`` fields given on the command line (the others keep the dataclass defaults, which are the options'
    defaults, or a resumed run's stored values); the ``refused`` options, if given, are an error (``why``)."""
    opts = vars(a)
    bad = [n for n in refused if not isinstance(opts[n], _Default) and opts[n] is not None and opts[n] is not False]
    if bad:
        raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in bad)} {why}")
    kw = {}
    for f in _cli_fields(cls):
        flag = f.metadata.get("flag")
        v = opts[flag.replace("-", "_") if flag else f.name]
        if not isinstance(v, _Default) and f.name != "quiet":
            kw[f.name] = False if flag else v  # --no-X given: the field is switched off
    if opts["quiet"] is True or opts["json"]:
        kw["quiet"] = True
    return kw


def train_kwargs(a: argparse.Namespace) -> dict:
    """TrainConfig fields from `medmix train --dataset NAME ...`."""
    kw = _config_kwargs(a, TrainConfig, GENERALIST_ONLY, "only apply when training on several datasets "
                                                          "(--dataset a,b,...)")
    kw = {**config_file(a.config, TrainConfig), **kw}
    if not isinstance(a.dataset, _Default):
        kw["dataset"] = a.dataset
    if a.recipe == "tuned" or (a.recipe == "auto" and a.config is None and kw.get("resume") is None):
        from .recipes import describe, recipe

        settings = recipe(a.recipe, kw.get("dataset"))
        if a.recipe == "auto" and settings and not kw.get("quiet"):
            kw["log"] = _first_line_note(f"{kw['dataset']}'s tuned recipe: {describe(settings)} (options given win; "
                                         f"--recipe default for the package defaults)")
        kw = {**settings, **kw}
    if "dataset" not in kw and not isinstance(kw.get("resume"), str):
        raise ConfigError("--dataset is required (or --resume RUN_DIR to continue a run)")
    return kw


def _first_line_note(note: str):
    """A training log (stderr) that prints ``note`` before its first line: after the settings and the output
    directory were accepted, so bad input still gets its one ``medmix: error:`` line alone."""
    first = [True]

    def log(line: str) -> None:
        if first[0]:
            first[0] = False
            print(note, file=sys.stderr)
        print(line, file=sys.stderr)

    return log


def config_file(path: str | None, cls) -> dict:
    """The ``cls`` fields of a JSON config file (unknown keys refused with one line); {} without a file."""
    if path is None:
        return {}
    try:
        doc = json.loads(open(path, encoding="utf-8").read())
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"--config {path}: not a JSON file ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - names - {"quiet", "resume", "ddp", "overwrite"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    return {k: v for k, v in doc.items() if k in names and k not in ("resume", "ddp", "overwrite", "out")}


def generalist_kwargs(a: argparse.Namespace) -> dict:
    """GeneralistConfig fields from `medmix train --dataset a,b,...`; single-dataset options are refused."""
    from .generalist import parse_datasets

    kw = _config_kwargs(a, GeneralistConfig, SINGLE_ONLY, "cannot be used when training on several datasets (each "
                        "dataset keeps its default loss and augmentation; the mean of the per-dataset validation "
                        "metrics picks the best epoch)")
    kw = {**config_file(a.config, GeneralistConfig), **kw}
    if not isinstance(a.dataset, _Default):  # (a resumed run keeps its datasets)
        kw["datasets"] = parse_datasets(a.dataset)
    return kw


@command("train", "train a model and evaluate it on the test split", _train_options, JSON, threads=True)
def cmd_train(a: argparse.Namespace) -> None:
    from .checkpoint import is_generalist
    from .engine import train
    from .generalist import format_generalist, train_generalist
    from .report import format_metrics
    from .training import find_resume

    dataset, resume = _plain(a.dataset), _plain(a.resume)
    # `--resume RUN_DIR` without --dataset: a generalist if RUN_DIR holds one
    point = find_resume(_plain(a.out), resume) if dataset is None and isinstance(resume, str) else None
    several = "," in dataset if dataset is not None else point is not None and is_generalist(point.meta)
    r = train_generalist(**generalist_kwargs(a)) if several else train(**train_kwargs(a))
    if r.rank != 0:  # data-parallel: process 0 reports
        return
    if a.json:
        return _print_json(r.summary())
    if several:
        print(format_generalist(r.test))
        print(f"best epoch {r.best_epoch} ({r.seconds:.0f} s of training); run directory: {r.run_dir}")
    else:
        print(format_metrics(r.test, f"test split, best epoch {r.best_epoch} ({r.seconds:.0f} s of training):"))
        print(f"run directory: {r.run_dir}")


@command("tune", "search models and recipes for a dataset on its validation split (Optuna)",
         arg("dataset", help="a dataset name, a class-folder directory or an npz file"),
         arg("--budget", default="20m", help="wall time of this process, e.g. 20m, 90s, 1h30m: no trial starts after "
                                            "it, and the running one stops at its next epoch (checkpointed; tune "
                                            "the study again to resume it) (default: 20m)"),
         arg("--trials", type=int, default=None, help="at most this many trials (default: as the budget allows)"),
         arg("--out", default=None, help="study directory: trials/, best.json, summary.json (default "
                                         "runs/tune/<dataset>)"),
         arg("--storage", default=None, help="the study's storage, shared by every process that runs it: a journal "
                                             "file (default <out>/study.journal) or a database URL "
                                             "(sqlite:///tune.db, postgresql://...)"),
         arg("--study", default=None, help="study name (default medmix-<dataset>)"),
         arg("--epochs", type=int, default=30, help="epochs per trial (default 30)"),
         arg("--models", default=",".join(("hybrid_mixer_small", "cnn_transformer")),
             help="comma-separated models to choose from (default: hybrid_mixer_small,cnn_transformer)"),
         arg("--precision", choices=("auto", "bf16", "fp32"), default="auto", help=_help("precision")),
         arg("--seed", type=int, default=0, help="seed of the sampler and of every trial's training"),
         DATA_DIR, JSON, threads=True)
def cmd_tune(a: argparse.Namespace) -> None:
    from .tune import tune

    r = tune(a.dataset, budget=a.budget, trials=a.trials, out=a.out or "", storage=a.storage, study_name=a.study,
             epochs=a.epochs, seed=a.seed, data_dir=a.data_dir, precision=a.precision,
             models=tuple(m.strip() for m in a.models.split(",") if m.strip()),
             say=None if a.json else lambda s: print(s, file=sys.stderr))
    if a.json:
        return _print_json(r)
    if "best" not in r:
        print(f"no trial finished yet in study {r['study']} ({len(r['trials'])} started)")
        return
    b = r["best"]
    print(f"study {r['study']}: {r['n_complete']} trials complete; best trial {b['number']}: val {b['value']:.4f}")
    print(f"best recipe: {r['config']}  (train it: medmix train --config {r['config']})")


@command("evaluate", "metrics of a checkpoint on a split", CHECKPOINT, DATA_DIR,
         arg("--split", choices=("train", "val", "test"), default="test", help="split to evaluate"),
         arg("--out", help="write the confusion matrix and reliability diagram PNGs here (with --corruptions: "
                           "robustness.json and robustness.png) (default: no figures)"),
         arg("--report", default=None, metavar="DIR",
             help="write DIR/report.md (metrics, calibration, per-class table, official MedMNIST rows) with its "
                  "figures (confusion, ROC, reliability, most confident mistakes) (default: no report)"),
         arg("--precision", choices=("auto", "bf16", "fp32", "run"), default="run",
             help="run: the precision the run was trained and evaluated in (so figures match metrics.json); auto: "
                  "bf16 where the CPU has native bf16"),
         arg("--corruptions", action="store_true",
             help="corruption robustness instead: balanced error under MedMNIST-C's corruptions of the run's dataset "
                  "(a generic list for other data), BE and rBE against MedMNIST-C's AlexNet baseline; with --out, "
                  "writes robustness.json and robustness.png there"),
         arg("--severities", type=int, nargs="+", default=None, metavar="S",
             help="--corruptions: severities 1..5 to apply (default: all five; BE and rBE need all five)"),
         arg("--corruption-names", nargs="+", default=None, metavar="NAME",
             help="--corruptions: only these corruptions of the dataset's list (default: all of them)"),
         JSON, threads=True)
def cmd_evaluate(a: argparse.Namespace) -> None:
    from .evaluation import evaluate, format_generalist, format_temperature
    from .report import format_metrics

    if a.corruptions:
        return _evaluate_corruptions(a)
    used = [f for f, v in (("--severities", a.severities), ("--corruption-names", a.corruption_names)) if v]
    if used:
        raise ConfigError(f"{', '.join(used)} only appl{'ies' if len(used) == 1 else 'y'} with --corruptions")
    m = evaluate(a.checkpoint, data_dir=a.data_dir, split=a.split, out=a.out, report=a.report, precision=a.precision)
    if a.json:
        return _print_json(m)
    if m.get("kind") == "generalist":
        print(format_generalist(m))
        if m.get("routing_confusion_png"):
            print(f"routing confusion matrix: {m['routing_confusion_png']}")
        return
    print(format_metrics(m, f"{m['dataset']} {m['split']} split, {m['model']} ({m['float_precision']}):"))
    print(f"calibration (T = {format_temperature(m['temperature'])}): ECE {m['ece_before']:.4f} -> "
          f"{m['ece_after']:.4f} ({m['n_bins']} bins), NLL {m['nll_before']:.4f} -> {m['nll_after']:.4f}")
    if "ood_flagged" in m:
        print(f"flagged out of distribution ({m['ood_method']}): {m['ood_flagged']:.1%}")
    for key, what in (("confusion_png", "confusion matrix"), ("reliability_png", "reliability diagram"),
                      ("report", "report")):
        if m.get(key):
            print(f"{what}: {m[key]}")


def _evaluate_corruptions(a: argparse.Namespace) -> None:
    """`medmix evaluate RUN --corruptions`: the robustness table, and robustness.json / .png with --out."""
    from .paths import check_writable_dir
    from .robustness import SEVERITIES, evaluate_corruptions, format_robustness, write_robustness

    if a.report is not None:
        raise ConfigError("--report does not apply with --corruptions (use --out DIR for robustness.json and .png)")
    if a.out is not None:
        check_writable_dir(a.out, "--out")
    r = evaluate_corruptions(a.checkpoint, a.data_dir, split=a.split, severities=a.severities or SEVERITIES,
                             names=a.corruption_names, precision=a.precision)
    if a.out is not None:
        r = write_robustness(r, a.out)
    if a.json:
        return _print_json(r)
    print(format_robustness(r))
    if a.out is not None:
        print(f"written: {r['json']}, {r['png']}")


@command("predict", "classify images with a checkpoint", CHECKPOINT, IMAGES,
         arg("--top-k", type=int, default=None, help="show the K most probable classes (default: all)"),
         arg("--threshold", type=float, default=None,
             help="multi-label decision threshold (default: the checkpoint's, tuned on val, else 0.5)"),
         arg("--ordinal", choices=("argmax", "expected"), default="argmax",
             help="ordinal tasks: report the most probable grade or the rounded expected grade"),
         arg("--dataset", default=None, metavar="NAME",
             help="generalist checkpoints: answer with this dataset's head (default: the head the router picks)"),
         JSON)
def cmd_predict(a: argparse.Namespace) -> None:
    from .generalist_predictor import GeneralistPredictor, format_routed
    from .predict import format_prediction, load_predictor

    p = load_predictor(a.checkpoint, threshold=a.threshold, ordinal_mode=a.ordinal)
    routed = isinstance(p, GeneralistPredictor)
    if a.dataset is not None and not routed:
        raise ConfigError("--dataset chooses a head of a generalist checkpoint; this checkpoint has one dataset")
    results = p.predict(a.images, dataset=a.dataset, top_k=a.top_k) if routed else p.predict(a.images, top_k=a.top_k)
    if a.json:
        return _print_json(results)
    print("\n\n".join((format_routed if routed else format_prediction)(r) for r in results))


@command("explain", "Grad-CAM heatmaps: where a checkpoint looked in images", CHECKPOINT, IMAGES,
         arg("--out", required=True, help="directory for the <image>_<method>.png panels"),
         arg("--method", choices=tuple(CAM_METHODS), default=DEFAULT_CAM_METHOD,
             help=f"{', '.join(CAM_METHODS)} (eigencam is class-agnostic)"),
         arg("--class", dest="target_class", default=None, metavar="NAME_OR_INDEX",
             help="explain this class, by name or index (default: each image's predicted class)"),
         arg("--top-k", type=int, default=3, help="probabilities shown in the panel"), JSON, threads=True)
def cmd_explain(a: argparse.Namespace) -> None:
    from .explain import explain
    from .imaging import ood_warning

    results = explain(a.checkpoint, a.images, a.out, method=a.method, target_class=a.target_class, top_k=a.top_k)
    if a.json:
        return _print_json([{k: v for k, v in r.items() if k != "cam"} for r in results])
    for r in results:
        routed = f"routed to {r['dataset']} ({r['dataset_confidence']:.2%}) -> " if "dataset" in r else ""
        print(f"{r['file']}: {routed}{r['label']} (confidence {r['confidence']:.2%}); {r['method']} for "
              f"{r['explained_class']!r} -> {r['png']}")
        if (w := ood_warning(r)) is not None:
            print(f"  {w}")


@command("ensemble", "average several runs (and test-time views) into one checkpoint",
         arg("runs", nargs="+", metavar="RUN", help="run directories or checkpoints of one dataset and split"),
         arg("--out", required=True, help="the ensemble's run directory"),
         arg("--tta", default="none", metavar="VIEWS",
             help="test-time views: none, auto (chosen on the validation split) or a comma-separated list of "
                  "hflip, vflip, shift (default: none)"),
         arg("--overwrite", action="store_true", help="replace an existing --out"), DATA_DIR, JSON, threads=True)
def cmd_ensemble(a: argparse.Namespace) -> None:
    from .ensemble import make_ensemble

    r = make_ensemble(a.runs, a.out, tta=a.tta, data_dir=a.data_dir, overwrite=a.overwrite,
                      say=None if a.json else lambda s: print(s, file=sys.stderr))
    if a.json:
        return _print_json(r)
    for path, v, t in zip(r["members"], r["member_val"], r["member_test"]):
        print(f"member {path}: val acc {v.get('acc', float('nan')):.4f} auc {v.get('auc', float('nan')):.4f}  "
              f"test acc {t.get('acc', float('nan')):.4f} auc {t.get('auc', float('nan')):.4f}")
    print(f"ensemble of {len(r['members'])} ({'+'.join(r['views'])}): val acc {r['val']['acc']:.4f} auc "
          f"{r['val']['auc']:.4f}  test acc {r['test']['acc']:.4f} auc {r['test']['auc']:.4f}")
    print(f"wrote {r['run_dir']}")


@command("calibrate", "fit the confidence temperature on the validation split and store it",
         arg("checkpoint", metavar="RUN_OR_CKPT", help="a run directory or a checkpoint file"), DATA_DIR, JSON,
         threads=True)
def cmd_calibrate(a: argparse.Namespace) -> None:
    from .calibrate import calibrate
    from .evaluation import format_temperature
    from .run import Run

    run = Run.load(a.checkpoint)
    if run.is_generalist:  # a temperature per head and one for the router
        from .generalist import calibrate_generalist

        check_writable_file(run.path, "checkpoint")
        r = calibrate_generalist(run, a.data_dir)
    else:
        r = calibrate(run, data_dir=a.data_dir)
    if a.json:
        return _print_json(r)
    if r.get("kind") == "generalist":
        print(f"{r['dataset']} (generalist, {r['model']}), val splits: router temperature "
              f"{r['previous_router_temperature']:.4f} -> {r['router_temperature']:.4f}")
        for name, h in r["heads"].items():
            fitted = f"NLL {h['nll_before']:.4f} -> {h['nll_after']:.4f}, ECE {h['ece_before']:.4f} -> " \
                     f"{h['ece_after']:.4f}" if "nll_before" in h else "not fitted (too few val images)"
            print(f"  {name} ({h['n']} images): temperature {format_temperature(h['temperature'])}; {fitted}")
        print(f"stored in {r['checkpoint']}")
        return
    t = r["temperature"]
    shown = f"{t:.4f}" if isinstance(t, float) else "[" + ", ".join(f"{v:.3f}" for v in t) + "]"
    print(f"{r['dataset']} {r['split']} split ({r['n']} images), {r['model']}: temperature {shown}")
    print(f"  NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}")
    print(f"  ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f}  ({r['n_bins']} bins)")
    print(f"stored in {r['checkpoint']}")
    print(f"reliability diagrams: {r['reliability_before']}, {r['reliability_after']}")


@command("serve", "HTTP API and web page (with Grad-CAM) for a checkpoint",
         arg("checkpoint", help="best_model.pth, a run directory, or an .onnx file with --backend onnx"),
         arg("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
         arg("--port", type=int, default=8000, help="TCP port to listen on, 1..65535"),
         arg("--backend", choices=("torch", "onnx"), default="torch",
             help="torch (with Grad-CAM) or onnx (ONNX Runtime, no torch in the server process)"),
         arg("--onnx", default=None, metavar="PATH",
             help="--backend onnx: the exported model (default: export the checkpoint to a temporary file)"),
         arg("--max-upload-mb", type=float, default=10.0, help="largest request body accepted (413 above)"),
         arg("--threads", type=int, default=1, help="model threads (1 is fastest for small images)"),
         arg("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
             help="server log level"))
def cmd_serve(a: argparse.Namespace) -> None:
    require_extra("serve", "medmix serve")
    if a.backend == "onnx":
        require_extra("onnx", "medmix serve --backend onnx")
    from .serve.app import run

    run(a.checkpoint, host=a.host, port=a.port, backend=a.backend, onnx_path=a.onnx, max_upload_mb=a.max_upload_mb,
        log_level=a.log_level, threads=a.threads)


@command("export", "export a checkpoint to ONNX (checked against torch), optionally int8-quantized", CHECKPOINT,
         arg("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX model"),
         arg("--opset", type=int, default=17, help="ONNX opset, 9..21 (--int8: 13..21)"),
         arg("--int8", action="store_true",
             help="write the model statically quantized to int8 (ONNX Runtime, QDQ), calibrated on training images "
                  "of the run's dataset and refused when its val ACC drops by more than 0.5 points or its AUC by more "
                  "than 0.005 against fp32"),
         arg("--calibration-images", type=int, default=None, metavar="N",
             help="--int8: training images the activation ranges are calibrated on (default: 256, or all when "
                  "fewer)"),
         arg("--int8-force", action="store_true",
             help="--int8: write the int8 model even when it loses more than allowed on val (with a warning)"),
         arg("--data-dir", default=None,
             help="--int8: folder with the run's dataset files (default: where it was trained from, else "
                  "$MEDMIX_DATA)"), JSON)
def cmd_export(a: argparse.Namespace) -> None:
    require_extra("onnx", "medmix export")
    from .export import export_onnx

    if not a.int8:
        used = [flag for flag, v in (("--calibration-images", a.calibration_images), ("--int8-force", a.int8_force),
                                     ("--data-dir", a.data_dir)) if v not in (None, False)]
        if used:
            raise ConfigError(f"{', '.join(used)} only appl{'ies' if len(used) == 1 else 'y'} with --int8")
    r = export_onnx(a.checkpoint, a.onnx, opset=a.opset, int8=a.int8, data_dir=a.data_dir,
                    calibration_images=256 if a.calibration_images is None else a.calibration_images,
                    int8_force=a.int8_force)
    if a.json:
        return _print_json(r)
    q = r["int8"]
    print(f"{r['onnx']}: {r['model']} ({r['task']}, {len(r['classes'])} classes){' int8' if q else ''}, input "
          f"{r['input']['name']} {tuple(r['input']['shape'])} float32 normalised, outputs {', '.join(r['outputs'])}; "
          f"max |torch - onnxruntime| probability {r['max_abs_diff_probabilities']:.2e}{' (fp32 graph)' if q else ''}")
    if q:
        def num(v: float | None) -> str:
            return "nan" if v is None else f"{v:.4f}"

        ood = f", OOD flags agree {q['ood_flag_agreement']:.1%}" if q["ood_flag_agreement"] is not None else ""
        print(f"int8 ({q['format']}, {q['calibration_images']} calibration images) against fp32 on val "
              f"({q['n']} images): ACC {num(q['fp32_acc'])} -> {num(q['int8_acc'])}, AUC {num(q['fp32_auc'])} -> "
              f"{num(q['int8_auc'])}, labels agree {q['label_agreement']:.1%}{ood}")
        print(f"size: fp32 {q['fp32_bytes'] / 1e6:.2f} MB -> int8 {r['bytes'] / 1e6:.2f} MB "
              f"({r['bytes'] / q['fp32_bytes']:.0%})")


@command("quickstart", "train, evaluate and predict on the embedded BreastMNIST",
         arg("--out", default="runs/quickstart", help="run directory (replaced if it exists)"),
         arg("--epochs", type=int, default=None, help="training epochs (default: the tuned recipe's, 30)"),
         arg("--quiet", action="store_true", help="no progress bars or per-epoch lines"), threads=True)
def cmd_quickstart(a: argparse.Namespace) -> None:
    from .quickstart import quickstart

    quickstart(out=a.out, epochs=a.epochs, quiet=a.quiet)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to every option's help that does not state its default itself."""
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.nargs == 0:
            continue
        value = _plain(action.default)
        if action.required:
            action.help += " (required)"
        elif value is not None and "default" not in action.help:
            action.help += f" (default: {value})"


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error format: one line ``medmix: error: ...`` and exit code 2 (argparse prints
    the whole usage block first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"medmix: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="medmix", description="Medical image classification on CPUs.")
    p.add_argument("--version", action="version", version=f"medmix {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, options, _, _) in COMMANDS.items():
        s = sub.add_parser(name, help=summary)
        for add in options:
            add(s)
        _show_defaults(s)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, func, threads = COMMANDS[args.command]
    try:
        if threads:
            from .inference import set_threads

            set_threads()
        func(args)
    except MedmixError as e:
        print(f"medmix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medmix: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
