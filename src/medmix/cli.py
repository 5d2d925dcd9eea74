"""The ``medmix`` command: parses arguments, calls the library, prints. No logic of its own.

Library errors (:class:`medmix.errors.MedmixError`) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from ._version import __version__
from .cam_methods import DEFAULT_METHOD as DEFAULT_CAM_METHOD
from .cam_methods import METHODS as CAM_METHODS
from .config import GeneralistConfig, TrainConfig
from .errors import MedmixError

# explanation methods, kept here so `medmix --help` does not import pytorch_grad_cam


def _print_json(obj: Any) -> None:
    from .training import jsonable as _jsonable

    print(json.dumps(_jsonable(obj), indent=2))


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


def _cli_fields(cls) -> list:
    from dataclasses import fields

    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def _option_dest(f) -> str:
    return f.metadata["flag"].replace("-", "_") if f.metadata.get("flag") else f.name


# `medmix train` options that are config fields (medmix.config) of the same name, plus --dataset; the boolean
# fields switched off by a --no-X flag are handled by _config_kwargs
TRAIN_FIELDS = ("dataset",) + tuple(f.name for f in _cli_fields(TrainConfig) if not f.metadata.get("flag"))
GENERALIST_FIELDS = tuple(f.name for f in _cli_fields(GeneralistConfig) if not f.metadata.get("flag"))
SINGLE_ONLY = tuple(n for n in TRAIN_FIELDS if n not in GENERALIST_FIELDS and n != "dataset")
GENERALIST_ONLY = tuple(n for n in GENERALIST_FIELDS if n not in TRAIN_FIELDS)


def _config_kwargs(a: argparse.Namespace, cls) -> dict:
    """The ``cls`` fields given on the command line (the others keep the dataclass defaults, which are the options'
    defaults, or a resumed run's stored values)."""
    opts = vars(a)
    kw = {}
    for f in _cli_fields(cls):
        v = opts[_option_dest(f)]
        if isinstance(v, _Default):
            continue
        if f.metadata.get("flag"):  # --no-X given: the field is switched off
            if v is True:
                kw[f.name] = False
        elif f.name != "quiet":
            kw[f.name] = v
    if opts["quiet"] is True or opts["json"]:
        kw["quiet"] = True
    return kw


def train_kwargs(a: argparse.Namespace) -> dict:
    """TrainConfig fields from `medmix train --dataset NAME ...`."""
    from .errors import ConfigError

    kw = _config_kwargs(a, TrainConfig)
    if not isinstance(vars(a)["dataset"], _Default):
        kw["dataset"] = a.dataset
    if "dataset" not in kw and not isinstance(kw.get("resume"), str):
        raise ConfigError("--dataset is required (or --resume RUN_DIR to continue a run)")
    return kw


def _given(a: argparse.Namespace, name: str) -> bool:
    v = getattr(a, name)
    return not isinstance(v, _Default) and v is not None and v is not False


def generalist_kwargs(a: argparse.Namespace) -> dict:
    """GeneralistConfig fields from `medmix train --dataset a,b,...`; single-dataset options are refused."""
    from .errors import ConfigError
    from .generalist import parse_datasets

    bad = [n for n in SINGLE_ONLY if _given(a, n)]
    if bad:
        raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in bad)} cannot be used when training on "
                          f"several datasets (each dataset keeps its default loss and augmentation; the mean of the "
                          f"per-dataset validation metrics picks the best epoch)")
    opts = vars(a)
    kw = _config_kwargs(a, GeneralistConfig)
    if not isinstance(opts["dataset"], _Default):  # (a resumed run keeps its datasets)
        kw["datasets"] = parse_datasets(opts["dataset"])
    return kw


def cmd_train(a: argparse.Namespace) -> None:
    from .engine import train
    from .inference import set_threads
    from .errors import ConfigError

    set_threads()
    dataset = a.dataset if not isinstance(a.dataset, _Default) else None
    if dataset and "," in dataset:
        return _train_generalist(a)
    if dataset is None and _resumes_a_generalist(a):
        return _train_generalist(a)
    given = [n for n in GENERALIST_ONLY if _given(a, n)]
    if given:
        raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in given)} only apply when training on "
                          f"several datasets (--dataset a,b,...)")
    result = train(**train_kwargs(a))
    if result.rank != 0:  # data-parallel: process 0 reports
        return
    if a.json:
        return _print_json(result.summary())
    from .report import format_metrics

    print(format_metrics(result.test, f"test split, best epoch {result.best_epoch} "
                                            f"({result.seconds:.0f} s of training):"))
    print(f"run directory: {result.run_dir}")


