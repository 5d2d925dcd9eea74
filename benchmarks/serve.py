"""Serving speed: a bounded HTTP load on loopback for both backends, and single-image latency without HTTP.

    python benchmarks/serve.py [--checkpoint RUN] [--seconds 60] [--clients 16] [--repeats 300]

1. For the torch and the ONNX Runtime backend in turn, ``medmix serve`` runs in its own process on 127.0.0.1 and
   ``--clients`` concurrent httpx clients (one asyncio loop in this process) post one BreastMNIST test image (PNG,
   cycling over 32 of them) to ``/v1/predict`` for ``--seconds`` after a 3 s warm-up: requests/s, latency
   p50/p95/p99 (client-side, the whole HTTP round trip) and errors (anything but 200; must be 0). Load generator
   and server share the machine's cores, so the numbers are for both together.
2. Single-image latency with the model loaded and no HTTP: a decoded uint8 image -> calibrated probabilities, for
   torch fp32, torch bf16 (autocast; emulated, and slow, on CPUs without native bf16) and ONNX Runtime; median of
   ``--repeats`` after warm-up, interleaved so machine noise hits all three alike. PNG decoding is timed apart.

Default checkpoint: ``runs/quickstart`` when it exists, else a 3-epoch quick-start run trained into a temporary
folder (about a minute). Writes results/serve.{json,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, command_line, machine, table, write_results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pngs(n: int = 32) -> list[bytes]:
    from PIL import Image

    from medmix.data.medmnist import ASSETS

    with np.load(ASSETS / "breastmnist.npz") as d:
        imgs = d["test_images"][:n]
    out = []
    for a in imgs:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def quick_checkpoint(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if (ROOT / "runs" / "quickstart" / "best_model.pth").is_file():
        return ROOT / "runs" / "quickstart"
    from medmix.engine import train

    out = Path(tempfile.mkdtemp(prefix="medmix-bench-")) / "quickstart"
    print(f"training a 3-epoch quick-start checkpoint into {out} ...", file=sys.stderr)
    train(dataset="breastmnist", model="hybrid_mixer_small", epochs=3, seed=0, out=str(out), quiet=True)
    return out


def start_server(ckpt: Path, backend: str, onnx_path: Path | None, port: int, log: Path, threads: int
                 ) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "medmix", "serve", str(ckpt), "--backend", backend, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--threads", str(threads)]
    if onnx_path is not None:
        cmd += ["--onnx", str(onnx_path)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"server did not start in 120 s: {log.read_text()[-2000:]}")


async def load(url: str, pngs: list[bytes], clients: int, seconds: float, warmup: float, max_requests: int) -> dict:
    """``clients`` loops posting images until the deadline (or ``max_requests``); only post-warm-up requests count."""
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    counter = {"sent": 0}
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds

    async def client(c: httpx.AsyncClient, k: int) -> None:
        i = k
        while True:
            now = time.perf_counter()
            if now >= t_end or counter["sent"] >= max_requests:
                return
            counter["sent"] += 1
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/predict", files={"files": (f"img{i % len(pngs)}.png", pngs[i % len(pngs)],
                                                                 "image/png")})
                ok, what = r.status_code == 200, f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                ok, what = False, type(e).__name__
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:
                lat.append(t1 - t0)
                if not ok:
                    errors[what] = errors.get(what, 0) + 1
            i += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as c:
        await asyncio.gather(*[client(c, k) for k in range(clients)])
    ms = np.asarray(lat) * 1000.0
    n = len(lat)
    return {"requests": n, "seconds": seconds, "requests_per_s": n / seconds, "errors": sum(errors.values()),
            "error_kinds": errors, "p50_ms": float(np.percentile(ms, 50)) if n else None,
            "p95_ms": float(np.percentile(ms, 95)) if n else None,
            "p99_ms": float(np.percentile(ms, 99)) if n else None,
            "mean_ms": float(ms.mean()) if n else None}


def single_image(ckpt: Path, onnx_path: Path, pngs: list[bytes], repeats: int, threads: int) -> dict:
    import torch

    from medmix.inference import bf16_supported, predict_logits, probabilities
    from medmix.predict import Predictor
    from medmix.serve.onnx_backend import OnnxPredictor

    torch.set_num_threads(threads)
    tp = Predictor(ckpt)
    op = OnnxPredictor(onnx_path, threads=threads)
    x = tp.load(pngs[0])[None]
    xn = x.numpy()
    task, temp = tp.info.task, tp.temperature

    def fp32():
        tp.probabilities(x)

    def bf16():
        probabilities(predict_logits(tp.model, x, tp.transform, precision="bf16"), task, temp)

    def ort():
        op.probabilities(xn)

    def decode_torch():
        tp.load(pngs[1])

    def decode_numpy():
        op.load(pngs[1])

    fns = {"torch fp32": fp32, "torch bf16": bf16, "onnxruntime": ort, "decode PNG (torch path)": decode_torch,
           "decode PNG (numpy path)": decode_numpy}
    for f in fns.values():  # warm-up
        for _ in range(10):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {"threads": threads, "native_bf16": bf16_supported(), "repeats": repeats,
            "median_ms": {k: statistics.median(v) * 1000 for k, v in times.items()},
            "p95_ms": {k: float(np.percentile(v, 95)) * 1000 for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="run directory or best_model.pth (default: runs/quickstart "
                                                       "or a fresh 3-epoch quick-start run)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured load per backend (after --warmup)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="hard cap per backend")
    ap.add_argument("--backends", nargs="+", choices=("torch", "onnx"), default=["torch", "onnx"])
    ap.add_argument("--repeats", type=int, default=300, help="single-image timings per variant")
    ap.add_argument("--threads", type=int, default=1, help="model threads, in the servers and the single-image "
                                                           "timings (the server's default is 1)")
    a = ap.parse_args()
    if not (0 < a.seconds <= 600 and 1 <= a.clients <= 256):
        raise SystemExit("--seconds must be in (0, 600] and --clients in [1, 256]")

    from medmix.inference import set_threads
    from medmix.export import export_onnx

    set_threads()
    ckpt = quick_checkpoint(a.checkpoint)
    work = Path(tempfile.mkdtemp(prefix="medmix-serve-bench-"))
    onnx_path = work / "model.onnx"
    exp = export_onnx(ckpt, onnx_path)
    pngs = test_pngs()

    loads = {}
    for backend in a.backends:
        port = free_port()
        proc = start_server(ckpt, backend, onnx_path if backend == "onnx" else None, port, work / f"{backend}.log",
                            a.threads)
        try:
            print(f"{backend}: {a.clients} clients for {a.seconds:.0f} s ...", file=sys.stderr)
            loads[backend] = asyncio.run(load(f"http://127.0.0.1:{port}", pngs, a.clients, a.seconds, a.warmup,
                                              a.max_requests))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"  {loads[backend]['requests_per_s']:.1f} req/s, p50 {loads[backend]['p50_ms']:.1f} ms, "
              f"errors {loads[backend]['errors']}", file=sys.stderr)
    single = single_image(ckpt, onnx_path, pngs, a.repeats, a.threads)

    m = machine()
    from medmix.checkpoint import load_checkpoint

    _, meta, _ = load_checkpoint(ckpt)
    load_rows = [[b, f"{r['requests']:,}", f"{r['requests_per_s']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}",
                  f"{r['p99_ms']:.1f}", r["errors"]] for b, r in loads.items()]
    s_rows = [[k, f"{single['median_ms'][k]:.3f}", f"{single['p95_ms'][k]:.3f}"] for k in single["median_ms"]]
    try:
        ckpt_shown = os.path.relpath(ckpt, ROOT) if str(Path(ckpt).resolve()).startswith(str(ROOT)) else str(ckpt)
    except ValueError:
        ckpt_shown = str(ckpt)
    md = ["# Serving: HTTP load and single-image latency", "", f"Command: `{command_line()}`  ",
          f"Machine: {m['description']}; native bf16: {m['native_bf16']}.  ",
          f"Model: {meta['model']} on {meta.get('dataset')} ({meta['img_size']} px, {ckpt_shown}).", "",
          (f"## HTTP load: `POST /v1/predict`, one PNG per request, {a.clients} concurrent clients, "
           f"{a.seconds:.0f} s per backend (after {a.warmup:.0f} s warm-up), loopback, {a.threads} model "
           f"thread(s)"), "",
          table(["backend", "requests", "requests/s", "p50 ms", "p95 ms", "p99 ms", "errors"], load_rows), "",
          ("Latency is the client-side round trip. The load generator (httpx, asyncio, one process) runs on the "
           "same cores as the server, which batches requests that arrive while a batch runs."), "",
          f"## Single image, model loaded, no HTTP (median of {a.repeats}, interleaved)", "",
          table(["variant", "median ms", "p95 ms"], s_rows), "",
          (f"uint8 28x28 image -> calibrated probabilities; {single['threads']} model thread(s) for torch and ONNX "
           f"Runtime alike (servers too). ONNX export check: max |torch - onnxruntime| probability "
           f"{exp['max_abs_diff_probabilities']:.1e}.")]
    if not single["native_bf16"]:
        md.append("This CPU has no native bf16: torch emulates it, so bf16 is slower than fp32 here.")
    write_results("serve", {"command": command_line(), "machine": m, "checkpoint": ckpt_shown,
                            "model": meta["model"], "dataset": meta.get("dataset"), "clients": a.clients,
                            "seconds": a.seconds, "warmup": a.warmup, "load": loads, "single_image": single,
                            "export": {k: exp[k] for k in ("max_abs_diff_probabilities", "max_abs_diff_logits",
                                                           "bytes", "opset")}},
                  "\n".join(md))
    if any(r["errors"] for r in loads.values()):
        raise SystemExit("errors under load: see results/serve.md")


if __name__ == "__main__":
    main()
