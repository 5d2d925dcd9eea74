"""How fast medmix trains and infers on this CPU, and how long until a model is good: throughput, the loop's
speed knobs measured on and off, int8 inference, and time to accuracy beside the reference models.

    python benchmarks/speed.py [--parts train knobs infer tta] [--data-dir ~/medmnist] [--reuse] [--report-only]

Writes results/speed.{json,md,png}. Each part caches its measurement in runs/bench/speed/<part>.json, so parts can
run at different times (``--report-only`` tabulates what is there); timings are only comparable within one part,
which measures everything it compares side by side in one process (round-robin), and within one CPU kind (the
machine line names it: AVX2, AVX-512 BF16 or AMX).

* ``train``: training images/s of the default model, ``resnet18_28``, ``medvit_small`` and ``cnn_transformer``
  through the very step ``medmix train`` runs (``engine.SingleTask``: augmentation, model, loss; Adam and the
  per-step schedule as ``training.fit`` builds them) on real BreastMNIST images, fp32 and (where the CPU has native
  bf16) bf16; achieved FLOP/s (6 x MACs per image) against the matmul peak of that precision measured in the same
  run; the ratio to ``resnet18_28`` at the same precision.
* ``knobs``: the default model's step with each speed option on and off: fused or per-parameter Adam, channels_last,
  batch size, ``torch.compile`` (its compile time counted), threads, precision.
* ``infer``: batch and single-image inference of the default model trained on each real set (the ``tta`` part's
  seed-0 run): torch fp32/bf16, ONNX Runtime fp32 and int8 (``medmix export --int8``), with the test ACC/AUC of each.
* ``tta`` (time to accuracy): val ACC against wall-clock time, per epoch, for the default recipe (3 seeds), the
  official MedMNIST ResNet-18 (28) recipe in the precision medmix picks, and MedViT-S with the MedViT paper's recipe
  (epochs capped on the larger sets: a full run takes hours here). The time to accuracy is the wall time (training
  plus the per-epoch validation) until the default recipe's val ACC first reaches the best val ACC of the
  ``resnet18_28`` run on the same set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import DEFAULT_DATA, RESULTS, command_line, fmt, machine, recipe, table, train_or_reuse, write_results

CACHE = Path("runs/bench/speed")
SETS = ("breastmnist", "retinamnist", "pneumoniamnist")
DEFAULT_MODEL = "hybrid_mixer_small"
# (label, model, recipe, seeds, epochs per set or None for the recipe's own)
TTA_RUNS = (
    ("default", DEFAULT_MODEL, "medmix", (0, 1, 2), {}),
    ("resnet18_28", "resnet18_28", "medmnist_official", (0,), {"retinamnist": 50, "pneumoniamnist": 20}),
    ("medvit_small", "medvit_small", "medvit_paper", (0,), {"retinamnist": 20, "pneumoniamnist": 8}),
)
TTA_LABELS = {"default": f"{DEFAULT_MODEL} (medmix defaults)",
              "resnet18_28": "resnet18_28 (official MedMNIST recipe, medmix's precision)",
              "medvit_small": "medvit_small (MedViT paper recipe)"}


def save_part(name: str, doc: dict) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    from medmix.training import jsonable

    (CACHE / f"{name}.json").write_text(json.dumps(jsonable(doc), indent=2))


def load_part(name: str) -> dict | None:
    p = CACHE / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ----------------------------------------------------------------------------------------------- time to accuracy
def curve(run_dir: Path) -> dict:
    """Per epoch: cumulative wall seconds (training plus validation) and the val metrics, from the run's log."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    t, out = 0.0, {"epoch": [], "seconds": [], "val_acc": [], "val_auc": [], "train_img_s": []}
    for r in rows:
        t += float(r["epoch_seconds"])
        for k, v in (("epoch", r["epoch"]), ("seconds", t), ("val_acc", r["val_acc"]), ("val_auc", r["val_auc"]),
                     ("train_img_s", r["train_img_s"])):
            out[k].append(v)
    return out


def time_to(c: dict, target: float) -> float | None:
    return next((s for s, a in zip(c["seconds"], c["val_acc"]) if a >= target - 1e-12), None)


