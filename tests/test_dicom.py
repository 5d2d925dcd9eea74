"""DICOM input (pydicom): the window and colour handling against computations from the files' own tags, the one-line
refusals (no pixels, several frames, a transfer syntax no installed plugin decodes, garbage, truncation, bombs), and
DICOM through ``medmix predict`` / ``explain``, a class-folder ``medmix train`` and the HTTP server.

The files are pydicom's own test files (shipped in the wheel, no download), some copied with a tag changed."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
import zlib

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from conftest import class_images  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian  # noqa: E402

from medmix import imaging  # noqa: E402
from medmix.cli import main  # noqa: E402
from medmix.data.folders import read_class_folders  # noqa: E402
from medmix.errors import ImageError  # noqa: E402
from medmix.imaging import DicomError, ImageTooLarge, image_header, image_size, load_image_np  # noqa: E402


def dcm_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


def read(name: str):
    return pydicom.dcmread(dcm_file(name))


def linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, written out."""
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 255.0, y))
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def decoded(src, channels: int = 1, **kw) -> np.ndarray:
    a = load_image_np(src, channels, **kw)
    assert a.dtype == np.uint8 and a.shape[0] == channels
    return a


# ----------------------------------------------------------------------------------------------- grayscale
def test_ct_small_rescaled_then_percentile_window():
    """CT_small: slope 1, intercept -1024, no window tags -> HU, then the 0.5-99.5 percentile range."""
    ds = read("CT_small.dcm")
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = np.percentile(hu, [0.5, 99.5])
    expected = np.clip(np.rint((hu - lo) / (hi - lo) * 255.0), 0, 255)
    got = decoded(dcm_file("CT_small.dcm"))[0]
    assert got.shape == (128, 128)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert (got == 0).mean() > 0.001 and (got == 255).mean() > 0.001  # clipped at both ends, as a percentile window