def _resumes_a_generalist(a: argparse.Namespace) -> bool:
    """`medmix train --resume RUN_DIR` (no --dataset): does RUN_DIR hold a generalist?"""
    from .checkpoint import is_generalist
    from .training import find_resume

    resume = a.resume if not isinstance(a.resume, _Default) else None
    out = a.out if not isinstance(a.out, _Default) else None
    if not isinstance(resume, str):
        return False
    point = find_resume(out, resume)
    return point is not None and is_generalist(point.meta)


def _train_generalist(a: argparse.Namespace) -> None:
    from .generalist import format_generalist, train_generalist

    r = train_generalist(**generalist_kwargs(a))
    if r.rank != 0:  # data-parallel: process 0 reports
        return
    if a.json:
        return _print_json(r.summary())
    print(format_generalist(r.test))
    print(f"best epoch {r.best_epoch} ({r.seconds:.0f} s of training); run directory: {r.run_dir}")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from .inference import set_threads
    from .evaluation import evaluate
    from .report import format_metrics

    set_threads()
    m = evaluate(a.checkpoint, data_dir=a.data_dir, split=a.split, out=a.out, report=a.report,
                 precision=a.precision)
    if a.json:
        return _print_json(m)
    if m.get("kind") == "generalist":
        from .generalist import format_generalist

        print(format_generalist(m))
        if m.get("routing_confusion_png"):
            print(f"routing confusion matrix: {m['routing_confusion_png']}")
        return
    print(format_metrics(m, f"{m['dataset']} {m['split']} split, {m['model']} ({m['float_precision']}):"))
    t = m["temperature"]
    shown = f"{t:.4f}" if isinstance(t, float) else "per label"
    print(f"calibration (T = {shown}): ECE {m['ece_before']:.4f} -> {m['ece_after']:.4f} ({m['n_bins']} bins), "
          f"NLL {m['nll_before']:.4f} -> {m['nll_after']:.4f}")
    if "ood_flagged" in m:
        print(f"flagged out of distribution ({m['ood_method']}): {m['ood_flagged']:.1%}")
    if m.get("confusion_png"):
        print(f"confusion matrix: {m['confusion_png']}")
    if m.get("reliability_png"):
        print(f"reliability diagram: {m['reliability_png']}")
    if m.get("report"):
        print(f"report: {m['report']}")


def cmd_predict(a: argparse.Namespace) -> None:
    from .errors import ConfigError
    from .generalist_predictor import GeneralistPredictor, format_routed
    from .predict import format_prediction, load_predictor

    p = load_predictor(a.checkpoint, threshold=a.threshold, ordinal_mode=a.ordinal)
    if isinstance(p, GeneralistPredictor):
        results = p.predict(a.images, dataset=a.dataset, top_k=a.top_k)
        show = format_routed
    else:
        if a.dataset is not None:
            raise ConfigError("--dataset chooses a head of a generalist checkpoint; this checkpoint has one dataset")
        results, show = p.predict(a.images, top_k=a.top_k), format_prediction
    if a.json:
        return _print_json(results)
    print("\n\n".join(show(r) for r in results))


def cmd_explain(a: argparse.Namespace) -> None:
    from .inference import set_threads
    from .explain import explain

    set_threads()
    results = explain(a.checkpoint, a.images, a.out, method=a.method, target_class=a.target_class, top_k=a.top_k)
    if a.json:
        return _print_json([{k: v for k, v in r.items() if k != "cam"} for r in results])
    for r in results:
        routed = f"routed to {r['dataset']} ({r['dataset_confidence']:.2%}) -> " if "dataset" in r else ""
        ood = "; WARNING: out of distribution" if r.get("in_distribution") is False else ""
        print(f"{r['file']}: {routed}{r['label']} (confidence {r['confidence']:.2%}); {r['method']} for "
              f"{r['explained_class']!r} -> {r['png']}{ood}")


