"""The HTTP API (FastAPI TestClient): happy paths, every kind of bad upload (never a 500), concurrency, the page."""
from __future__ import annotations

import asyncio
import io
import re
import struct
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient
from PIL import Image


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int = 100_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb if anyone expanded it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def test_images():
    from medmix.data.medmnist import ASSETS

    with np.load(ASSETS / "breastmnist.npz") as d:
        return d["test_images"][:6].copy()


@pytest.fixture(scope="module")
def app(trained_run):
    from medmix.serve.app import create_app

    return create_app(trained_run.run_dir)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def small_client(trained_run):
    """Tight limits: 4 KB uploads, 10,000 pixels, 2 files."""
    from medmix.serve.app import create_app

    with TestClient(create_app(trained_run.run_dir, max_upload_bytes=4096, max_pixels=10_000, max_files=2)) as c:
        yield c


@pytest.fixture(scope="module")
def predictor(trained_run):
    from medmix.predict import Predictor

    return Predictor(trained_run.run_dir)


# ----------------------------------------------------------------------------------------------- happy paths
def test_predict_one_image_matches_predictor(client, predictor, test_images):
    data = png_bytes(test_images[0])
    r = client.post("/v1/predict", files={"files": ("scan.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "hybrid_mixer_small" and body["backend"] == "torch" and body["latency_ms"] > 0
    (p,) = body["predictions"]
    want = predictor.predict([data])[0]
    assert p["file"] == "scan.png"
    assert p["label"] == want["label"] and p["index"] == want["index"]
    assert p["confidence"] == pytest.approx(want["confidence"], abs=1e-6)
    assert set(p["probabilities"]) == set(predictor.class_names)
    assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert list(p["probabilities"].values()) == sorted(p["probabilities"].values(), reverse=True)
    if predictor.ood is None:  # OOD fields only when the checkpoint has a detector
        assert "in_distribution" not in p and "ood_score" not in p
    else:
        assert p["in_distribution"] == want["in_distribution"]
        assert p["ood_score"] == pytest.approx(want["ood_score"], rel=1e-5)


def test_noise_gets_the_same_ood_answer_as_predictor(client, predictor):
    noise = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    p = client.post("/v1/predict", files={"files": ("noise.png", noise)}).json()["predictions"][0]
    want = predictor.predict([noise])[0]
    assert p["label"] == want["label"]
    assert p.get("in_distribution") == want.get("in_distribution")


def test_predict_several_files_keeps_order_and_accepts_field_file(client, predictor, test_images):
    files = [("files", (f"img{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(test_images[:4])]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert [p["file"] for p in got] == [f"img{i}.png" for i in range(4)]
    want = predictor.predict([png_bytes(a) for a in test_images[:4]])
    assert [p["label"] for p in got] == [w["label"] for w in want]
    # `file` (singular) works too, and the type is decided by decoding, not by the name or content type
    r = client.post("/v1/predict", files={"file": ("notes.txt", png_bytes(test_images[0]), "text/plain")})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == want[0]["label"]


def test_concurrent_requests_are_safe(app, predictor, test_images):
    import httpx

    datas = [png_bytes(a) for a in test_images]
    want = [w["label"] for w in predictor.predict(datas)]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            rs = await asyncio.gather(*[c.post("/v1/predict", files={"files": (f"{i}.png", datas[i % len(datas)])})
                                        for i in range(24)])
        return rs

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    assert [r.json()["predictions"][0]["label"] for r in rs] == [want[i % len(datas)] for i in range(24)]


def test_model_health_docs_and_page(client, predictor):
    m = client.get("/v1/model").json()
    assert m["classes"] == list(predictor.class_names) and m["task"] == predictor.info.task
    assert m["dataset"] == "breastmnist" and m["model"] == "hybrid_mixer_small"
    assert m["img_size"] == 28 and m["metrics"]["test"]["acc"] is not None and m["explain"] is True
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for el in ('id="file"', 'id="label"', 'id="bars"', 'id="cam"', 'id="error"', 'id="ood"'):
        assert el in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must not load anything remote"


def test_explain_returns_png_overlay(client, predictor, test_images):
    data = png_bytes(test_images[1])
    r = client.post("/v1/explain", files={"files": ("x.png", data, "image/png")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "RGB" and min(img.size) >= 224
    from urllib.parse import unquote

    want = predictor.predict([data])[0]["label"]
    assert unquote(r.headers["x-medmix-label"]) == want == unquote(r.headers["x-medmix-explained-class"])
    other = client.post("/v1/explain?target_class=1&method=gradcam%2B%2B", files={"files": ("x.png", data)})
    assert other.status_code == 200
    assert unquote(other.headers["x-medmix-explained-class"]) == predictor.class_names[1]


# ----------------------------------------------------------------------------------------------- bad input
def _assert_error(r, status: int):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"] and body["error"]
    return body["detail"]


def test_too_big_upload_is_413(client, small_client, test_images):
    big = b"\0" * (10 * 1024 * 1024 + 1)
    assert "upload limit" in _assert_error(client.post("/v1/predict", files={"files": ("big.png", big)}), 413)
    # a body streamed without Content-Length is cut off as it arrives
    data = b"--xx\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n" + b"\1" * 9000 + \
        b"\r\n--xx--\r\n"

    def chunks():
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    r = small_client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xx"})
    _assert_error(r, 413)


def test_pixel_limit_and_decompression_bomb_are_413(client, small_client, test_images):
    detail = _assert_error(client.post("/v1/predict", files={"files": ("bomb.png", bomb_png())}), 413)
    assert "bomb.png" in detail and "pixels" in detail
    # under PIL's own bomb limit, the server's pixel limit decides from the header alone
    detail = _assert_error(client.post("/v1/predict", files={"files": ("big.png", bomb_png(9000))}), 413)
    assert "9000x9000" in detail
    big = png_bytes(np.zeros((120, 120), np.uint8))  # 14,400 pixels > 10,000, small file
    _assert_error(small_client.post("/v1/predict", files={"files": ("wide.png", big)}), 413)
    assert small_client.post("/v1/predict", files={"files": ("ok.png", png_bytes(test_images[0]))}).status_code == 200


@pytest.mark.parametrize("name,data,status", [
    ("text.png", b"this is not an image, whatever the name says", 415),
    ("truncated.png", None, 415),
    ("fake.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 50, 415),
    ("bad.npy", b"\x93NUMPY garbage", 415),
    ("empty.png", b"", 422),
])
def test_undecodable_uploads(client, test_images, name, data, status):
    if data is None:
        data = png_bytes(test_images[0])[:60]
    detail = _assert_error(client.post("/v1/predict", files={"files": (name, data, "image/png")}), status)
    assert name in detail
    _assert_error(client.post("/v1/explain", files={"files": (name, data, "image/png")}), status)


def test_bad_requests_are_422_never_500(client, small_client, test_images):
    assert "files" in _assert_error(client.post("/v1/predict"), 422)
    _assert_error(client.post("/v1/predict", data={"other": "x"}), 422)
    _assert_error(client.post("/v1/predict", data={"files": "not a file"}), 422)
    _assert_error(client.post("/v1/predict", content=b"garbage",
                              headers={"content-type": "multipart/form-data; boundary=zz"}), 422)
    _assert_error(client.post("/v1/predict", json={"image": "abc"}), 422)
    three = [("files", (f"{i}.png", png_bytes(test_images[i]))) for i in range(3)]
    assert "limit of 2" in _assert_error(small_client.post("/v1/predict", files=three), 422)
    data = png_bytes(test_images[0])
    _assert_error(client.post("/v1/explain", files=[("files", ("a.png", data)), ("files", ("b.png", data))]), 422)
    _assert_error(client.post("/v1/explain?method=nope", files={"files": ("a.png", data)}), 422)
    zebra = client.post("/v1/explain?target_class=zebra", files={"files": ("a.png", data)})
    assert "classes are" in _assert_error(zebra, 422)
    assert client.get("/v1/predict").status_code == 405
    assert client.get("/nope").status_code == 404


def test_explain_default_method_is_the_cli_default(client):
    """The page calls /v1/explain without a method: it must draw what `medmix explain` draws."""
    from medmix.cam_methods import DEFAULT_METHOD

    spec = client.get("/openapi.json").json()
    params = spec["paths"]["/v1/explain"]["post"]["parameters"]
    method = next(p for p in params if p["name"] == "method")
    assert method["schema"]["default"] == DEFAULT_METHOD


# ----------------------------------------------------------------------------------------------- the Grad-CAM picture
def _left_dark_right_hot(side: int = 28) -> np.ndarray:
    """0 on the left half (exactly), 1 on the right third (exactly), a ramp between."""
    m = np.zeros((side, side), np.float32)
    m[:, side // 2:] = np.linspace(0.0, 1.0, side - side // 2, dtype=np.float32)
    m[:, -(side // 3):] = 1.0
    return m


def test_overlay_png_keeps_the_anatomy_and_draws_a_scale_strip():
    from medmix.imaging import CAM_ALPHA_MAX, CAM_LUT, enlarged_rgb
    from medmix.serve.app import overlay_png

    image = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    png = overlay_png(image, _left_dark_right_hot())
    assert len(png) < 60_000  # a 28 px input at 280 px plus the strip
    out = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    big = np.rint(enlarged_rgb(image, 280) * 255).astype(int)
    h, w = big.shape[:2]
    assert out.shape == (h, w + 48, 3)
    assert np.array_equal(out[:, :130], big[:, :130])  # no evidence: the input pixels, untouched
    hot = np.rint(((1 - CAM_ALPHA_MAX) * big[:, 200:] / 255 + CAM_ALPHA_MAX * CAM_LUT[-1]) * 255)
    assert np.abs(out[:, 200:w] - hot).max() <= 1  # the map at 1: the top colour at opacity alpha_max
    assert np.abs(out[:, 200:w] - big[:, 200:]).max() > 25
    bar = out[:, w + 12]  # the middle column of the strip: high at the top, low (mid-grey, untinted) at the bottom
    top = np.rint((0.5 * (1 - CAM_ALPHA_MAX) + CAM_ALPHA_MAX * CAM_LUT[-1]) * 255)
    assert np.abs(bar[10] - top).max() <= 1 and np.abs(bar[h - 11] - 128).max() <= 1
    labels = out[:, w + 21:].max(axis=2)
    assert labels[:30].max() > 200 and labels[-30:].max() > 200 and labels[100:180].max() < 40  # "high", "low"
    legacy = np.asarray(Image.open(io.BytesIO(overlay_png(image, _left_dark_right_hot(), image_weight=0.55))))
    want = np.rint((0.55 * big[:, 200:] / 255 + 0.45 * CAM_LUT[-1]) * 255)
    assert np.abs(legacy[:, 200:w].astype(int) - want).max() <= 1  # the old keyword: the image's weight at the max


def test_explain_png_carries_the_scale_strip_and_stays_small(client, test_images):
    r = client.post("/v1/explain", files={"files": ("x.png", png_bytes(test_images[2]), "image/png")})
    from medmix.cam_methods import DEFAULT_METHOD

    assert r.status_code == 200 and r.headers["x-medmix-method"] == DEFAULT_METHOD
    assert 1_000 < len(r.content) < 100_000
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    h, w = img.shape[:2]
    assert h == 280 and w == 280 + 48
    bar = img[:, 280 + 12]
    assert bar[10, 0] > bar[10, 2] + 40 and abs(bar[h - 11] - 128).max() <= 1  # red at "high", grey at "low"


def test_page_has_the_grad_cam_legend_with_the_method_names(client):
    import json

    from medmix.explain import _CLASS_AGNOSTIC, _METHOD_NAMES

    html = client.get("/").text
    for el in ('id="camlegend"', 'id="cammethod"', 'id="camwhat"'):
        assert el in html
    names = json.loads(re.search(r"const CAM_NAMES = (\{.*?\});", html, re.S).group(1))
    assert names == _METHOD_NAMES  # the page names a method as the panels do
    assert set(json.loads(re.search(r"const CLASS_AGNOSTIC = (\[.*?\]);", html).group(1))) == _CLASS_AGNOSTIC
    assert 'r.headers.get("X-Medmix-Method")' in html and "scaled per image" in html
