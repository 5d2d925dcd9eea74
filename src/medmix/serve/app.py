"""The HTTP API and web page: ``create_app(checkpoint) -> FastAPI``; ``medmix serve`` runs it with uvicorn.

Endpoints (OpenAPI docs at ``/docs``):

* ``POST /v1/predict`` — multipart form, one or several image files in the field ``files`` (or ``file``) ->
  ``{"model", "backend", "latency_ms", "predictions": [{"file", "label", ...}]}``, each prediction with the keys of
  ``medmix predict --json`` (:func:`medmix.imaging.describe`: calibrated, ``probabilities`` the full distribution)
  and ``in_distribution``/``ood_score`` when the checkpoint carries an OOD threshold.
* ``POST /v1/explain`` — one image -> a PNG: the input with its Grad-CAM heatmap overlaid (the anatomy at full
  opacity, the map on top with opacity rising with its value) and a low-to-high colour scale strip at its right
  (torch backend only; the ONNX backend answers 501). Query ``method`` (gradcam, gradcam++, ...) and
  ``target_class`` (name or index; default: the predicted class). The prediction travels in ``X-Medmix-*`` headers
  (URL-encoded).
* ``GET /v1/model`` — checkpoint metadata: model, task, classes, dataset, metrics, sizes, limits.
* ``GET /health`` — liveness; ``GET /`` — the page (``static/index.html``, self-contained, no CDN).

Bad input is answered with a JSON ``{"detail": message, "error": code}`` and never a 500: 413 for a request
body over ``max_upload_bytes`` or an image over ``max_pixels`` (checked from the header before decoding, so a
decompression bomb is never expanded), 415 for a file that does not decode as an image (decided by decoding,
not by the file name), 422 for anything else (no file, an empty file, an unknown class, too many files).

The model is loaded once, in :func:`create_app`. Predictions run off the event loop on one worker thread that
batches whatever requests are waiting (no added delay: a lone request runs at once, requests that arrive while
a batch runs share the next one); Grad-CAM runs in the thread pool under the same model lock.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import io
import math
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..cam_methods import DEFAULT_METHOD as DEFAULT_CAM_METHOD
from ..cam_methods import METHODS as CAM_METHODS
from ..errors import CheckpointError, ConfigError, ImageError, MedmixError
from ..imaging import MAX_PIXELS, ImageTooLarge, enlarged_rgb, image_size
from .onnx_backend import OnnxPredictor

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD = 10 * 1024 * 1024
DEFAULT_MAX_FILES = 32
BACKENDS = ("torch", "onnx")


class BadRequest(MedmixError):
    """A request the API cannot use (HTTP 422)."""


class NotAvailable(MedmixError):
    """A feature the running backend does not have (HTTP 501)."""


# ----------------------------------------------------------------------------------------------- backends
class TorchBackend:
    """The checkpoint in torch (:class:`medmix.predict.Predictor`): predictions and Grad-CAM. The app uses it, or an
    :class:`~medmix.serve.onnx_backend.OnnxPredictor`, by their common ``backend``, ``meta``, ``path``, ``load``,
    ``predict_arrays`` and ``explain_available``."""

    backend = "torch"
    explain_available = True

    def __init__(self, checkpoint: str | os.PathLike, threads: int | None = None) -> None:
        import torch

        from ..predict import load_predictor

        if threads:
            torch.set_num_threads(int(threads))
        self.pred = load_predictor(checkpoint)  # a generalist's answers name the dataset the router chose
        self.meta, self.path, self.load = self.pred.meta, self.pred.path, self.pred.load
        self.lock = threading.Lock()

    def predict_arrays(self, images: Sequence[Any], names: Sequence[str]) -> list[dict]:
        with self.lock:
            results = self.pred.predict(list(images))  # keeps every field Predictor reports (OOD included)
        for r, n in zip(results, names):
            r["file"] = n
        return results

    def explain(self, image: Any, name: str, method: str, target_class: str | None) -> tuple[bytes, dict]:
        from ..explain import explained

        with self.lock:  # a generalist: the routed head's classes, label and confidence its most probable class
            cams, [(classes, p, j, label, conf, _, head, _)] = explained(self.pred, image[None], target_class, method)
        info = {"file": name, **head, "label": label, "confidence": round(conf, 6), "explained_class": classes[j],
                "explained_index": j, "explained_probability": round(float(p[j]), 6), "method": method}
        return overlay_png(image.numpy(), cams[0]), info


def export_for_serving(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export ``checkpoint`` to ``out_dir/model.onnx`` in a child process, so the serving process never imports
    torch."""
    out = Path(out_dir) / "model.onnx"
    cmd = [sys.executable, "-m", "medmix", "export", os.fspath(checkpoint), "--onnx", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0 or not out.is_file():
        msg = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise CheckpointError(f"could not export {checkpoint} to ONNX for --backend onnx: {msg}")
    return out


def load_backend(checkpoint: str | os.PathLike, backend: str = "torch", onnx_path: str | os.PathLike | None = None,
                 threads: int | None = None, max_pixels: int = MAX_PIXELS):
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use torch or onnx")
    ckpt = Path(checkpoint)
    if backend == "torch":
        if ckpt.suffix.lower() == ".onnx":
            raise ConfigError(f"{ckpt} is an ONNX file: serve it with --backend onnx, or pass the checkpoint")
        return TorchBackend(ckpt, threads)
    if onnx_path is not None or ckpt.suffix.lower() == ".onnx":
        return OnnxPredictor(ckpt if onnx_path is None else onnx_path, threads=threads, max_pixels=max_pixels)
    tmp = tempfile.mkdtemp(prefix="medmix-onnx-")
    model = OnnxPredictor(export_for_serving(ckpt, tmp), threads=threads, max_pixels=max_pixels)
    model.checkpoint, model.tmpdir = ckpt, tmp  # the tmpdir is removed when the app shuts down
    return model


# ----------------------------------------------------------------------------------------------- batching
class Batcher:
    """One worker thread runs ``fn(images, names)``; each request is a Future. Requests already waiting when the
    worker becomes free are run together (up to ``max_batch`` images), so no request waits for a timer."""

    def __init__(self, fn: Callable[[list, list], list[dict]], max_batch: int = 64) -> None:
        self.fn, self.max_batch = fn, max_batch
        self.q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, images: list, names: list[str]) -> Future:
        fut: Future = Future()
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="medmix-batcher", daemon=True)
                self._thread.start()
        self.q.put((images, names, fut))
        return fut

    def close(self) -> None:
        if self._thread is not None:
            self.q.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        stop = False
        while not stop:
            jobs = [self.q.get()]  # wait for one request, then take the others already waiting (None: close)
            while jobs[-1] is not None and sum(len(j[0]) for j in jobs) < self.max_batch:
                try:
                    jobs.append(self.q.get_nowait())
                except queue.Empty:
                    break
            stop = jobs[-1] is None
            if stop:
                jobs.pop()
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list) -> None:
        images = [im for j in jobs for im in j[0]]
        names = [nm for j in jobs for nm in j[1]]
        try:
            results = self.fn(images, names)
        except BaseException as e:  # hand the error to every waiting request
            for _, _, fut in jobs:
                fut.set_exception(e)
            return
        start = 0
        for imgs, _, fut in jobs:
            fut.set_result(results[start:start + len(imgs)])
            start += len(imgs)