def cmd_calibrate(a: argparse.Namespace) -> None:
    from .calibrate import calibrate
    from .inference import set_threads

    set_threads()
    from .run import Run

    run = Run.load(a.checkpoint)
    if run.is_generalist:  # a temperature per head and one for the router
        from .generalist import calibrate_generalist
        from .paths import check_writable_file

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
            t = h["temperature"]
            shown = f"{t:.4f}" if isinstance(t, float) else "per label"
            fitted = f"NLL {h['nll_before']:.4f} -> {h['nll_after']:.4f}, ECE {h['ece_before']:.4f} -> " \
                     f"{h['ece_after']:.4f}" if "nll_before" in h else "not fitted (too few val images)"
            print(f"  {name} ({h['n']} images): temperature {shown}; {fitted}")
        print(f"stored in {r['checkpoint']}")
        return
    t = r["temperature"]
    shown = f"{t:.4f}" if isinstance(t, float) else "[" + ", ".join(f"{v:.3f}" for v in t) + "]"
    print(f"{r['dataset']} {r['split']} split ({r['n']} images), {r['model']}: temperature {shown}")
    print(f"  NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}")
    print(f"  ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f}  ({r['n_bins']} bins)")
    print(f"stored in {r['checkpoint']}")
    print(f"reliability diagrams: {r['reliability_before']}, {r['reliability_after']}")


def cmd_serve(a: argparse.Namespace) -> None:
    from .errors import require_extra

    require_extra("serve", "medmix serve")
    if a.backend == "onnx":
        require_extra("onnx", "medmix serve --backend onnx")
    from .serve.app import run

    run(a.checkpoint, host=a.host, port=a.port, backend=a.backend, onnx_path=a.onnx, max_upload_mb=a.max_upload_mb,
        log_level=a.log_level, threads=a.threads)


def cmd_export(a: argparse.Namespace) -> None:
    from .errors import require_extra

    require_extra("onnx", "medmix export")
    from .export import export_onnx

    r = export_onnx(a.checkpoint, a.onnx, opset=a.opset)
    if a.json:
        return _print_json(r)
    print(f"{r['onnx']}: {r['model']} ({r['task']}, {len(r['classes'])} classes), input {r['input']['name']} "
          f"{tuple(r['input']['shape'])} float32 normalised, outputs {', '.join(r['outputs'])}; "
          f"max |torch - onnxruntime| probability {r['max_abs_diff_probabilities']:.2e}")


def cmd_quickstart(a: argparse.Namespace) -> None:
    from .inference import set_threads
    from .quickstart import quickstart

    set_threads()
    quickstart(out=a.out, epochs=a.epochs, quiet=a.quiet)


JSON_HELP = "print machine-readable JSON on stdout instead of text"


