"""Where a training step's time goes: the training loop's own pieces under torch.profiler, per phase and per op.

    python benchmarks/profile_step.py [--models hybrid_mixer_small resnet18_28] [--dataset breastmnist] [--steps 20]

Writes results/profile.{json,md}. Each model trains on real images through the very objects ``medmix train`` uses
(``engine.SingleTask``: its augmentation, model, loss and ``step``; Adam and the per-step schedule as
``training.fit`` builds them). The phases are marked with ``torch.profiler.record_function`` around the task's
own calls (augmentation, forward, loss inside ``task.step``; then backward and the optimiser step), so nothing is
re-implemented. For every model and precision the script reports:

* the unprofiled step: median wall time over ``--steps`` steps after warm-up, images/s, and the achieved FLOP/s
  (3 x 2 x MACs per image: forward plus a backward of twice its cost) against the matmul peak of that precision,
  measured in the same run;
* the share of the profiled step spent in each phase, and what no phase covers (the loop's Python between calls);
* the operators with the largest self CPU time, grouped into families (convolution, matmul, normalisation,
  elementwise, data movement, optimiser, augmentation sampling), and the operator calls per step (nested calls
  counted too): a small model whose step is hundreds of short kernels is bound by per-call overhead, not by
  arithmetic.

Timings depend on the CPU kind (AVX2, AVX-512 BF16, AMX: see the machine line); compare within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from _common import DEFAULT_DATA, command_line, machine, table, write_results
from models import matmul_peak

from medmix import distributed
from medmix.catalog import count_macs
from medmix.engine import SingleTask, TrainConfig
from medmix.inference import bf16_supported
from medmix.training import schedule

PHASES = ("augment", "forward", "loss", "backward", "optimizer")
FAMILIES = (  # (family, substrings of aten op names), first match wins
    ("convolution", ("conv", "mkldnn_convolution")),
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "_scaled_dot_product")),
    ("normalisation", ("batch_norm", "layer_norm", "group_norm", "native_norm")),
    ("optimiser", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
    ("augmentation sampling", ("grid_sampler", "affine_grid", "randperm", "uniform", "normal_", "bernoulli")),
    ("data movement", ("copy_", "to_copy", "cat", "clone", "contiguous", "empty", "zeros", "fill_", "index",
                       "stack", "permute", "transpose", "view", "reshape", "expand", "slice", "select", "as_strided",
                       "pad", "unfold")),
)


def family(op: str) -> str:
    name = op.lower()
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "elementwise and other"


class Marked:
    """Calls ``fn`` inside ``record_function(label)``; what the profiler attributes to ``label``."""

    def __init__(self, label: str, fn) -> None:
        self.label, self.fn = label, fn

    def __call__(self, *args, **kwargs):
        with torch.profiler.record_function(self.label):
            return self.fn(*args, **kwargs)

    def __getattr__(self, name):  # the task reads attributes of its transform (e.g. ``augment.identity``)
        return getattr(self.fn, name)


def build(model: str, dataset: str, precision: str, batch: int, data_dir: str):
    cfg = TrainConfig(dataset=dataset, model=model, precision=precision, batch_size=batch, data_dir=data_dir,
                      quiet=True, epochs=1)
    task = SingleTask(cfg, distributed.Context())
    opt = torch.optim.Adam([p for p in task.model.parameters() if p.requires_grad], lr=cfg.lr)
    sched = schedule(opt, cfg.schedule, 10_000, 0)
    task.train_tf = Marked("augment", task.train_tf)
    task.loss_fn = Marked("loss", task.loss_fn)
    forward = task.model.forward
    task.model.forward = Marked("forward", forward)  # the instance attribute: nn.Module.__call__ finds it
    task.begin_epoch(1)
    task.model.train()
    return cfg, task, opt, sched


def one_step(task, opt, sched, idx) -> None:
    s = task.step(task.model, idx)
    opt.zero_grad(set_to_none=True)
    with torch.profiler.record_function("backward"):
        s.objective.backward()
    with torch.profiler.record_function("optimizer"):
        opt.step()
        sched.step()


def batches(task, n: int):
    out = []
    while len(out) < n:
        out += list(task.batches())
    return out[:n]


def measure(model: str, dataset: str, precision: str, batch: int, steps: int, warmup: int, data_dir: str) -> dict:
    cfg, task, opt, sched = build(model, dataset, precision, batch, data_dir)
    idxs = batches(task, warmup + 2 * steps)
    for idx in idxs[:warmup]:
        one_step(task, opt, sched, idx)
    times = []
    for idx in idxs[warmup:warmup + steps]:
        t = time.perf_counter()
        one_step(task, opt, sched, idx)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for idx in idxs[warmup + steps:]:
            one_step(task, opt, sched, idx)
        profiled_s = (time.perf_counter() - t) / steps
    events = prof.key_averages()
    phase_us = {p: 0.0 for p in PHASES}
    fam_us: dict[str, float] = defaultdict(float)
    ops, calls = [], 0
    for e in events:
        if e.key in phase_us:
            phase_us[e.key] += e.cpu_time_total
        elif e.key.startswith("aten::"):
            fam_us[family(e.key)] += e.self_cpu_time_total
            calls += e.count
            ops.append((e.key, e.self_cpu_time_total / steps, e.count / steps))
    ops.sort(key=lambda r: -r[1])
    n_img = len(idxs[0])
    macs = count_macs(task.model, task.img_size, task.info.n_channels)
    flops = 6.0 * macs * n_img / step_s
    profiled_us = profiled_s * 1e6 * steps
    return {"model": model, "dataset": dataset, "precision": precision, "batch": n_img, "steps": steps,
            "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * t for t in times], "img_s": n_img / step_s,
            "macs_per_image": macs, "train_flops": flops, "profiled_step_ms": 1e3 * profiled_s,
            "phase_share": {p: phase_us[p] / profiled_us for p in PHASES},
            "outside_phases_share": max(0.0, 1.0 - sum(phase_us.values()) / profiled_us),
            "family_ms": {k: v / steps / 1e3 for k, v in sorted(fam_us.items(), key=lambda kv: -kv[1])},
            "aten_calls_per_step": calls / steps,
            "top_ops": [{"op": k, "self_ms": v / 1e3, "calls": c} for k, v, c in ops[:12]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["hybrid_mixer_small", "resnet18_28"])
    ap.add_argument("--dataset", default="breastmnist")
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--batch", type=int, default=128, help="the default --batch-size of medmix train")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precisions", nargs="+", default=None,
                    help="default: fp32, and bf16 where the CPU has native bf16 (emulated bf16 is ~100x slower)")
    a = ap.parse_args()
    precisions = a.precisions or (["fp32", "bf16"] if bf16_supported() else ["fp32"])
    m = machine()
    peaks = {k: max(matmul_peak(dt, n) for n in (1024, 2048)) for k, dt in (("fp32", torch.float32),
                                                                        ("bf16", torch.bfloat16))}
    rows = [measure(model, a.dataset, p, a.batch, a.steps, a.warmup, a.data_dir)
            for model in a.models for p in precisions]
    for r in rows:
        r["peak_flops"] = peaks[r["precision"]]
        r["peak_share"] = r["train_flops"] / peaks[r["precision"]]

    md = [f"# Where a training step's time goes (`{command_line()}`)", "",
          f"Machine: {m['description']}; native bf16: {m['native_bf16']}. {a.dataset} at its stored size, batch "
          f"{a.batch}, median of {a.steps} unprofiled steps after {a.warmup} warm-up steps; shares from "
          f"{a.steps} further steps under torch.profiler (which slows each call, so the shares of many short calls "
          f"are overstated). Matmul peak measured in the same run: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
          f"{peaks['bf16'] / 1e9:.0f} GFLOP/s (the faster of a 1024 and a 2048 square matmul). The FLOP count is "
          f"an estimate (backward taken as twice the forward), so a share near or above 100 % says the model runs "
          f"at the machine's large-kernel speed, not that it beats the peak.", "",
          table(["model", "precision", "step ms", "img/s", "MMACs/img", "GFLOP/s (train)", "% of peak",
                 "aten ops/step (nested included)", *PHASES, "outside phases"],
                [[r["model"], r["precision"], f"{r['step_ms']:.1f}", f"{r['img_s']:.0f}",
                  f"{r['macs_per_image'] / 1e6:.1f}", f"{r['train_flops'] / 1e9:.1f}", f"{100 * r['peak_share']:.1f}",
                  f"{r['aten_calls_per_step']:.0f}", *(f"{100 * r['phase_share'][p]:.0f} %" for p in PHASES),
                  f"{100 * r['outside_phases_share']:.0f} %"] for r in rows]), ""]
    for r in rows:
        md += [f"## {r['model']}, {r['precision']}", "",
               "Self CPU time per step by operator family: " + ", ".join(
                   f"{k} {v:.1f} ms" for k, v in r["family_ms"].items()) + ".", "",
               table(["operator", "self ms / step", "calls / step"],
                     [[o["op"], f"{o['self_ms']:.2f}", f"{o['calls']:.0f}"] for o in r["top_ops"]]), ""]
    write_results("profile", {"command": command_line(), "machine": m, "peaks_flops": peaks, "rows": rows},
                  "\n".join(md))


if __name__ == "__main__":
    main()