# ----------------------------------------------------------------------------------------------- Grad-CAM picture
def overlay_png(image: np.ndarray, cam: np.ndarray, side: int = 280, image_weight: float | None = None, *,
                alpha_max: float | None = None) -> bytes:
    """uint8 ``(C, H, W)`` image and a ``(h, w)`` heatmap in [0, 1] -> PNG of the image enlarged to at least ``side``
    pixels (nearest neighbour) with the heatmap (bilinear) drawn over it the way ``medmix explain`` draws it
    (:func:`medmix.imaging.cam_overlay`: the anatomy at full opacity, the Turbo colours on top with an opacity of
    ``alpha_max * value``, so no tint where there is no evidence), and at its right a colour scale strip from "low"
    (transparent) to "high" drawn at the same opacities over mid-grey, so the PNG explains itself wherever it ends up.
    ``image_weight`` (the former fixed blend weight of the image) is still taken: the image's weight where the map is
    strongest, i.e. ``alpha_max = 1 - image_weight``; default :data:`~medmix.imaging.CAM_ALPHA_MAX`."""
    from PIL import ImageDraw, ImageFont

    from ..imaging import CAM_ALPHA_MAX, cam_overlay

    if alpha_max is None:
        alpha_max = CAM_ALPHA_MAX if image_weight is None else 1.0 - float(image_weight)
    big = enlarged_rgb(image, side)
    h, w = big.shape[:2]
    pic = cam_overlay(big, cam, alpha_max)
    gap, bar, text_w, pad = 6, 12, 30, min(10, h // 8)  # the strip: a gap, the bar, room for its labels; margins
    canvas = np.full((h, w + gap + bar + text_w, 3), 17 / 255, np.float32)  # #111, the frame of the page
    canvas[:, :w] = pic
    ramp = np.linspace(1.0, 0.0, h - 2 * pad, dtype=np.float32)[:, None].repeat(bar, axis=1)  # top = high
    canvas[pad:h - pad, w + gap:w + gap + bar] = cam_overlay(np.full(ramp.shape + (3,), 0.5, np.float32), ramp,
                                                             alpha_max)
    out = Image.fromarray(np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8))
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    draw, x = ImageDraw.Draw(out), w + gap + bar + 3
    for word, top in (("high", True), ("low", False)):  # placed by their ink boxes (bitmap fonts take no anchor)
        x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
        draw.text((x - x0, pad - y0 if top else h - pad - y1), word, fill=(230, 230, 230), font=font)
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- the body limit
class BodyLimitMiddleware:
    """413 for a request body over ``limit`` bytes: at once from ``Content-Length``, else while it streams in."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, int(limit)

    async def _reject(self, scope, send, size: int | None) -> None:
        got = f"{size:,} bytes" if size is not None else "the request body"
        response = _error(413, "payload_too_large", f"{got} is more than the upload limit of {self.limit:,} bytes "
                                                    f"({self.limit / 2 ** 20:.1f} MB); send a smaller image")
        response.headers["connection"] = "close"
        await response(scope, None, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            n = int(dict(scope.get("headers") or []).get(b"content-length", -1))
        except ValueError:
            n = -1
        if n > self.limit:
            return await self._reject(scope, send, n)
        state = {"received": 0, "exceeded": False, "started": False}

        async def limited_receive():
            msg = {"type": "http.disconnect"} if state["exceeded"] else await receive()
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                state["exceeded"] = state["received"] > self.limit
            return {"type": "http.disconnect"} if state["exceeded"] else msg

        async def guarded_send(msg):
            if state["exceeded"]:
                if not state["started"]:
                    state["started"] = True
                    await self._reject(scope, send, None)
                return
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["exceeded"]:
                raise
            if not state["started"]:
                state["started"] = True
                await self._reject(scope, send, None)


# ----------------------------------------------------------------------------------------------- the app
def _error(status: int, code: str, detail: Any, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, "error": code, **extra}, status_code=status)


async def _answer(status: int, code: str, request: Request, e: MedmixError) -> JSONResponse:
    return _error(status, code, str(e))


def _meta_doc(backend, settings: dict) -> dict:
    meta = backend.meta
    task, ood = meta["task"], meta.get("ood")
    return {"model": meta["model"], "backend": backend.backend, "task": task["task"],
            "classes": list(task["class_names"]), "n_channels": int(task["n_channels"]), "dataset": meta.get("dataset"),
            "metrics": meta.get("metrics") or {"val": meta.get("val_metrics"), "test": meta.get("test_metrics")},
            "img_size": int(meta["img_size"]), "data_size": int(meta["data_size"]),
            "temperature": meta.get("temperature", 1.0), "threshold": meta.get("threshold", 0.5),
            "ood": ood if isinstance(ood, dict) else None, "explain": backend.explain_available, **settings,
            "checkpoint": Path(getattr(backend, "checkpoint", backend.path)).name,
            "generalist": [{"dataset": d["name"], "task": d["task"]["task"], "classes": list(d["task"]["class_names"])}
                           for d in meta["generalist"]["datasets"]] if meta.get("kind") == "generalist" else None,
            "medmix_version": __version__}


def create_app(checkpoint: str | os.PathLike, backend: str = "torch", max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               max_pixels: int = MAX_PIXELS, *, onnx_path: str | os.PathLike | None = None,
               max_files: int = DEFAULT_MAX_FILES, threads: int | None = 1, max_batch: int = 64) -> FastAPI:
    """A FastAPI app serving ``checkpoint`` (a checkpoint, a run directory, or an ``.onnx`` file for
    ``backend="onnx"``). ``onnx_path``: the exported model for the onnx backend (default: ``checkpoint`` itself
    when it is an ``.onnx`` file, else it is exported to a temporary file in a child process). ``threads``:
    intra-op threads of the model (default 1: a 28-px model gains nothing from more, and on a shared or busy CPU
    torch's thread pool can be 100x slower with 2 threads than with 1 — measured here; concurrency comes from
    batching); None keeps the library's default."""
    if max_upload_bytes < 1 or max_pixels < 1 or max_files < 1:
        raise ConfigError("max_upload_bytes, max_pixels and max_files must be positive")
    model = load_backend(checkpoint, backend, onnx_path, threads, max_pixels)
    batcher = Batcher(model.predict_arrays, max_batch=max_batch)
    settings = {"max_upload_bytes": int(max_upload_bytes), "max_pixels": int(max_pixels), "max_files": max_files}
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()
        if getattr(model, "tmpdir", None):
            shutil.rmtree(model.tmpdir, ignore_errors=True)

    app = FastAPI(title="medmix", version=__version__, lifespan=lifespan,
                  description=f"Medical image classification: {model.meta['model']} on "
                              f"{model.meta.get('dataset')} ({model.backend} backend). Upload images to "
                              f"`/v1/predict`; `/v1/explain` returns a Grad-CAM overlay PNG.")
    app.state.backend, app.state.batcher, app.state.settings = model, batcher, settings
    app.add_middleware(BodyLimitMiddleware, limit=max_upload_bytes)

    # ------------------------------------------------------------------ errors: JSON, never a 500 for bad input
    # the most specific class in an error's MRO picks the answer
    for exc, status, code in ((ImageTooLarge, 413, "payload_too_large"), (ImageError, 415, "unsupported_image"),
                              (NotAvailable, 501, "not_available"), (MedmixError, 422, "invalid_request")):
        app.add_exception_handler(exc, functools.partial(_answer, status, code))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        parts = []
        for x in e.errors():
            where = ".".join(str(v) for v in x.get("loc", ()) if v not in ("body", "query"))
            parts.append(f"{where}: {x.get('msg', 'invalid')}" if where else str(x.get("msg", "invalid")))
        msg = "; ".join(parts) or "invalid request"
        if any(x.get("type") == "missing" for x in e.errors()):
            msg = f"{msg} (send the image as multipart/form-data in the field 'files')"
        return _error(422, "invalid_request", msg)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        status = 422 if e.status_code == 400 else e.status_code  # a body that is not valid multipart
        return _error(status, "invalid_request" if status == 422 else "http_error", e.detail,
                      **({} if status != 405 else {"allowed": e.headers.get("Allow") if e.headers else None}))

    # ------------------------------------------------------------------ helpers
    async def read_uploads(files: list[UploadFile] | None, file: UploadFile | None) -> list[tuple[str, bytes]]:
        uploads = [f for f in (files or []) + ([file] if file is not None else []) if f is not None]
        if not uploads:
            raise BadRequest("no image: send one or more files as multipart/form-data in the field 'files'")
        if len(uploads) > max_files:
            raise BadRequest(f"{len(uploads)} files is more than the limit of {max_files} per request")
        out = []
        for i, f in enumerate(uploads):
            name = os.path.basename(f.filename or "") or f"image[{i}]"
            data = await f.read()  # within max_upload_bytes: BodyLimitMiddleware stopped larger bodies
            if not data:
                raise BadRequest(f"{name}: the file is empty")
            out.append((name, data))
        return out

    def decode_all(items: list[tuple[str, bytes]]) -> list[Any]:
        arrays = []
        for name, data in items:
            wh = image_size(data, name)  # header only: a bomb is refused before its pixels are expanded
            if wh is not None and wh[0] * wh[1] > max_pixels:
                raise ImageTooLarge(f"{name}: {wh[0]}x{wh[1]} = {wh[0] * wh[1]:,} pixels is more than the limit "
                                      f"of {max_pixels:,} pixels")
            arrays.append(model.load(data, name))
        return arrays

    # ------------------------------------------------------------------ endpoints
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/health", summary="Liveness")
    async def health() -> dict:
        return {"status": "ok", "backend": model.backend, "model": model.meta["model"],
                "uptime_s": round(time.time() - started, 1), "medmix_version": __version__}

    @app.get("/v1/model", summary="Checkpoint metadata: model, task, classes, dataset, metrics, sizes, limits")
    async def model_info() -> dict:
        return _meta_doc(model, settings)

    @app.post("/v1/predict", summary="Classify one or several images",
              responses={413: {"description": "upload or image too large"},
                         415: {"description": "not a decodable image"}, 422: {"description": "bad request"}})
    async def predict(files: Annotated[list[UploadFile] | None,
                                       File(description="image files (PNG, JPEG, TIFF, BMP, GIF, WebP, .npy, "
                                                         "single-frame DICOM)")] = None,
                      file: Annotated[UploadFile | None, File(description="one image file")] = None) -> dict:
        items = await read_uploads(files, file)
        t0 = time.perf_counter()
        arrays = await run_in_threadpool(decode_all, items)
        results = await asyncio.wrap_future(batcher.submit(arrays, [n for n, _ in items]))
        latency = (time.perf_counter() - t0) * 1000.0
        return {"model": model.meta["model"], "backend": model.backend, "latency_ms": round(latency, 3),
                "predictions": results}

    @app.post("/v1/explain", summary="Grad-CAM overlay PNG for one image (torch backend)",
              response_class=Response,
              responses={200: {"content": {"image/png": {}}}, 501: {"description": "ONNX backend: no Grad-CAM"}})
    async def explain(files: Annotated[list[UploadFile] | None, File(description="one image file")] = None,
                      file: Annotated[UploadFile | None, File(description="one image file")] = None,
                      method: Annotated[str, Query(description=", ".join(CAM_METHODS))] = DEFAULT_CAM_METHOD,
                      target_class: Annotated[str | None, Query(description="class name or index to "
                                                                            "explain (default: predicted)")] = None
                      ) -> Response:
        if not model.explain_available:
            raise NotAvailable(f"Grad-CAM is not available on the {model.backend} backend: it needs the model's "
                               f"gradients; start the server with --backend torch")
        items = await read_uploads(files, file)
        if len(items) != 1:
            raise BadRequest(f"/v1/explain takes one image, got {len(items)}")
        if method not in CAM_METHODS:
            raise BadRequest(f"unknown method {method!r}; use one of {', '.join(CAM_METHODS)}")
        t0 = time.perf_counter()
        (image,) = await run_in_threadpool(decode_all, items)
        png, info = await run_in_threadpool(model.explain, image, items[0][0], method, target_class)
        headers = {"X-Medmix-Label": quote(str(info["label"])), "X-Medmix-Confidence": str(info["confidence"]),
                   "X-Medmix-Explained-Class": quote(str(info["explained_class"])),
                   "X-Medmix-Method": method, "X-Medmix-Latency-Ms": f"{(time.perf_counter() - t0) * 1000:.1f}",
                   "Cache-Control": "no-store"}
        if "dataset" in info:  # a generalist: the dataset the router chose, and its confidence
            headers.update({"X-Medmix-Dataset": quote(str(info["dataset"])),
                            "X-Medmix-Dataset-Confidence": str(info["dataset_confidence"])})
        return Response(png, media_type="image/png", headers=headers)

    return app


