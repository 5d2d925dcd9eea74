"""The bad-input corpus: odd and broken files through ``train``, ``evaluate``, ``predict``, ``explain`` and the Python
API. Each kind has one documented handling:

* **converted** (the command succeeds): 16-bit, RGBA (composited on black), palette, 1x1 and very large (up to
  ``MAX_PIXELS`` = 50 M pixels) images, EXIF-rotated JPEGs (rotation applied), colour images for a grayscale model
  and arrays in (C, H, W) / (H, W, 4) layout;
* **refused** with one line ``medmix: error: ...`` on stderr and exit code 2, nothing on stdout, no traceback and
  no output file or directory left behind: everything else below.

Cases already in ``test_cli.py`` (unknown names, missing/corrupt/wrong-key npz files, labels out of range,
undecodable folder image, missing/garbage/truncated checkpoints for predict/evaluate, missing image, directory as
an image for predict) and in ``test_checkpoint.py`` (crafted pickle, other format version via the API) are not
repeated; this corpus adds the other kinds and surfaces. The decoder is also fuzzed (hypothesis) with random bytes
and mutations of valid images: it returns an image or raises ``ImageError``, never anything else.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import write_class_folders, write_official_npz, write_packed_npz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medmix import Predictor
from medmix.checkpoint import FORMAT
from medmix.cli import main
from medmix.data import load_dataset
from medmix.data.images import MAX_PIXELS, load_image
from medmix.errors import DataError, ImageError


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch):
    import medmix.inference

    monkeypatch.setattr(medmix.inference, "set_threads", lambda: None)


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(argv, capsys, fragment: str) -> str:
    """The command fails with exactly one ``medmix: error:`` line naming ``fragment``, exit 2, empty stdout."""
    rc, out, err = run(argv, capsys)
    assert rc == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medmix: error: "), err
    assert fragment in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------- files
def png_bytes(width: int, height: int, idat_rows: int | None = None) -> bytes:
    """An 8-bit grayscale PNG of zeros, written chunk by chunk (no pixel buffer: cheap even for 10000x10000).
    ``idat_rows`` < height makes a small file that *declares* a huge image (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(z.compress(row) for _ in range(height if idat_rows is None else idat_rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


GRADIENT = np.add.outer(np.arange(24), np.arange(32)).astype(np.uint8) * 4  # (24, 32), every pixel distinct-ish
NOISE = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible: ~4 kB as PNG


@pytest.fixture
def files(tmp_path):
    """Every bad or odd image of the corpus, by kind."""
    d = tmp_path / "in"
    d.mkdir()
    rgb = np.stack([GRADIENT, 255 - GRADIENT, np.full_like(GRADIENT, 90)], -1)
    made = {
        "zero_byte.png": b"",
        "truncated.png": encode(Image.fromarray(NOISE))[:1500],  # cut inside the pixel data
        "truncated.jpg": encode(Image.fromarray(rgb), "JPEG")[:200],
        "text.png": b"this is a text file with a .png name\n" * 4,
        "huge_10000x10000.png": png_bytes(10_000, 10_000),
        "bomb.png": png_bytes(100_000, 100_000, idat_rows=1),
        "one_pixel.png": encode(Image.fromarray(np.array([[200]], np.uint8))),
        "rgb.png": encode(Image.fromarray(rgb)),
    }
    for name, data in made.items():
        (d / name).write_bytes(data)
    Image.fromarray(GRADIENT.astype(np.uint16) * 200 + 1000).save(d / "sixteen_bit.png")
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 16:, 3] = 255  # left half fully transparent (white under alpha 0), right half opaque white
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(d / "palette.png")
    np.save(d / "complex.npy", np.zeros((28, 28), np.complex64))
    np.save(d / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(d / "object.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "four_d.npy", np.zeros((2, 3, 28, 28), np.uint8))
    np.save(d / "two_channel.npy", np.zeros((28, 28, 2), np.uint8))
    np.save(d / "one_d.npy", np.zeros(784, np.uint8))
    nan = np.ones((28, 28), np.float32)
    nan[3, 4] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "inf.npy", np.full((28, 28), np.inf, np.float64))
    np.save(d / "chw_rgb.npy", rgb.transpose(2, 0, 1).copy())
    (d / "a_directory.png").mkdir()
    return {p.name: p for p in d.iterdir()}


# ----------------------------------------------------------------------------------------------- converted
def test_converted_inputs_decode_like_training_data(files):
    """The Python API side of the conversions, checked pixel by pixel."""
    x = load_image(files["sixteen_bit.png"], 1)  # 16-bit: the value range stretched to 0..255
    assert x.dtype == torch.uint8 and x.shape == (1, 24, 32) and int(x.min()) == 0 and int(x.max()) == 255
    assert torch.equal(x[0].argsort(dim=1), torch.from_numpy(GRADIENT).long().argsort(dim=1))  # order kept

    x = load_image(files["rgba.png"], 1)  # alpha composited on black
    assert int(x[0, :, :16].max()) == 0 and int(x[0, :, 16:].min()) == 255

    with Image.open(files["palette.png"]) as im:
        assert im.mode == "P"
        expected = np.asarray(im.convert("RGB").convert("L"))
    assert np.array_equal(load_image(files["palette.png"], 1)[0].numpy(), expected)
    assert load_image(files["palette.png"], 3).shape == (3, 24, 32)

    one = load_image(files["one_pixel.png"], 1, 28)  # 1x1: enlarged to the model's size
    assert one.shape == (1, 28, 28) and int(one.min()) == int(one.max()) == 200

    gray = load_image(files["rgb.png"], 1)  # a colour image for a grayscale model: converted to L
    with Image.open(files["rgb.png"]) as im:
        assert np.array_equal(gray[0].numpy(), np.asarray(im.convert("L")))
    assert torch.equal(load_image(files["chw_rgb.npy"], 3), load_image(files["rgb.png"], 3))  # (C, H, W) arrays
    rgba_array = np.dstack([np.asarray(Image.open(files["rgb.png"])), np.full((24, 32), 255, np.uint8)])
    assert torch.equal(load_image(rgba_array, 3), load_image(files["rgb.png"], 3))  # 4 channels, opaque


def test_exif_rotation_is_applied(tmp_path):
    """A camera JPEG stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to display"): the
    marker drawn in the stored top-left corner must end up top-right."""
    a = np.full((20, 40), 30, np.uint8)  # stored 40 wide, 20 high
    a[:6, :6] = 250  # marker, top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    Image.fromarray(a).save(path, quality=95, exif=exif.tobytes())
    x = load_image(path, 1)[0].numpy()
    assert x.shape == (40, 20)  # displayed 20 wide, 40 high
    assert x[:6, -6:].mean() > 200 and x[:6, :6].mean() < 80 and x[-6:, -6:].mean() < 80


def test_largest_allowed_image_is_converted():
    """7000x7000 = 49 M pixels, just under MAX_PIXELS: decoded and shrunk (area average) to the model size."""
    assert 7000 * 7000 <= MAX_PIXELS < 10_000 * 10_000
    x = load_image(png_bytes(7000, 7000), 1, 28)
    assert x.shape == (1, 28, 28) and int(x.max()) == 0


def test_converted_inputs_through_predict_and_explain(trained_run, files, tmp_path, capsys):
    names = ["sixteen_bit.png", "rgba.png", "palette.png", "one_pixel.png", "rgb.png", "chw_rgb.npy"]
    rc, out, err = run(["predict", trained_run.run_dir, *[files[n] for n in names], "--json"], capsys)
    assert rc == 0, err
    assert [r["file"] for r in json.loads(out)] == [str(files[n]) for n in names]
    rc, out, err = run(["explain", trained_run.run_dir, files["one_pixel.png"], files["rgba.png"], "--out",
                        tmp_path / "cams", "--json"], capsys)
    assert rc == 0, err
    pngs = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert len(pngs) == 2 and pngs[0].startswith("one_pixel_") and pngs[1].startswith("rgba_"), pngs


def test_odd_images_in_class_folders_are_converted_for_training(tmp_path, capsys):
    """``train`` on a class-folder tree whose files mix 16-bit, RGBA, palette, 1x1 and colour images."""
    root = write_class_folders(tmp_path / "folders", counts=(6, 6), side=16, classes=("a", "b"))
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(root / "a" / "x16.png")
    Image.fromarray(np.full((16, 16, 4), 200, np.uint8), "RGBA").save(root / "a" / "xrgba.png")
    Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).convert("P").save(root / "b" / "xpal.png")
    Image.fromarray(np.array([[7]], np.uint8)).save(root / "b" / "x1.png")
    (root / "b" / "notes.txt").write_text("not an image, not an image suffix: ignored")
    rc, out, err = run(["train", "--dataset", root, "--epochs", "1", "--batch-size", "4", "--precision", "fp32",
                        "--out", tmp_path / "run", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["test"]["n"] >= 2


# ----------------------------------------------------------------------------------------------- refused images
@pytest.mark.parametrize("name,fragment", [
    ("zero_byte.png", "empty"),
    ("truncated.png", "not a readable image"),
    ("text.png", "not a readable image"),
    ("huge_10000x10000.png", "10000x10000 pixels is more than the limit of 50,000,000"),
    ("bomb.png", "decompression bomb"),
    ("complex.npy", "unsupported array dtype"),
    ("strings.npy", "unsupported array dtype"),
    ("object.npy", "not a valid .npy array"),  # a pickled array is never unpickled
    ("four_d.npy", "expected an array of shape"),
    ("two_channel.npy", "expected an array of shape"),
    ("one_d.npy", "expected an array of shape"),
    ("nan.npy", "NaN or infinite"),
    ("inf.npy", "NaN or infinite"),
])
def test_refused_images_predict(trained_run, files, capsys, name, fragment):
    line = refused(["predict", trained_run.run_dir, files["rgb.png"], files[name]], capsys, fragment)
    assert name in line  # the message names the file (the good image before it produced no output either)


@pytest.mark.parametrize("name,fragment", [("truncated.jpg", "not a readable image"),
                                           ("a_directory.png", "is a directory"),
                                           ("bomb.png", "decompression bomb")])
def test_refused_images_explain_write_nothing(trained_run, files, tmp_path, capsys, name, fragment):
    out = tmp_path / "cams"
    refused(["explain", trained_run.run_dir, files["rgb.png"], files[name], "--out", out], capsys, fragment)
    assert not out.exists()  # no directory, no panel for the good image either


@pytest.mark.parametrize("name", ["zero_byte.png", "truncated.jpg", "bomb.png", "nan.npy", "two_channel.npy"])
def test_refused_images_python_api(trained_run, files, name):
    with pytest.raises(ImageError, match=name.replace(".", r"\.")):
        Predictor(trained_run.run_dir).predict([files[name]])
    with pytest.raises(ImageError):
        load_image(files[name].read_bytes(), 1)  # the same bytes from memory


def test_python_api_input_types(trained_run, files):
    p = Predictor(trained_run.run_dir)
    (r,) = p.predict(str(files["rgb.png"]))  # one path, not an iterable of its characters
    assert r["file"] == str(files["rgb.png"])
    assert len(p.predict(Image.open(files["rgb.png"]))) == 1
    with pytest.raises(ImageError, match="expected a file path"):
        p.predict([None])


# ----------------------------------------------------------------------------------------------- unreadable
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode (see the simulated case)")
def test_unreadable_image_chmod_000(trained_run, files, capsys):
    path = files["rgb.png"]
    path.chmod(0)
    try:
        refused(["predict", trained_run.run_dir, path], capsys, "cannot read")
    finally:
        path.chmod(0o644)


def test_unreadable_files_simulated(trained_run, files, tmp_path, monkeypatch, capsys):
    """Permission denied, as a non-root user would get it for a chmod 000 file (root cannot be denied, so the
    error is injected): an image, an image inside a class folder, and a checkpoint."""
    import pathlib

    import medmix.checkpoint

    denied = {str(files["rgb.png"]), str(tmp_path / "folders" / "a" / "img_002.png")}
    real_read = pathlib.Path.read_bytes

    def read_bytes(self):
        if str(self) in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    refused(["predict", trained_run.run_dir, files["rgb.png"]], capsys, "Permission denied")
    root = write_class_folders(tmp_path / "folders", counts=(5, 5), side=16, classes=("a", "b"))
    refused(["train", "--dataset", root, "--out", tmp_path / "run"], capsys, "img_002.png")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()

    ckpt = trained_run.run_dir / "best_model.pth"

    def deny(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(medmix.checkpoint, "open", deny, raising=False)
    line = refused(["predict", ckpt, files["one_pixel.png"]], capsys, "cannot read the checkpoint")
    assert "Permission denied" in line


# ----------------------------------------------------------------------------------------------- data for train
def data_case(d, case: str) -> tuple[list, str]:
    if case == "official_missing_one_key":
        arrays = write_official_npz(d / "breastmnist.npz", 2)
        del arrays["test_labels"]
        np.savez(d / "breastmnist.npz", **arrays)
        return ["--dataset", "breastmnist", "--data-dir", d], "test_labels"
    if case == "multilabel_value_2":
        arrays = write_official_npz(d / "chestmnist.npz", 14, multi_label=True)
        arrays["train_labels"][0, 3] = 2
        np.savez(d / "chestmnist.npz", **arrays)
        return ["--dataset", d / "chestmnist.npz"], "0 or 1"
    if case == "empty_val_split":
        arrays = write_official_npz(d / "pneumoniamnist.npz", 2)
        arrays["val_images"], arrays["val_labels"] = arrays["val_images"][:0], arrays["val_labels"][:0]
        np.savez(d / "pneumoniamnist.npz", **arrays)
        return ["--dataset", "pneumoniamnist", "--data-dir", d], "val split is empty"
    if case == "too_few_images_to_split":
        np.savez(d / "two.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, 1]),
                 classes=np.array(["a", "b"]))
        return ["--dataset", d / "two.npz"], "cannot split"
    if case == "packed_float_images":
        arrays = write_packed_npz(d / "packed.npz")
        np.savez(d / "packed.npz", **{**arrays, "images": arrays["images"].astype(np.float32)})
        return ["--dataset", d / "packed.npz"], "uint8"
    if case == "packed_images_wrong_shape":
        np.savez(d / "packed.npz", images=np.zeros((30, 8, 8, 5), np.uint8), labels=np.arange(30) % 2,
                 classes=np.array(["a", "b"]))
        return ["--dataset", d / "packed.npz"], "(N, H, W, 3)"
    if case == "class_folder_without_images":
        root = write_class_folders(d / "folders", counts=(4, 4), side=16, classes=("a", "b"))
        (root / "c").mkdir()
        (root / "c" / "readme.txt").write_text("no images here")
        return ["--dataset", root], "class folder has no images"
    if case == "npz_name_is_a_directory":
        (d / "data.npz").mkdir()
        return ["--dataset", d / "data.npz"], "sub-folder per class"
    if case == "out_is_a_file":
        write_packed_npz(d / "packed.npz")
        (d / "taken").write_text("a file")
        return ["--dataset", d / "packed.npz", "--out", d / "taken"], "not a directory"
    raise AssertionError(case)


DATA_CASES = ["official_missing_one_key", "multilabel_value_2", "empty_val_split", "too_few_images_to_split",
              "packed_float_images", "packed_images_wrong_shape", "class_folder_without_images",
              "npz_name_is_a_directory", "out_is_a_file"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_refused_training_data(tmp_path, capsys, case):
    d = tmp_path / "d"
    d.mkdir()
    args, fragment = data_case(d, case)
    out = tmp_path / "run"
    if "--out" not in args:
        args += ["--out", out]
    refused(["train", *args, "--epochs", "1"], capsys, fragment)
    assert not out.exists() and not out.with_name("run.partial").exists()


@pytest.mark.parametrize("case", ["multilabel_value_2", "empty_val_split", "class_folder_without_images"])
def test_refused_training_data_python_api(tmp_path, case):
    d = tmp_path / "d"
    d.mkdir()
    args, fragment = data_case(d, case)
    opts = dict(zip(args[::2], args[1::2]))
    with pytest.raises(DataError, match=fragment):
        load_dataset(str(opts["--dataset"]), data_dir=opts.get("--data-dir"))


# ----------------------------------------------------------------------------------------------- checkpoints
class _Payload:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture
def bad_checkpoints(trained_run, tmp_path):
    good = trained_run.run_dir / "best_model.pth"
    payload = torch.load(good, weights_only=True)
    made = {}
    made["other_version"] = tmp_path / "v99.pth"
    torch.save({**payload, "medmix_format": FORMAT + 98}, made["other_version"])
    made["truncated"] = tmp_path / "truncated.pth"
    made["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    made["weights_do_not_fit"] = tmp_path / "misfit.pth"
    meta = json.loads(payload["meta"])
    meta["model_kwargs"] = {**meta["model_kwargs"], "num_classes": 5}
    torch.save({**payload, "meta": json.dumps(meta)}, made["weights_do_not_fit"])
    made["crafted_pickle"] = tmp_path / "evil.pth"
    torch.save({**payload, "x": _Payload(tmp_path / "pwned")}, made["crafted_pickle"])
    made["raw_pickle"] = tmp_path / "raw.pth"
    made["raw_pickle"].write_bytes(pickle.dumps({"medmix_format": FORMAT, "x": _Payload(tmp_path / "pwned")}))
    flipped = bytearray(good.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10  # one bit inside the weights: torch alone would load it silently
    made["bit_flip"] = tmp_path / "flipped.pth"
    made["bit_flip"].write_bytes(bytes(flipped))
    made["a_file_that_is_a_png"] = tmp_path / "model.pth"
    made["a_file_that_is_a_png"].write_bytes(encode(Image.fromarray(GRADIENT)))
    return made


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case,fragment", [
    ("other_version", "format 99"), ("truncated", "not a readable checkpoint"),
    ("weights_do_not_fit", "do not fit"), ("crafted_pickle", "refused"), ("raw_pickle", "refused"),
    ("a_file_that_is_a_png", "not a readable checkpoint"), ("bit_flip", "checksum mismatch"),
])
@pytest.mark.parametrize("command", ["predict", "explain", "evaluate"])
def test_refused_checkpoints(bad_checkpoints, files, tmp_path, capsys, case, fragment, command):
    ckpt = bad_checkpoints[case]
    argv = {"predict": ["predict", ckpt, files["rgb.png"]],
            "explain": ["explain", ckpt, files["rgb.png"], "--out", tmp_path / "cams"],
            "evaluate": ["evaluate", ckpt, "--out", tmp_path / "cams"]}[command]
    refused(argv, capsys, fragment)
    assert not (tmp_path / "pwned").exists()  # nothing ran
    assert not (tmp_path / "cams").exists()


def test_resume_from_a_damaged_checkpoint(trained_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run_dir)
    last = run_dir / "last.pth"
    last.write_bytes(last.read_bytes()[:1000])
    refused(["train", "--resume", run_dir, "--epochs", "3"], capsys, "last.pth")
    assert not (tmp_path / "run.partial").exists()


# ----------------------------------------------------------------------------------------------- directories
def test_directories_and_files_in_each_others_place(trained_run, files, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    refused(["explain", trained_run.run_dir, files["rgb.png"], "--out", tmp_path / "a_file"], capsys,
            "not a directory")
    refused(["evaluate", trained_run.run_dir, "--out", tmp_path / "a_file"], capsys, "not a directory")
    refused(["predict", files["a_directory.png"], files["rgb.png"]], capsys, "best_model.pth")
    assert (tmp_path / "a_file").read_text() == "x"


# ----------------------------------------------------------------------------------------------- fuzzing
def _seeds() -> list[bytes]:
    rgb = np.stack([GRADIENT, 255 - GRADIENT, np.full_like(GRADIENT, 90)], -1)[:12, :10]
    im = Image.fromarray(rgb)
    out = [encode(im), encode(im.convert("L")), encode(im.convert("P")), encode(im.convert("RGBA")),
           encode(Image.fromarray(GRADIENT[:12, :10].astype(np.uint16) * 250)), encode(im, "JPEG"),
           encode(im, "TIFF"), encode(im, "TIFF", compression="tiff_lzw"), encode(im.convert("P"), "GIF"),
           encode(im, "BMP"), encode(im, "WEBP")]
    return out


SEEDS = _seeds()


def _decode_or_image_error(data: bytes, channels: int) -> None:
    """An image of the requested shape or ImageError; and no warning escapes (the CLI's stderr is one line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            x = load_image(data, channels, 16)
        except ImageError:
            x = None
    assert not caught, [str(w.message) for w in caught]
    if x is not None:
        assert x.dtype == torch.uint8 and x.shape == (channels, 16, 16)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048), channels=st.sampled_from([1, 3]))
def test_fuzz_random_bytes(data, channels):
    _decode_or_image_error(data, channels)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(range(len(SEEDS))), channels=st.sampled_from([1, 3]),
       edits=st.lists(st.tuples(st.sampled_from(["set", "cut", "insert"]), st.floats(0, 1), st.binary(min_size=1,
                                                                                                  max_size=8)),
                      min_size=1, max_size=6))
def test_fuzz_mutated_images(seed, channels, edits):
    """Valid PNG/JPEG/TIFF/GIF/BMP/WebP files with bytes overwritten, cut or inserted (headers included)."""
    b = bytearray(SEEDS[seed])
    for op, where, chunk in edits:
        i = int(where * len(b))
        if op == "set":
            b[i:i + len(chunk)] = chunk
        elif op == "cut":
            del b[i:]
        else:
            b[i:i] = chunk
    _decode_or_image_error(bytes(b), channels)


# ----------------------------------------------------------------------------------------------- option values
@pytest.mark.parametrize("args, fragment", [
    (["--lr", "-1"], "--lr must be in (0, 10]"),
    (["--lr", "nan"], "--lr must be in (0, 10]"),
    (["--img-size", "0"], "--img-size must be a positive integer"),
    (["--weight-decay", "-0.1"], "--weight-decay must be in [0, inf)"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--drop-rate", "1.5"], "--drop-rate must be in [0, 1)"),
    (["--drop-path-rate", "-0.1"], "--drop-path-rate must be in [0, 1)"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be in [0, inf)"),
    (["--patience", "0"], "--patience must be an integer of at least 1"),
    (["--epochs", "0"], "--epochs must be an integer of at least 1"),
    (["--batch-size", "-4"], "--batch-size must be an integer of at least 1"),
    (["--loss", "ordinal", "--alpha", "2"], "--alpha must be in [0, 1]"),
    (["--margin", "-1"], "--margin must be in [0, inf)"),
])
def test_refused_training_options(tmp_path, capsys, args, fragment):
    out = tmp_path / "run"
    refused(["train", "--dataset", "breastmnist", "--out", out, *args], capsys, fragment)
    assert not list(tmp_path.iterdir())  # nothing written, not even the .partial directory


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "-1"], "--lr must be in (0, 10]"),
    (["--img-size", "0"], "--img-size must be a positive integer"),
])
def test_refused_generalist_options(tmp_path, capsys, args, fragment):
    refused(["train", "--dataset", "breastmnist,pneumoniamnist", "--out", tmp_path / "g", *args], capsys, fragment)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, fragment", [
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-k", "-1"], "--top-k must be at least 1"),
    (["--threshold", "2"], "--threshold must be in [0, 1]"),
])
def test_refused_predict_options(trained_run, files, capsys, args, fragment):
    refused(["predict", trained_run.run_dir, files["rgb.png"], *args], capsys, fragment)


def test_refused_explain_top_k(trained_run, files, tmp_path, capsys):
    refused(["explain", trained_run.run_dir, files["rgb.png"], "--out", tmp_path / "cams", "--top-k", "0"], capsys,
            "--top-k must be at least 1")
    assert not (tmp_path / "cams").exists()


# ----------------------------------------------------------------------------------------------- unwritable outputs
def _unwritable(tmp_path) -> dict[str, str]:
    """Paths no command can create: under /proc (a kernel file system) and under a regular file."""
    (tmp_path / "a_file").write_text("x")
    return {"proc": "/proc/medmix-test/out", "under_file": str(tmp_path / "a_file" / "sub" / "out")}


@pytest.mark.parametrize("where", ["proc", "under_file"])
def test_unwritable_outputs_are_refused_before_any_work(trained_run, files, tmp_path, capsys, where):
    bad = _unwritable(tmp_path)[where]
    before = sorted(p.name for p in tmp_path.iterdir())
    why = "cannot write in /proc" if where == "proc" else "is a file, not a directory"
    refused(["train", "--dataset", "breastmnist", "--epochs", "1", "--out", bad], capsys, why)
    refused(["train", "--dataset", "breastmnist,pneumoniamnist", "--epochs", "1", "--out", bad], capsys, why)
    refused(["quickstart", "--out", bad], capsys, why)
    refused(["explain", trained_run.run_dir, files["rgb.png"], "--out", bad], capsys, why)
    refused(["evaluate", trained_run.run_dir, "--out", bad], capsys, why)
    refused(["evaluate", trained_run.run_dir, "--report", bad], capsys, why)
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    refused(["export", trained_run.run_dir, "--onnx", bad + ".onnx"], capsys, why)
    assert (tmp_path / "a_file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_export_refuses_a_directory_and_a_bad_opset(trained_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    refused(["export", trained_run.run_dir, "--onnx", tmp_path], capsys, "is a directory")
    refused(["export", trained_run.run_dir, "--onnx", tmp_path / "m.onnx", "--opset", "5"], capsys,
            "opset 5 is not supported")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- ports
@pytest.mark.parametrize("args, fragment", [
    (["--port", "99999"], "--port must be 1..65535"),
    (["--port", "0"], "--port must be 1..65535"),
    (["--port", "-5"], "--port must be 1..65535"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid'"),
    (["--host", "192.0.2.1"], "--host 192.0.2.1: not an address of this machine"),
    (["--max-upload-mb", "0"], "--max-upload-mb must be positive"),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be positive"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_refused_serve_options(trained_run, capsys, args, fragment):
    pytest.importorskip("fastapi")
    refused(["serve", trained_run.run_dir, *args], capsys, fragment)


def test_serve_on_a_busy_port_says_so_before_loading_the_model(tmp_path, capsys):
    """One line, exit 2, and no model is loaded (the checkpoint here does not even exist)."""
    import socket

    pytest.importorskip("fastapi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        refused(["serve", tmp_path / "nothing-here", "--port", port], capsys, f"port {port} on 127.0.0.1 is already "
                                                                            "in use")


# ----------------------------------------------------------------------------------------------- missing extras
@pytest.mark.parametrize("module, argv_tail, extra", [
    ("fastapi", ["serve"], "serve"),
    ("uvicorn", ["serve"], "serve"),
    ("onnxruntime", ["serve", "--backend", "onnx"], "onnx"),
    ("onnx", ["export", "--onnx", "m.onnx"], "onnx"),
])
def test_a_missing_extra_names_the_install_command(trained_run, tmp_path, monkeypatch, capsys, module, argv_tail,
                                                   extra):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError, as when not installed
    monkeypatch.chdir(tmp_path)
    cmd, *rest = argv_tail
    line = refused([cmd, trained_run.run_dir, *rest], capsys, f'pip install "medmix[{extra}]"')
    assert f"the '{extra}' extra" in line and 'pip install -e ".[' in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--size", "33"], "argument --size: invalid choice: 33"),
    (["train", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["serve", "run", "--port", "http"], "argument --port: invalid int value: 'http'"),
    (["predict"], "the following arguments are required: checkpoint, images"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
])
def test_argument_errors_are_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medmix: error: ") and fragment in lines[0], err


def test_quickstart_refuses_bad_epochs_before_printing(tmp_path, capsys):
    refused(["quickstart", "--epochs", "0", "--out", tmp_path / "qs"], capsys, "--epochs must be an integer")
    assert not (tmp_path / "qs").exists()