def part_tta(a) -> dict:
    from medmix.data.medmnist import file_name
    from medmix.inference import resolve_precision

    runs = []
    for ds in SETS:
        if not (Path(a.data_dir) / file_name(ds, 28)).is_file():
            print(f"{ds}: not in {a.data_dir}, skipped", file=sys.stderr)
            continue
        for label, model, rec, seeds, epochs in TTA_RUNS:
            for seed in seeds:
                kw = recipe(rec, epochs=epochs.get(ds))
                if rec == "medmnist_official":
                    kw["precision"] = "auto"
                out = CACHE / "tta" / f"{ds}-{label}-s{seed}"
                partial = out.with_name(out.name + ".partial")
                if a.partial_references and label != "default" and not (out / "metrics.json").is_file():
                    if not (partial / "log.jsonl").is_file():
                        continue
                    c = curve(partial)  # stopped for time: the epochs it trained, no test read
                    runs.append({"dataset": ds, "label": label, "model": model, "recipe": rec, "seed": seed,
                                 "epochs": len(c["epoch"]), "planned_epochs": kw.get("epochs"), "partial": True,
                                 "train_seconds": c["seconds"][-1], "precision": resolve_precision(
                                     json.loads((partial / "config.json").read_text())["precision"]),
                                 "best_val_acc": max(c["val_acc"]), "test_acc": None, "test_auc": None, "curve": c})
                    continue
                r = train_or_reuse(out, a.reuse, dataset=ds, data_dir=a.data_dir, model=model, seed=seed,
                                   **{"patience": kw.get("epochs", 30), **kw})
                c = curve(out)
                runs.append({"dataset": ds, "label": label, "model": model, "recipe": rec, "seed": seed,
                             "epochs": len(c["epoch"]), "train_seconds": r.seconds, "precision": r.precision,
                             "best_val_acc": max(c["val_acc"]), "test_acc": r.test["acc"], "test_auc": r.test["auc"],
                             "curve": c})
                print(f"{ds} {label} seed {seed}: {len(c['epoch'])} epochs {r.seconds:.0f} s, best val ACC "
                      f"{max(c['val_acc']):.3f}", file=sys.stderr, flush=True)
    return {"machine": machine(), "runs": runs}


def tta_summary(doc: dict) -> tuple[list[dict], str]:
    rows, lines = [], []
    for ds in SETS:
        mine = [r for r in doc["runs"] if r["dataset"] == ds]
        ref = next((r for r in mine if r["label"] == "resnet18_28"), None)
        if ref is None:
            continue
        target = ref["best_val_acc"]
        for label in ("default", "resnet18_28", "medvit_small"):
            rs = [r for r in mine if r["label"] == label]
            if not rs:
                continue
            hits = [time_to(r["curve"], target) for r in rs]
            reached = [h for h in hits if h is not None]
            rows.append({"dataset": ds, "label": label, "target": target, "n_seeds": len(rs),
                         "seconds_to_target": hits,
                         "median_seconds_to_target": statistics.median(reached) if len(reached) == len(rs) else None,
                         "best_val_acc": [r["best_val_acc"] for r in rs],
                         "train_seconds": [r["train_seconds"] for r in rs],
                         "epochs": [r["epochs"] for r in rs], "precision": rs[0]["precision"],
                         "planned": rs[0].get("planned_epochs") if rs[0].get("partial") else None})
    md_rows = []
    for r in rows:
        hits = r["seconds_to_target"]
        when = ", ".join("never" if h is None else f"{h:.0f}" for h in hits)
        md_rows.append([r["dataset"], TTA_LABELS[r["label"]], r["n_seeds"], f"{r['target']:.3f}",
                        fmt(r["best_val_acc"]), when, fmt(r["train_seconds"], 0),
                        "/".join(map(str, r["epochs"])) + (f" of {r['planned']} (stopped for time)" if r["planned"]
                                                           else ""), r["precision"]])
    lines = [table(["set", "model (recipe)", "seeds", "target val ACC (best of resnet18_28)", "best val ACC",
                    "s to target, per seed", "run s", "epochs", "precision"], md_rows)]
    return rows, "\n".join(lines)


