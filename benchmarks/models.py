"""Every registered model: parameters, MACs at 28 and 224 px, CPU train/infer throughput, fp32 and bf16 side by side.

    python benchmarks/models.py [--sizes 28 64] [--batch 64] [--repeats 5]

Writes results/models.{json,md}. Throughput is the median over ``--repeats`` timed steps after warm-up, measured in
one process with every model and precision interleaved (round-robin), so machine noise hits all alike; the ratio to
``resnet18_28`` is the number to compare. The achieved FLOP/s are put beside the fp32 and bf16 matmul peaks
measured in the same run. A model too slow for a size (more than ``--max-seconds`` per step) is reported as skipped.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import command_line, machine, table, write_results


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def step_time(model, x, y, train: bool, precision: str) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    t = time.perf_counter()
    if train:
        model.train()
        with ctx:
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.inference_mode(), ctx:
            model(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=20.0)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--bf16", choices=("auto", "all", "none"), default="auto",
                    help="which models to time in bf16: auto = all on CPUs with native bf16, else only the default "
                         "model (emulated bf16 runs ~100x slower than fp32 matmul and would take hours)")
    a = ap.parse_args()

    from medmix.catalog import count_macs
    from medmix.inference import set_threads
    from medmix.models import create_model, list_models, model_info

    set_threads()
    torch.manual_seed(0)
    names = a.models or list_models()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows_doc = []
    for name in names:
        m28 = create_model(name, num_classes=2, in_chans=1, img_size=28)
        m224 = create_model(name, num_classes=2, in_chans=1, img_size=224)
        rows_doc.append({"model": name, "family": model_info(name).family,
                         "params": sum(p.numel() for p in m28.parameters()),
                         "macs_28": count_macs(m28, 28, 1), "macs_224": count_macs(m224, 224, 1), "speed": {}})
        del m224
    # throughput: round-robin over (model, size, precision, mode) so noise is shared
    from medmix.inference import bf16_supported

    def precisions(name: str) -> tuple[str, ...]:
        if a.bf16 == "all" or (a.bf16 == "auto" and bf16_supported()):
            return ("fp32", "bf16")
        return ("fp32", "bf16") if a.bf16 == "auto" and name == "hybrid_mixer_small" else ("fp32",)

    jobs = [(r, s, p, mode) for s in a.sizes for r in rows_doc for p in precisions(r["model"])
            for mode in ("train", "infer")]
    models = {}
    for r in rows_doc:
        for s in a.sizes:
            models[(r["model"], s)] = create_model(r["model"], num_classes=2, in_chans=1, img_size=s).to(
                memory_format=torch.channels_last)
    samples: dict[tuple, list[float]] = {}
    skipped: set[tuple] = set()
    for rep in range(a.repeats + 1):  # the first round is the warm-up
        for r, s, p, mode in jobs:
            key = (r["model"], s, p, mode)
            if key in skipped:
                continue
            x = torch.randn(a.batch, 1, s, s).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 2, (a.batch,))
            dt = step_time(models[(r["model"], s)], x, y, mode == "train", p)
            if dt > a.max_seconds:
                skipped.add(key)
                continue
            if rep > 0:
                samples.setdefault(key, []).append(dt)
    for r in rows_doc:
        for s in a.sizes:
            for p in ("fp32", "bf16"):
                for mode in ("train", "infer"):
                    key = (r["model"], s, p, mode)
                    if key in samples:
                        img_s = a.batch / statistics.median(samples[key])
                        macs = r["macs_28"] if s == 28 else None
                        r["speed"][f"{mode}_{p}_{s}"] = img_s
                        if s == 28 and macs:
                            flops = img_s * 2 * macs * (3 if mode == "train" else 1)
                            r["speed"][f"{mode}_{p}_{s}_peak_frac"] = flops / peaks[p]
    ref = next((r for r in rows_doc if r["model"] == "resnet18_28"), None)
    md_rows = []
    for r in rows_doc:
        sp = r["speed"]

        def v(k: str) -> str:
            return f"{sp[k]:,.0f}" if k in sp else "–"

        ratio = (f"{sp['train_fp32_28'] / ref['speed']['train_fp32_28']:.1f}x"
                 if ref and "train_fp32_28" in sp and "train_fp32_28" in ref["speed"] else "–")
        md_rows.append([r["model"], f"{r['params'] / 1e6:.2f} M", f"{(r['macs_28'] or 0) / 1e6:,.1f}",
                        f"{(r['macs_224'] or 0) / 1e9:,.2f}", v("train_fp32_28"), v("train_bf16_28"),
                        v("infer_fp32_28"), v("infer_bf16_28"), ratio,
                        f"{100 * sp.get('train_fp32_28_peak_frac', float('nan')):.1f} %"]
                       + [v(f"train_fp32_{s}") + " / " + v(f"infer_fp32_{s}") for s in a.sizes if s != 28])
    m = machine()
    header = ["model", "params", "MMACs@28", "GMACs@224", "train img/s fp32@28", "train bf16@28", "infer fp32@28",
              "infer bf16@28", "train speed vs resnet18_28", "train fp32 % of fp32 peak"] + \
             [f"train / infer fp32@{s}" for s in a.sizes if s != 28]
    md = ["# Models: size, cost and CPU throughput", "", f"Command: `{command_line()}`  ",
          f"Machine: {m['description']}; native bf16: {m['native_bf16']}. Batch {a.batch}, 1 input channel, median of "
          f"{a.repeats} steps, all models interleaved in one run. Matmul peak measured in the same run: "
          f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s.", "",
          table(header, md_rows), "",
          "Training FLOPs are counted as 3x the forward FLOPs. Parameter counts are for a 2-class head, 1 channel. "
          "'–': not measured (bf16 only for the default model when the CPU lacks native bf16; or a step over "
          f"{a.max_seconds:.0f} s)."]
    write_results("models", {"command": command_line(), "machine": m, "batch": a.batch, "peaks_flops": peaks,
                             "models": rows_doc}, "\n".join(md))


if __name__ == "__main__":
    main()