def add_config_options(parser, config_fields) -> None:
    """One option per config field (medmix.config): its help, default, type and choices come from the field."""
    for f in config_fields:
        m = f.metadata
        name = "--" + (m.get("flag") or f.name.replace("_", "-"))
        if f.name == "resume":
            parser.add_argument(name, nargs="?", const=True, default=None, metavar="RUN_DIR", help=m["help"])
        elif f.name == "ddp":
            parser.add_argument(name, action="store_true", default=None, help=m["help"])
        elif m.get("flag") or f.default is False:
            parser.add_argument(name, action="store_true", help=m["help"])
        else:
            kind = m.get("type") or type(f.default)
            kw = {"choices": m["choices"]} if m.get("choices") else {}
            parser.add_argument(name, type=kind, default=f.default, help=m["help"], **kw)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to every option's help that does not state its default itself."""
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.nargs == 0:
            continue
        value = action.default.value if isinstance(action.default, _Default) else action.default
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

    def data_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", default=None, help="folder with the dataset files (default $MEDMIX_DATA, "
                                                         "else medmnist's ~/.medmnist)")

    s = sub.add_parser("datasets", help="list known datasets and whether their files are present")
    data_dir(s)
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_datasets)

    s = sub.add_parser("models", help="list models with parameters and MACs")
    s.add_argument("--img-size", type=int, default=28, help="input side used to count MACs")
    s.add_argument("--in-chans", type=int, default=1, help="input channels used to count parameters and MACs")
    s.add_argument("--num-classes", type=int, default=2, help="classes of the head used to count parameters")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("train", help="train a model and evaluate it on the test split")
    s.add_argument("--dataset", help=TrainConfig.__dataclass_fields__["dataset"].metadata["help"])
    add_config_options(s, _cli_fields(TrainConfig))
    g = s.add_argument_group("several datasets (--dataset a,b,...)")
    add_config_options(g, [f for f in _cli_fields(GeneralistConfig) if f.name in GENERALIST_ONLY])
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    for action in s._actions:  # mark the defaults, so that given options can be told apart (see train_kwargs)
        if action.dest not in ("help", "json"):
            action.default = _Default(action.default)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="metrics of a checkpoint on a split")
    s.add_argument("checkpoint", help="best_model.pth or a run directory")
    data_dir(s)
    s.add_argument("--split", choices=("train", "val", "test"), default="test", help="split to evaluate")
    s.add_argument("--out", default=None,
                   help="write the confusion matrix and reliability diagram PNGs here (default: no figures)")
    s.add_argument("--report", default=None, metavar="DIR",
                   help="write DIR/report.md (metrics, calibration, per-class table, official MedMNIST rows) with "
                        "its figures (confusion, ROC, reliability, most confident mistakes) (default: no report)")
    s.add_argument("--precision", choices=("auto", "bf16", "fp32", "run"), default="run",
                   help="run: the precision the run was trained and evaluated in (so figures match metrics.json); "
                        "auto: bf16 where the CPU has native bf16")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("predict", help="classify images with a checkpoint")
    s.add_argument("checkpoint", help="best_model.pth or a run directory")
    s.add_argument("images", nargs="+", help="PNG/JPEG/TIFF/BMP files or .npy arrays")
    s.add_argument("--top-k", type=int, default=None, help="show the K most probable classes (default: all)")
    s.add_argument("--threshold", type=float, default=None,
                   help="multi-label decision threshold (default: the checkpoint's, tuned on val, else 0.5)")
    s.add_argument("--ordinal", choices=("argmax", "expected"), default="argmax",
                   help="ordinal tasks: report the most probable grade or the rounded expected grade")
    s.add_argument("--dataset", default=None, metavar="NAME",
                   help="generalist checkpoints: answer with this dataset's head (default: the head the router picks)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("explain", help="Grad-CAM heatmaps: where a checkpoint looked in images")
    s.add_argument("checkpoint", help="best_model.pth or a run directory")
    s.add_argument("images", nargs="+", help="PNG/JPEG/TIFF/BMP files or .npy arrays")
    s.add_argument("--out", required=True, help="directory for the <image>_<method>.png panels")
    s.add_argument("--method", choices=tuple(CAM_METHODS), default=DEFAULT_CAM_METHOD,
                   help=f"{', '.join(CAM_METHODS)} (eigencam is class-agnostic)")
    s.add_argument("--class", dest="target_class", default=None, metavar="NAME_OR_INDEX",
                   help="explain this class, by name or index (default: each image's predicted class)")
    s.add_argument("--top-k", type=int, default=3, help="probabilities shown in the panel")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("calibrate", help="fit the confidence temperature on the validation split and store it")
    s.add_argument("checkpoint", metavar="RUN_OR_CKPT", help="a run directory or a checkpoint file")
    data_dir(s)
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("serve", help="HTTP API and web page (with Grad-CAM) for a checkpoint")
    s.add_argument("checkpoint", help="best_model.pth, a run directory, or an .onnx file with --backend onnx")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on, 1..65535")
    s.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="torch (with Grad-CAM) or onnx (ONNX Runtime, no torch in the server process)")
    s.add_argument("--onnx", default=None, metavar="PATH",
                   help="--backend onnx: the exported model (default: export the checkpoint to a temporary file)")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body accepted (413 above)")
    s.add_argument("--threads", type=int, default=1, help="model threads (1 is fastest for small images)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("export", help="export a checkpoint to ONNX (checked against torch)")
    s.add_argument("checkpoint", help="best_model.pth or a run directory")
    s.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX model")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset, 9..21")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("quickstart", help="train, evaluate and predict on the embedded BreastMNIST")
    s.add_argument("--out", default="runs/quickstart", help="run directory (replaced if it exists)")
    s.add_argument("--epochs", type=int, default=40, help="training epochs")
    s.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    s.set_defaults(func=cmd_quickstart)
    for sp in sub.choices.values():
        _show_defaults(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MedmixError as e:
        print(f"medmix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medmix: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