def tta_figure(doc: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sets = [ds for ds in SETS if any(r["dataset"] == ds for r in doc["runs"])]
    fig = Figure(figsize=(5 * len(sets), 4))
    FigureCanvasAgg(fig)
    colours = {"default": "tab:blue", "resnet18_28": "tab:red", "medvit_small": "tab:green"}
    for i, ds in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), i + 1)
        ref = next((r for r in doc["runs"] if r["dataset"] == ds and r["label"] == "resnet18_28"), None)
        for r in (r for r in doc["runs"] if r["dataset"] == ds):
            c = r["curve"]
            ax.plot(c["seconds"], c["val_acc"], color=colours[r["label"]], lw=1.2, alpha=0.8,
                    label=TTA_LABELS[r["label"]] if r["seed"] == 0 else None)
        if ref is not None:
            ax.axhline(ref["best_val_acc"], color="grey", ls="--", lw=0.8, label="best val ACC of resnet18_28")
        ax.set_xscale("log")
        ax.set_xlabel("wall-clock seconds (training + validation)")
        ax.set_ylabel("val ACC")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------- training throughput
TRAIN_MODELS = (DEFAULT_MODEL, "resnet18_28", "medvit_small", "cnn_transformer")


def matmul_peak(dtype) -> float:
    """FLOP/s of the faster of a 1024 and a 2048 square matmul: the large-kernel speed of this CPU."""
    from models import matmul_peak as square_peak

    return max(square_peak(dtype, n) for n in (1024, 2048))


class Stepper:
    """The training step ``medmix train`` runs (``engine.SingleTask.step``, then backward, the optimiser and the
    per-step schedule as ``training.fit`` builds them), on a fixed list of real batches; ``variant`` changes one
    speed knob."""

    def __init__(self, model: str, dataset: str, data_dir: str, precision: str, batch: int = 128,
                 optimizer: str = "foreach", channels_last: bool = True, compile: bool = False) -> None:
        import torch

        from medmix import distributed
        from medmix.engine import SingleTask, TrainConfig
        from medmix.training import schedule

        cfg = TrainConfig(dataset=dataset, model=model, precision=precision, batch_size=batch, data_dir=data_dir,
                          quiet=True, epochs=1)
        self.task = task = SingleTask(cfg, distributed.Context())
        if not channels_last:
            task.model = task.model.to(memory_format=torch.contiguous_format)
            task.train_tf.channels_last = False
        kw = {"fused": True} if optimizer == "fused" else {"foreach": optimizer == "foreach"}
        self.opt = torch.optim.Adam([p for p in task.model.parameters() if p.requires_grad], lr=cfg.lr, **kw)
        self.sched = schedule(self.opt, cfg.schedule, 10_000, 0)
        t = time.perf_counter()
        self.net = torch.compile(task.model) if compile else task.model
        task.begin_epoch(1)
        task.model.train()
        self.idx = []
        while len(self.idx) < 64:
            self.idx += list(task.batches())
        self.i = 0
        self.batch = len(self.idx[0])
        self.step()  # warm-up (and, compiled, the compilation)
        self.step()
        self.first_seconds = time.perf_counter() - t

    def step(self) -> float:
        t = time.perf_counter()
        s = self.task.step(self.net, self.idx[self.i % len(self.idx)])
        self.opt.zero_grad(set_to_none=True)
        s.objective.backward()
        self.opt.step()
        self.sched.step()
        float(s.loss.detach())  # the loop reads the loss every step
        self.i += 1
        return time.perf_counter() - t


def interleaved(steppers: dict, rounds: int, steps: int, max_seconds: float = 30.0) -> dict[str, float]:
    """Median step seconds of each stepper, round-robin over ``rounds`` x ``steps`` so noise hits all alike (a
    stepper slower than ``max_seconds`` per step does ``1`` step per round)."""
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(rounds):
        for k, st in steppers.items():
            n = 1 if times[k] and times[k][-1] > max_seconds / steps else steps
            times[k] += [st.step() for _ in range(n)]
    return {k: statistics.median(v) for k, v in times.items()}