def test_ct_window_applies_to_hounsfield_units(tmp_path):
    """A soft-tissue window (40/400 HU) on CT_small: the intercept must come first (raw values would be all white)."""
    ds = read("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.save_as(tmp_path / "ct_window.dcm")
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    got = decoded(tmp_path / "ct_window.dcm")[0]
    np.testing.assert_array_equal(got, linear_window(hu, 40, 400))
    assert len(np.unique(got)) > 50 and (got == 0).any() and (got == 255).any()


def test_mr_small_uses_its_window_and_the_first_of_several(tmp_path):
    ds = read("MR_small.dcm")
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    assert (c, w) == (600, 1600) and "RescaleSlope" not in ds
    expected = linear_window(ds.pixel_array.astype(np.float64), c, w)
    got = decoded(dcm_file("MR_small.dcm"))[0]
    np.testing.assert_array_equal(got, expected)
    ds.WindowCenter, ds.WindowWidth = [600, 100], [1600, 50]  # several views: the first is the one
    ds.save_as(tmp_path / "two_windows.dcm")
    np.testing.assert_array_equal(decoded(tmp_path / "two_windows.dcm")[0], expected)


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    ds = read("MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    m2 = decoded(dcm_file("MR_small.dcm"))
    np.testing.assert_array_equal(decoded(tmp_path / "m1.dcm"), 255 - m2)
    # and without a window: inverted after the percentile window
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "m1_nowin.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "m2_nowin.dcm")
    np.testing.assert_array_equal(decoded(tmp_path / "m1_nowin.dcm"), 255 - decoded(tmp_path / "m2_nowin.dcm"))


def test_bytes_without_a_name_are_recognised_by_the_dicm_marker():
    path = dcm_file("MR_small.dcm")
    with open(path, "rb") as f:
        data = f.read()
    np.testing.assert_array_equal(decoded(data), decoded(path))
    assert image_size(data) == (64, 64)


def test_jpeg2000_decodes_through_pillow():
    got = decoded(dcm_file("JPEG2000.dcm"))
    assert got.shape == (1, 1024, 256) and len(np.unique(got)) > 50


def test_deflated_transfer_syntax_decodes(tmp_path):
    ds = read("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert (tmp_path / "deflated.dcm").stat().st_size < 0.9 * len(ds.PixelData)  # it really is deflated
    np.testing.assert_array_equal(decoded(tmp_path / "deflated.dcm"), decoded(dcm_file("MR_small.dcm")))


# ----------------------------------------------------------------------------------------------- colour
def test_colour_files_rgb_ybr_and_jpeg_agree():
    rgb_ref = read("SC_rgb_rle.dcm").pixel_array.transpose(2, 0, 1)
    rgb = decoded(dcm_file("SC_rgb_rle.dcm"), 3)
    np.testing.assert_array_equal(rgb, rgb_ref)  # RGB stays RGB, channel order kept
    assert (np.ptp(rgb.astype(int), axis=0) > 100).mean() > 0.3  # a colour picture (bars), not grey
    ybr_raw = pydicom.pixels.pixel_array(dcm_file("SC_ybr_full_422_uncompressed.dcm"), raw=True).transpose(2, 0, 1)
    assert np.abs(ybr_raw.astype(int) - rgb).mean() > 20  # the stored YBR values are far from the RGB ones
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):  # YBR_FULL_422 native, YBR_FULL JPEG
        got = decoded(dcm_file(name), 3)
        diff = np.abs(got.astype(int) - rgb)
        assert diff.max() <= 10 and diff.mean() < 1.5, (name, diff.max(), diff.mean())
    assert image_header(dcm_file("SC_ybr_full_422_uncompressed.dcm")) == (100, 100, 3)
    assert decoded(dcm_file("SC_rgb_rle.dcm"), 1).shape == (1, 100, 100)  # for a grayscale model


def test_palette_colour_through_its_lookup_tables():
    ds = read("examples_palette.dcm")
    first, bits = int(ds.RedPaletteColorLookupTableDescriptor[1]), int(ds.RedPaletteColorLookupTableDescriptor[2])
    assert ds.PhotometricInterpretation == "PALETTE COLOR" and bits == 16
    got = decoded(dcm_file("examples_palette.dcm"), 3)
    for ch, colour in enumerate(("Red", "Green", "Blue")):
        lut = np.frombuffer(getattr(ds, f"{colour}PaletteColorLookupTableData"), "<u2")
        idx = np.clip(ds.pixel_array.astype(int) - first, 0, len(lut) - 1)
        np.testing.assert_array_equal(got[ch], (lut[idx] >> 8).astype(np.uint8))
    assert image_header(dcm_file("examples_palette.dcm"))[2] == 3


# ----------------------------------------------------------------------------------------------- refusals
def _truncated(tmp_path, keep: int | None, drop: int | None) -> str:
    with open(dcm_file("CT_small.dcm"), "rb") as f:
        data = f.read()
    p = tmp_path / "truncated.dcm"
    p.write_bytes(data[:keep] if keep else data[:-drop])
    return str(p)


def _garbage(tmp_path) -> str:
    p = tmp_path / "garbage.dcm"
    p.write_bytes(b"this is no DICOM file, whatever its name says " * 20)
    return str(p)


def _needs_plugin(name: str, only: tuple = ()) -> str:
    path = dcm_file(name)
    decoder = get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if decoder.available_plugins != only:
        pytest.skip(f"{name}: pydicom plugins {decoder.available_plugins} are installed here")
    return path


REFUSALS = [
    ("rtplan", lambda t: dcm_file("rtplan.dcm"), True, ["no pixel data", "RT Plan Storage", "holds none"]),
    ("sr", lambda t: dcm_file("test-SR.dcm"), True, ["no pixel data", "SR Storage"]),
    ("rtdose", lambda t: dcm_file("rtdose.dcm"), True,
     ["15 frames; medmix reads single-frame images: export the frame you want"]),
    ("rle_2frame", lambda t: dcm_file("SC_rgb_rle_2frame.dcm"), True, ["2 frames; medmix reads single-frame"]),
    ("jpeg_ls", lambda t: _needs_plugin("MR_small_jpeg_ls_lossless.dcm"), True,
     ["JPEG-LS Lossless Image Compression", "no installed decoder", "pylibjpeg-libjpeg", "pyjpegls"]),
    ("jpeg_12bit", lambda t: _needs_plugin("JPEG-lossy.dcm", ("pillow",)), False,
     ["cannot decode the JPEG Extended", "12-bit", "pylibjpeg-libjpeg"]),
    ("garbage", _garbage, True, ["not a valid DICOM file", "'DICM'"]),
    ("truncated_pixels", lambda t: _truncated(t, None, 5000), True, ["truncated DICOM file", "(7FE0,0010)"]),
    ("truncated_header", lambda t: _truncated(t, 1000, None), True, ["truncated DICOM file"]),
    ("truncated_at_element", lambda t: _truncated(t, 300, None), True, ["no pixel data", "may be truncated"]),
]


@pytest.mark.parametrize("make,from_header,fragments", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refused_with_one_line(tmp_path, make, from_header, fragments):
    path = make(tmp_path)
    with pytest.raises(DicomError) as e:
        load_image_np(path, 1, 28)
    msg = str(e.value)
    assert isinstance(e.value, ImageError) and "\n" not in msg and msg.startswith(path), msg
    assert all(f in msg for f in fragments), msg
    with open(path, "rb") as f:
        data = f.read()
    if from_header:  # the header alone tells, with the same words: the server refuses before decoding
        with pytest.raises(DicomError) as h:
            image_size(data, path)
        assert str(h.value) == msg
    else:
        assert image_size(data, path) == (256, 1024)


def test_huge_dimensions_are_refused_from_the_header(tmp_path):
    ds = read("MR_small.dcm")
    ds.Rows = ds.Columns = 60000  # 3.6 G pixels declared, 8 KB of pixel data
    ds.save_as(tmp_path / "bomb.dcm")
    assert image_size((tmp_path / "bomb.dcm").read_bytes(), "bomb.dcm") == (60000, 60000)
    with pytest.raises(ImageTooLarge, match="60000x60000 pixels is more than the limit"):
        load_image_np(tmp_path / "bomb.dcm", 1)


def test_deflate_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    ds = read("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    monkeypatch.setattr(imaging, "_DICOM_INFLATE_LIMIT", 4096)  # the 8 KB of pixels inflate past it
    for call in (lambda d: image_size(d, "x.dcm"), lambda d: load_image_np(d, 1)):
        with pytest.raises(ImageTooLarge, match="inflates to more than 4,096 bytes"):
            call((tmp_path / "deflated.dcm").read_bytes())
    data = bytearray((tmp_path / "deflated.dcm").read_bytes())
    data[-200:] = zlib.compress(b"x" * 10)[:1] * 200  # damaged deflate stream
    monkeypatch.setattr(imaging, "_DICOM_INFLATE_LIMIT", 1 << 30)
    with pytest.raises(ImageError):
        load_image_np(bytes(data), 1)


FUZZ_SEEDS = ("MR_small.dcm", "CT_small.dcm", "SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(FUZZ_SEEDS), channels=st.sampled_from([1, 3]),
       edits=st.lists(st.tuples(st.sampled_from(["set", "cut", "insert"]), st.floats(0, 0.999),
                                st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
def test_fuzz_mutated_dicom(seed, channels, edits):
    """DICOM files with bytes overwritten, cut or inserted (header, file meta, pixels): an image of the requested
    shape or ImageError, never another exception, and no warning escapes (the CLI's stderr is one line)."""
    b = bytearray(open(dcm_file(seed), "rb").read())
    for op, where, chunk in edits:
        i = int(where * len(b))
        if op == "set":
            b[i:i + len(chunk)] = chunk
        elif op == "cut":
            del b[max(i, 140):]  # keep the 'DICM' marker: the DICOM path is the one fuzzed
        else:
            b[i:i] = chunk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image_size(bytes(b), "x.dcm")
            x = load_image_np(bytes(b), channels, 16, name="x.dcm")
        except ImageError:
            x = None
    assert not caught, [str(w.message) for w in caught]
    if x is not None:
        assert x.dtype == np.uint8 and x.shape == (channels, 16, 16)


# ----------------------------------------------------------------------------------------------- class folders, CLI
def _dicom_variant(src: str, path, k: int, side: int = 32, monochrome1: bool = False) -> None:
    """A 32x32 copy of a test file, flipped / shifted / noised by ``k`` so that the copies differ."""
    ds = pydicom.dcmread(src)
    a = ds.pixel_array
    step = a.shape[0] // side
    a = np.roll(a[::step, ::step][:side, :side], 3 * k, axis=1)
    a = (a + np.random.default_rng(k).integers(0, 20, a.shape)).astype(a.dtype)
    ds.Rows, ds.Columns, ds.PixelData = side, side, np.ascontiguousarray(a[:, ::-1] if k % 2 else a).tobytes()
    if monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path)


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory):
    """Two classes of six DICOM copies (CT_small / MR_small variants, one MONOCHROME1) and two PNGs each."""
    root = tmp_path_factory.mktemp("dicom") / "tree"
    for k, (cls, src) in enumerate((("ct", "CT_small.dcm"), ("mr", "MR_small.dcm"))):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            _dicom_variant(dcm_file(src), root / cls / f"{cls}_{i}.dcm", i, monochrome1=cls == "mr" and i == 5)
        for i, a in enumerate(class_images(np.full(2, k), 32, 1, seed=k)):
            Image.fromarray(a).save(root / cls / f"png_{i}.png")
    return root


@pytest.fixture(scope="module")
def dicom_run(dicom_tree, tmp_path_factory):
    """``medmix train`` for one epoch on the mixed DICOM/PNG class folders: (exit code, stdout, stderr, run dir)."""
    out_dir = tmp_path_factory.mktemp("runs") / "dicom"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", "--dataset", str(dicom_tree), "--epochs", "1", "--batch-size", "4", "--precision",
                   "fp32", "--seed", "0", "--out", str(out_dir), "--json"])
    return rc, out.getvalue(), err.getvalue(), out_dir


def test_class_folders_of_dicom_and_png(dicom_tree):
    images, labels, classes = read_class_folders(dicom_tree)
    assert classes == ["ct", "mr"] and images.shape == (16, 1, 32, 32) and np.bincount(labels).tolist() == [8, 8]
    files = sorted(p for c in classes for p in (dicom_tree / c).iterdir())  # the order read_class_folders keeps
    i = files.index(dicom_tree / "mr" / "mr_5.dcm")
    np.testing.assert_array_equal(images[i].numpy(), load_image_np(dicom_tree / "mr" / "mr_5.dcm", 1, 32))
    assert images[i].float().std() > 10


def test_class_folder_probe_reads_dicom_headers(tmp_path):
    """Channels and size come from the DICOM headers: three 100x100 RGB DICOMs outvote two 16 px grey PNGs."""
    for i in range(3):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"rgb_{i}.dcm").write_bytes(open(dcm_file("SC_rgb_rle.dcm"), "rb").read())
        (tmp_path / "b").mkdir(exist_ok=True)
    for i in range(2):
        Image.fromarray(np.full((16, 16), 50 * i, np.uint8)).save(tmp_path / "b" / f"g_{i}.png")
    images, _, _ = read_class_folders(tmp_path)
    assert images.shape == (5, 3, 100, 100)
    np.testing.assert_array_equal(images[0].numpy(), read("SC_rgb_rle.dcm").pixel_array.transpose(2, 0, 1))


def test_train_on_dicom_class_folders(dicom_run):
    rc, out, err, out_dir = dicom_run
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["test"]["n"] >= 2 and (out_dir / "best_model.pth").is_file()


def test_cli_predict_and_explain_a_dicom_file(dicom_run, tmp_path, capsys):
    run_dir = dicom_run[3]
    assert main(["predict", str(run_dir), dcm_file("CT_small.dcm"), "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["label"] in ("ct", "mr") and set(r["probabilities"]) == {"ct", "mr"}
    assert main(["explain", str(run_dir), dcm_file("MR_small.dcm"), "--out", str(tmp_path / "cams")]) == 0
    capsys.readouterr()
    (png,) = (tmp_path / "cams").iterdir()
    assert png.name.startswith("MR_small") and Image.open(png).size[0] > 32


@pytest.mark.parametrize("name,fragment", [("rtplan.dcm", "no pixel data"), ("rtdose.dcm", "15 frames")])
def test_cli_refuses_with_one_error_line(dicom_run, capsys, name, fragment):
    assert main(["predict", str(dicom_run[3]), dcm_file(name)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("medmix: error: ") and fragment in lines[0], err


# ----------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def client(dicom_run):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from medmix.serve.app import create_app

    with TestClient(create_app(dicom_run[3])) as c:
        yield c


def test_server_accepts_dicom_uploads(client):
    with open(dcm_file("CT_small.dcm"), "rb") as f:
        data = f.read()
    answers = []
    for name in ("CT_small.dcm", "upload"):  # by suffix, and by the DICM marker alone
        r = client.post("/v1/predict", files={"files": (name, data, "application/dicom")})
        assert r.status_code == 200, r.text
        (p,) = r.json()["predictions"]
        answers.append(p["probabilities"])
    assert answers[0] == answers[1] and set(answers[0]) == {"ct", "mr"}
    r = client.post("/v1/explain", files={"files": ("CT_small.dcm", data, "application/dicom")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.parametrize("name,fragment", [("rtplan.dcm", "no pixel data"), ("SC_rgb_rle_2frame.dcm", "2 frames")])
def test_server_refuses_dicom_without_an_image(client, name, fragment):
    with open(dcm_file(name), "rb") as f:
        r = client.post("/v1/predict", files={"files": (name, f.read(), "application/dicom")})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_image" and fragment in r.json()["detail"], r.text