def run(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, backend: str = "torch",
        onnx_path: str | os.PathLike | None = None, max_upload_mb: float = 10.0, log_level: str = "info",
        threads: int | None = 1) -> None:
    """Build the app (the model loads here, once) and serve it with uvicorn until interrupted.

    The listening socket is bound first, before the model loads: a port in use or a host that is not this
    machine's fails at once with one line, and no other server can take the port between the check and the start."""
    import uvicorn

    if not math.isfinite(max_upload_mb) or max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    sock = listen(host, port)
    try:
        app = create_app(checkpoint, backend, int(max_upload_mb * 1024 * 1024), onnx_path=onnx_path,
                         threads=threads)
        shown = f"[{host}]" if ":" in host else host
        print(f"medmix: serving {app.state.backend.meta['model']} ({backend} backend) on http://{shown}:{port}/  "
              f"(API docs at /docs)", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (as uvicorn binds: SO_REUSEADDR), or one ``ConfigError`` line."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"--port must be 1..65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r}: not an address or a name this machine can resolve "
                          f"({getattr(e, 'strerror', None) or e})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (another server?); choose another with "
                              f"--port") from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"port {port} on {host}: permission denied (ports below 1024 need privileges); "
                              f"choose another with --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"--host {host}: not an address of this machine") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(2048)  # uvicorn's default backlog; from here on the port is ours
    return sock