def part_train(a) -> dict:
    import torch

    from medmix.catalog import count_macs
    from medmix.inference import bf16_supported

    precisions = ("fp32", "bf16") if bf16_supported() else ("fp32",)
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    steppers, macs = {}, {}
    for m in TRAIN_MODELS:
        for p in precisions:
            st = steppers[(m, p)] = Stepper(m, "breastmnist", a.data_dir, p)
            macs[m] = count_macs(st.task.model, st.task.img_size, st.task.info.n_channels)
    med = interleaved(steppers, rounds=5, steps=4)
    peaks_after = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    rows = []
    for (m, p), st in steppers.items():
        img_s = st.batch / med[(m, p)]
        flops = 6.0 * macs[m] * img_s
        rows.append({"model": m, "precision": p, "batch": st.batch, "step_ms": 1e3 * med[(m, p)], "img_s": img_s,
                     "macs": macs[m], "gflops": flops / 1e9, "peak_frac": flops / max(peaks[p], peaks_after[p])})
    for r in rows:
        ref = next(x for x in rows if x["model"] == "resnet18_28" and x["precision"] == r["precision"])
        r["vs_resnet18_28"] = r["img_s"] / ref["img_s"]
    return {"machine": machine(), "peaks": peaks, "peaks_after": peaks_after, "rows": rows}


def train_md(d: dict) -> str:
    pk = ", ".join(f"{p} {d['peaks'][p] / 1e9:.0f}-{d['peaks_after'][p] / 1e9:.0f} GFLOP/s" for p in d["peaks"])
    rows = [[r["model"], r["precision"], f"{r['macs'] / 1e6:.1f}", f"{r['step_ms']:.0f}", f"{r['img_s']:,.0f}",
             f"{r['vs_resnet18_28']:.1f}x", f"{r['gflops']:.0f}", f"{100 * r['peak_frac']:.0f} %"] for r in d["rows"]]
    return "\n".join([
        f"Machine: {d['machine']['description']}; native bf16: {d['machine']['native_bf16']}. BreastMNIST, batch "
        f"128, the training step of `medmix train` (augmentation, forward, loss, backward, Adam, schedule), median "
        f"of 5 rounds x 4 steps, every model and precision interleaved. Matmul peak measured before and after in the "
        f"same run: {pk} (the higher is used).", "",
        table(["model", "precision", "MMACs/img", "step ms", "train img/s", "vs resnet18_28 (same precision)",
               "GFLOP/s", "% of that precision's peak"], rows)])


# ----------------------------------------------------------------------------------------------- speed knobs
def knob_variants(bf16: bool) -> dict[str, dict]:
    p = "bf16" if bf16 else "fp32"
    out = {"default step (" + p + ", channels_last, foreach Adam, batch 128)": {"precision": p},
           "fused Adam": {"precision": p, "optimizer": "fused"},
           "per-parameter Adam (no foreach)": {"precision": p, "optimizer": "single"},
           "contiguous (no channels_last)": {"precision": p, "channels_last": False},
           "batch 64": {"precision": p, "batch": 64},
           "batch 256": {"precision": p, "batch": 256},
           "torch.compile (inductor)": {"precision": p, "compile": True}}
    if bf16:
        out["fp32 instead of bf16"] = {"precision": "fp32"}
    return out


def part_knobs(a) -> dict:
    import torch

    from medmix.inference import bf16_supported

    variants = knob_variants(bf16_supported())
    steppers = {k: Stepper(DEFAULT_MODEL, "breastmnist", a.data_dir, **v) for k, v in variants.items()}
    med = interleaved(steppers, rounds=7, steps=4)
    rows = []
    base = next(iter(variants))
    for k, st in steppers.items():
        rows.append({"variant": k, "batch": st.batch, "step_ms": 1e3 * med[k], "img_s": st.batch / med[k],
                     "first_two_steps_s": st.first_seconds})
    torch.set_num_threads(1)
    one = Stepper(DEFAULT_MODEL, "breastmnist", a.data_dir, **variants[base])
    ref = Stepper(DEFAULT_MODEL, "breastmnist", a.data_dir, **variants[base])
    from medmix.inference import set_threads

    t1 = statistics.median([one.step() for _ in range(12)])
    set_threads()
    t2 = statistics.median([ref.step() for _ in range(12)])
    rows.append({"variant": "1 thread instead of all", "batch": one.batch, "step_ms": 1e3 * t1,
                 "img_s": one.batch / t1, "first_two_steps_s": one.first_seconds, "paired_all_threads_ms": 1e3 * t2})
    for r in rows:
        r["vs_default"] = r["img_s"] / rows[0]["img_s"] if r["variant"] != "1 thread instead of all" else \
            r["img_s"] / (one.batch / t2)
    return {"machine": machine(), "rows": rows}


def knobs_md(d: dict) -> str:
    rows = [[r["variant"], f"{r['step_ms']:.0f}", f"{r['img_s']:,.0f}", f"{r['vs_default']:.2f}x",
             f"{r['first_two_steps_s']:.1f}"] for r in d["rows"]]
    return "\n".join([
        f"Machine: {d['machine']['description']}. The default model on BreastMNIST; each row changes one thing; "
        "median of 7 rounds x 4 steps, all variants interleaved (the thread row is timed against its own paired "
        "default step, after the others).", "",
        table(["variant", "step ms", "train img/s", "vs the default step", "first two steps s (compile included)"],
              rows)])


# ----------------------------------------------------------------------------------------------- inference
def part_infer(a) -> dict:
    import tempfile

    import numpy as np
    import onnxruntime as ort
    import torch

    from medmix.evaluation import score_logits
    from medmix.export import export_onnx
    from medmix.inference import bf16_supported, predict_logits
    from medmix.run import Run
    from medmix.serve.onnx_backend import NumpyTransform

    rows = []
    tmp = Path(tempfile.mkdtemp())
    for ds in SETS:
        ckpt = CACHE / "tta" / f"{ds}-default-s0" / "best_model.pth"
        if not ckpt.is_file():
            print(f"{ds}: no trained default run ({ckpt}); run --parts tta first", file=sys.stderr)
            continue
        run = Run.of(ckpt)
        bundle = run.training_data(a.data_dir)
        test = bundle.splits["test"]
        info = run.task
        model = run.build_model()
        tf = run.transform()
        files = {"fp32": tmp / f"{ds}.onnx", "int8": tmp / f"{ds}_int8.onnx"}
        export_onnx(ckpt, files["fp32"])
        int8 = export_onnx(ckpt, files["int8"], int8=True, int8_force=True)
        ntf = NumpyTransform(run.meta["img_size"], run.meta["mean"], run.meta["std"])
        x_np = ntf(test.images.numpy())
        sessions = {}
        for k, f in files.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
            sessions[k] = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
        batch = np.resize(x_np, (256, *x_np.shape[1:])).astype(np.float32)
        u8 = test.images[torch.arange(256) % len(test)]
        precisions = ("fp32", "bf16") if bf16_supported() else ("fp32",)

        def torch_run(p: str, images) -> torch.Tensor:
            return predict_logits(model, images, tf, 256, p)

        jobs = {**{f"torch {p}": (lambda p=p: torch_run(p, u8)) for p in precisions},
                **{f"onnxruntime {k}": (lambda s=s: s.run(["logits"], {"input": batch})) for k, s in sessions.items()}}
        single = {f"onnxruntime {k}": (lambda s=s: s.run(["logits"], {"input": batch[:1]})) for k, s in
                  sessions.items()}
        single.update({f"torch {p}": (lambda p=p: torch_run(p, u8[:1])) for p in precisions})
        t_batch = {k: [] for k in jobs}
        t_single = {k: [] for k in single}
        for _ in range(2):  # warm-up
            for f in (*jobs.values(), *single.values()):
                f()
        for _ in range(9):
            for k, f in jobs.items():
                t = time.perf_counter()
                f()
                t_batch[k].append(time.perf_counter() - t)
            for k, f in single.items():
                t = time.perf_counter()
                for _ in range(10):
                    f()
                t_single[k].append((time.perf_counter() - t) / 10)
        metrics = {}
        for p in precisions:
            metrics[f"torch {p}"] = score_logits(predict_logits(model, test.images, tf, 256, p), test.labels,
                                                 info.task, info.class_names)[0]
        for k, s in sessions.items():
            z = torch.from_numpy(s.run(["logits"], {"input": x_np})[0])
            metrics[f"onnxruntime {k}"] = score_logits(z, test.labels, info.task, info.class_names)[0]
        for k in jobs:
            rows.append({"dataset": ds, "engine": k, "batch_img_s": 256 / statistics.median(t_batch[k]),
                         "single_ms": 1e3 * statistics.median(t_single[k]), "test_acc": metrics[k]["acc"],
                         "test_auc": metrics[k]["auc"], "bytes": files[k.split()[-1]].stat().st_size
                         if k.startswith("onnx") else None})
        rows.append({"dataset": ds, "engine": "int8 parity on val (at export)", "int8": int8.get("int8")})
    return {"machine": machine(), "rows": rows}


def infer_md(d: dict) -> str:
    rows = []
    for r in d["rows"]:
        if "engine" in r and "batch_img_s" in r:
            ref = next(x for x in d["rows"] if x["dataset"] == r["dataset"] and x.get("engine") == "torch fp32")
            rows.append([r["dataset"], r["engine"], f"{r['batch_img_s']:,.0f}",
                         f"{r['batch_img_s'] / ref['batch_img_s']:.1f}x", f"{r['single_ms']:.2f}",
                         f"{r['test_acc']:.3f}", f"{r['test_auc']:.3f}",
                         f"{r['test_acc'] - ref['test_acc']:+.3f} / {r['test_auc'] - ref['test_auc']:+.4f}",
                         f"{r['bytes'] / 1e6:.2f} MB" if r.get("bytes") else "–"])
    return "\n".join([
        f"Machine: {d['machine']['description']}. The default model trained on each set (seed 0 of the time-to-"
        "accuracy runs); batch of 256 test images and single images, median of 9 rounds, engines interleaved; "
        "the model alone (preprocessing excluded: it is the same NumPy/torch resize and normalisation for all). "
        "Test ACC/AUC of the whole test split through each engine, the difference to torch fp32 beside it.", "",
        table(["set", "engine", "batch img/s", "vs torch fp32", "single image ms", "test ACC", "test AUC",
               "ACC / AUC vs torch fp32", "file"], rows)])


# ----------------------------------------------------------------------------------------------- the command
PARTS = {"train": part_train, "knobs": part_knobs, "infer": part_infer, "tta": part_tta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=tuple(PARTS), default=list(PARTS))
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--reuse", action="store_true", help="read finished runs and measured parts, resume the rest")
    ap.add_argument("--report-only", action="store_true", help="measure nothing; tabulate the cached parts")
    ap.add_argument("--partial-references", action="store_true",
                    help="tta: a reference run stopped before its last epoch is tabulated from the epochs it "
                         "trained instead of being resumed (marked as stopped)")
    a = ap.parse_args()

    from medmix.inference import set_threads

    set_threads()
    if not a.report_only:
        for p in a.parts:
            t0 = time.perf_counter()
            doc = PARTS[p](a)
            doc["seconds"] = time.perf_counter() - t0
            doc["command"] = command_line()
            save_part(p, doc)
    report()


def report() -> None:
    parts = {p: load_part(p) for p in PARTS}
    md = ["# Speed on this CPU: training, inference, time to accuracy", "",
          f"Command: `python benchmarks/speed.py` (parts run separately: {', '.join(p for p in parts if parts[p])})",
          ""]
    doc: dict = {"parts": parts}
    if parts.get("tta"):
        d = parts["tta"]
        rows, text = tta_summary(d)
        doc["time_to_accuracy"] = rows
        md += ["## Time to accuracy", "", f"Machine: {d['machine']['description']}. Measured in {d['seconds']:.0f} s "
               f"(runs reused from earlier invocations count their own time).", "", text, "",
               "Wall time is the sum of the logged epoch times (training and the per-epoch validation); it leaves "
               "out data loading and model building (about a second). One seed for the reference runs (their cost), "
               "three for the default recipe. Capped epochs (a full run takes hours here): resnet18_28 50 of the "
               "recipe's 100 on RetinaMNIST and 20 on PneumoniaMNIST (its step schedule scaled to the run); "
               "medvit_small 20 on RetinaMNIST and 8 on PneumoniaMNIST of the paper's 50 (cosine over the shortened "
               "run). A capped reference reaches a lower best val ACC than its full run would, so the target is "
               "easier to reach there.", "", "![time to accuracy](speed.png)", ""]
        tta_figure(d, RESULTS / "speed.png")
    for name, title, fn in (("train", "Training throughput", train_md), ("knobs", "Speed knobs, on and off", knobs_md),
                            ("infer", "Inference: torch, ONNX Runtime fp32 and int8", infer_md)):
        if parts.get(name):
            md += [f"## {title}", "", fn(parts[name]), ""]
    write_results("speed", doc, "\n".join(md))


if __name__ == "__main__":
    main()
