"""Data layer: every source (official npz, class folders, packed npz), medmnist.INFO-derived task facts, file
naming and lookup, the stratified reproducible 70/15/15 split and the batched transforms."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import shared_file, write_class_folders, write_official_npz, write_packed_npz
from medmnist import INFO

from medmix.data import AugmentConfig, BatchTransform, dataset_spec, list_datasets, load_dataset
from medmix.data import medmnist as mm
from medmix.data.folders import load_split, make_split, save_split
from medmix.data.tasks import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL
from medmix.errors import ConfigError, DataError, UnknownNameError


def info_names(flag: str) -> tuple[str, ...]:
    labels = INFO[flag]["label"]
    return tuple(labels[str(i)] for i in range(len(labels)))


def check_official(bundle, flag: str, n_samples: dict | None = None) -> None:
    """Shapes, dtypes and task facts of an official-layout bundle agree with medmnist.INFO."""
    assert bundle.name == flag
    assert bundle.info.task == INFO[flag]["task"]
    assert bundle.info.class_names == info_names(flag)
    assert bundle.info.n_channels == int(INFO[flag]["n_channels"])
    for split in ("train", "val", "test"):
        s = bundle.splits[split]
        assert s.images.dtype == torch.uint8 and s.images.ndim == 4
        assert s.images.shape[1] == bundle.info.n_channels
        if n_samples is not None:
            assert len(s) == n_samples[split]
        if bundle.info.task == MULTI_LABEL:
            assert s.labels.dtype == torch.float32 and s.labels.shape == (len(s), bundle.info.num_classes)
        else:
            assert s.labels.dtype == torch.int64 and s.labels.shape == (len(s),)
            assert 0 <= int(s.labels.min()) and int(s.labels.max()) < bundle.info.num_classes


# ----------------------------------------------------------------------------------------------- official npz
def test_embedded_breastmnist_is_the_official_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMIX_DATA", str(tmp_path / "empty"))  # nothing there: the embedded copy is the fallback
    bundle = load_dataset("breastmnist")
    assert bundle.source["path"] == str(mm.ASSETS / "breastmnist.npz")
    check_official(bundle, "breastmnist", INFO["breastmnist"]["n_samples"])
    assert bundle.info.task == BINARY and bundle.image_size == 28
    assert hashlib.md5((mm.ASSETS / "breastmnist.npz").read_bytes()).hexdigest() == INFO["breastmnist"]["MD5"]
    # the class balance of the real file (train: 147 malignant, 399 normal/benign)
    assert torch.bincount(bundle.splits["train"].labels).tolist() == [147, 399]


def test_real_pneumoniamnist():
    path = shared_file("pneumoniamnist.npz")
    bundle = load_dataset("pneumoniamnist", data_dir=path.parent)
    check_official(bundle, "pneumoniamnist", INFO["pneumoniamnist"]["n_samples"])
    assert bundle.source == {"kind": "medmnist", "path": str(path), "size": 28}


def test_real_retinamnist_is_rgb_ordinal():
    path = shared_file("retinamnist.npz")
    bundle = load_dataset(str(path))  # an npz path named after its flag works like the name
    check_official(bundle, "retinamnist", INFO["retinamnist"]["n_samples"])
    assert bundle.info.task == ORDINAL and bundle.info.n_channels == 3 and bundle.info.num_classes == 5
    with np.load(path) as z:  # HWC on disk -> CHW in memory, pixels untouched
        assert torch.equal(bundle.splits["val"].images, torch.from_numpy(z["val_images"]).permute(0, 3, 1, 2))


@pytest.mark.parametrize("flag", mm.medmnist_flags())
def test_task_facts_come_from_medmnist_info(flag):
    info = mm.task_info(flag)
    assert info.task == INFO[flag]["task"]
    assert info.class_names == info_names(flag)
    assert info.n_channels == INFO[flag]["n_channels"]
    assert dataset_spec(flag).kind == "medmnist"


def test_every_2d_flag_is_known_and_3d_is_not():
    names = list_datasets()
    flags_2d = [f for f in INFO if not f.endswith("3d")]
    assert set(flags_2d) <= set(names) and "mednist" in names
    assert not [n for n in names if n.endswith("3d")]


def test_generated_multilabel_official_layout(chest_npz):
    path, arrays = chest_npz
    for bundle in (load_dataset(str(path)), load_dataset("chestmnist", data_dir=path.parent)):
        check_official(bundle, "chestmnist", {"train": 40, "val": 10, "test": 10})
        assert bundle.info.task == MULTI_LABEL and bundle.info.num_classes == 14
        assert torch.equal(bundle.splits["test"].labels, torch.from_numpy(arrays["test_labels"]).float())
        assert torch.equal(bundle.splits["train"].images[:, 0], torch.from_numpy(arrays["train_images"]))


def test_generated_rgb_official_layout(blood_npz):
    path, arrays = blood_npz
    bundle = load_dataset("bloodmnist", data_dir=path.parent)
    check_official(bundle, "bloodmnist", {"train": 48, "val": 16, "test": 16})
    assert bundle.info.task == MULTI_CLASS and bundle.info.n_channels == 3 and bundle.info.num_classes == 8
    assert bundle.splits["train"].images.shape == (48, 3, 28, 28)
    assert torch.equal(bundle.splits["train"].images, torch.from_numpy(arrays["train_images"]).permute(0, 3, 1, 2))
    assert torch.equal(bundle.splits["val"].labels, torch.from_numpy(arrays["val_labels"][:, 0]).long())
    mean, std = bundle.channel_stats()
    x = torch.from_numpy(arrays["train_images"]).double() / 255
    assert np.allclose(mean, x.mean((0, 1, 2)).numpy(), atol=1e-6)
    assert np.allclose(std, x.std((0, 1, 2), unbiased=False).numpy(), atol=1e-6)


def test_size_64_file_naming(tmp_path):
    d = tmp_path / "data"
    write_official_npz(d / "bloodmnist_64.npz", 8, sizes=(16, 8, 8), side=64, channels=3)
    assert mm.file_name("bloodmnist", 64) == "bloodmnist_64.npz" and mm.file_name("bloodmnist", 28) == "bloodmnist.npz"
    bundle = load_dataset("bloodmnist", data_dir=d, size=64)
    assert bundle.image_size == 64 and bundle.source["size"] == 64
    assert bundle.source["path"].endswith("bloodmnist_64.npz")
    with pytest.raises(DataError, match="bloodmnist.npz"):  # the 28 px file is a different file
        load_dataset("bloodmnist", data_dir=d, size=28)
    with pytest.raises(DataError, match="sizes"):
        load_dataset("bloodmnist", data_dir=d, size=100)


@pytest.mark.parametrize("size", [28, 64])
def test_missing_file_message_names_file_md5_and_directory(tmp_path, size):
    d = tmp_path / "nothing here"
    with pytest.raises(DataError) as e:
        load_dataset("pneumoniamnist", data_dir=d, size=size)
    msg = str(e.value)
    assert mm.file_name("pneumoniamnist", size) in msg
    assert INFO["pneumoniamnist"]["MD5" if size == 28 else "MD5_64"] in msg
    assert str(d) in msg
    assert "\n" not in msg


def test_data_dir_takes_precedence_over_env(tmp_path, monkeypatch):
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    write_official_npz(env_dir / "bloodmnist.npz", 8, sizes=(24, 8, 8), channels=3)
    write_official_npz(arg_dir / "bloodmnist.npz", 8, sizes=(32, 8, 8), channels=3)
    monkeypatch.setenv("MEDMIX_DATA", str(env_dir))
    assert len(load_dataset("bloodmnist").splits["train"]) == 24  # $MEDMIX_DATA when no --data-dir
    assert len(load_dataset("bloodmnist", data_dir=arg_dir).splits["train"]) == 32  # --data-dir wins
    monkeypatch.delenv("MEDMIX_DATA")
    monkeypatch.setattr(mm, "default_root", lambda: tmp_path / "default")
    with pytest.raises(DataError, match="default"):  # neither: medmnist's default root
        load_dataset("bloodmnist")


def test_unknown_dataset_lists_known_names():
    with pytest.raises(UnknownNameError) as e:
        load_dataset("nosuchmnist")
    assert "breastmnist" in str(e.value) and "pneumoniamnist" in str(e.value) and "mednist" in str(e.value)


def test_official_npz_must_be_named_after_flag(tmp_path):
    path = tmp_path / "mydata.npz"
    write_official_npz(path, 2)
    with pytest.raises(DataError, match="named after its MedMNIST flag"):
        load_dataset(str(path))


@pytest.mark.parametrize("case", ["label_out_of_range", "float_images", "multilabel_width", "not_square"])
def test_official_npz_validation(tmp_path, case):
    d = tmp_path / "d"
    if case == "multilabel_width":
        arrays = write_official_npz(d / "chestmnist.npz", 14, multi_label=True)
        arrays["train_labels"] = arrays["train_labels"][:, :5]
        name = "chestmnist"
    else:
        arrays = write_official_npz(d / "breastmnist.npz", 2)
        name = "breastmnist"
        if case == "label_out_of_range":
            arrays["val_labels"][3] = 2
        elif case == "float_images":
            arrays["train_images"] = arrays["train_images"].astype(np.float32)
        else:
            arrays["test_images"] = arrays["test_images"][:, :, :20]
    np.savez(d / f"{name}.npz", **arrays)
    with pytest.raises(DataError):
        load_dataset(name, data_dir=d)


# ----------------------------------------------------------------------------------------------- folders / packed
def test_class_folders(folder_tree):
    bundle = load_dataset(str(folder_tree))
    assert bundle.info.task == MULTI_CLASS and bundle.info.class_names == ("cls_a", "cls_b", "cls_c")
    assert bundle.info.n_channels == 1 and bundle.image_size == 32
    assert bundle.source["kind"] == "folder"
    assert sum(len(s) for s in bundle.splits.values()) == 60
    assert [len(bundle.splits[k]) for k in ("train", "val", "test")] == [42, 9, 9]
    # pixels are the PNG pixels, labels the folder index
    from PIL import Image

    train = bundle.splits["train"]
    i = int(bundle.split_indices["train"][0])
    k, j = i // 20, i % 20
    png = np.asarray(Image.open(folder_tree / bundle.info.class_names[k] / f"img_{j:03d}.png"))
    assert int(train.labels[0]) == k
    assert torch.equal(train.images[0, 0], torch.from_numpy(png.copy()))


def test_class_folders_rgb_binary(tmp_path):
    root = write_class_folders(tmp_path / "rgb", counts=(10, 12), side=24, rgb=True, classes=("neg", "pos"))
    bundle = load_dataset(str(root))
    assert bundle.info.task == BINARY and bundle.info.n_channels == 3 and bundle.image_size == 24


def test_class_folders_bad_image_and_single_class(tmp_path):
    root = write_class_folders(tmp_path / "f", counts=(6, 6), classes=("a", "b"))
    (root / "b" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(str(root))
    one = write_class_folders(tmp_path / "one", counts=(6,), classes=("only",))
    with pytest.raises(DataError, match="one sub-folder per class"):
        load_dataset(str(one))


def test_packed_npz(packed_npz):
    path, arrays = packed_npz
    bundle = load_dataset(str(path), seed=0)
    assert bundle.source["kind"] == "packed" and bundle.info.class_names == ("alpha", "beta", "gamma")
    assert bundle.info.task == MULTI_CLASS and bundle.image_size == 32
    for k, s in bundle.splits.items():
        idx = bundle.split_indices[k]
        assert torch.equal(s.images[:, 0], torch.from_numpy(arrays["images"][idx]))
        assert torch.equal(s.labels, torch.from_numpy(arrays["labels"][idx]))


def test_packed_mednist_by_name(tmp_path):
    d = tmp_path / "d"
    write_packed_npz(d / "mednist.npz", counts=(10, 10, 10, 10, 10, 10), side=64,
                     classes=("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"))
    bundle = load_dataset("mednist", data_dir=d)
    assert bundle.info.num_classes == 6 and bundle.image_size == 64
    with pytest.raises(DataError, match="mednist.npz"):
        load_dataset("mednist", data_dir=tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- split
def assert_stratified(labels: np.ndarray, split: dict[str, np.ndarray]) -> None:
    counts = np.bincount(labels)
    for k, frac in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        got = np.bincount(labels[split[k]], minlength=len(counts))
        assert np.all(np.abs(got - frac * counts) <= 1.0), (k, got, frac * counts)


@pytest.mark.parametrize("counts", [(40, 25, 13, 7), (210, 570), (7, 7, 7, 7, 7, 7), (100, 4, 50), (100, 3, 50)])
def test_split_is_stratified_and_complete(counts):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
    for seed in range(5):
        split = make_split(labels, seed)
        everything = np.concatenate([split["train"], split["val"], split["test"]])
        assert sorted(everything.tolist()) == list(range(len(labels)))  # a partition
        assert abs(len(split["train"]) - 0.7 * len(labels)) <= 1
        assert_stratified(labels, split)


def test_split_is_reproducible():
    labels = np.random.default_rng(1).integers(0, 4, 300)
    a, b, c = make_split(labels, 7), make_split(labels, 7), make_split(labels, 8)
    for k in ("train", "val", "test"):
        assert np.array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in ("train", "val", "test"))


def test_bundle_split_follows_seed_and_split_file(packed_npz, tmp_path):
    path, _ = packed_npz
    a, b, c = (load_dataset(str(path), seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(a.split_indices[k], b.split_indices[k]) for k in a.split_indices)
    assert not np.array_equal(a.split_indices["test"], c.split_indices["test"])
    labels = np.load(path)["labels"]
    split_file = tmp_path / "split.json"
    save_split(split_file, a.split_indices, 3, labels, str(path))
    d = load_dataset(str(path), seed=4, split_file=split_file)  # the file wins over the seed
    assert all(np.array_equal(a.split_indices[k], d.split_indices[k]) for k in a.split_indices)
    assert json.loads(split_file.read_text())["seed"] == 3
    with pytest.raises(DataError, match="different data"):
        load_split(split_file, labels[::-1].copy())


# ----------------------------------------------------------------------------------------------- transforms
def test_transform_shape_dtype_and_normalisation():
    x = torch.full((3, 1, 28, 28), 100, dtype=torch.uint8)
    tf = BatchTransform(28, [0.2], [0.1])
    y = tf(x)
    assert y.shape == (3, 1, 28, 28) and y.dtype == torch.float32
    assert torch.allclose(y, torch.full_like(y, (100 / 255 - 0.2) / 0.1), atol=1e-5)
    up = BatchTransform(64, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])(torch.randint(0, 256, (2, 3, 28, 28),
                                                                            dtype=torch.uint8))
    assert up.shape == (2, 3, 64, 64) and up.dtype == torch.float32 and torch.isfinite(up).all()
    down = BatchTransform(28, [0.5], [0.5])(torch.full((1, 1, 224, 224), 255, dtype=torch.uint8))
    assert down.shape == (1, 1, 28, 28) and torch.allclose(down, torch.ones_like(down), atol=1e-5)


def test_transform_rejects_float_input():
    with pytest.raises(ConfigError):
        BatchTransform(28, [0.5], [0.5])(torch.rand(1, 1, 28, 28))


def asymmetric_batch(n: int = 64, side: int = 28) -> torch.Tensor:
    x = torch.zeros(n, 1, side, side, dtype=torch.uint8)
    x[:, :, :, : side // 3] = 255  # bright left third
    x[:, :, : side // 4, :] = 128  # grey top band
    return x


@pytest.mark.parametrize("flip,dim", [("hflip", -1), ("vflip", -2)])
def test_flips_actually_flip(flip, dim):
    x = asymmetric_batch()
    tf = BatchTransform(28, [0.0], [1.0], AugmentConfig(**{flip: True}), channels_last=False)
    plain, mirrored = tf(x[:1]), tf(x[:1]).flip(dim)
    assert not torch.allclose(plain, mirrored)
    y = tf(x, train=True, generator=torch.Generator().manual_seed(0))
    is_plain = ((y - plain).abs().amax((1, 2, 3)) < 1e-3)
    is_mirrored = ((y - mirrored).abs().amax((1, 2, 3)) < 1e-3)
    assert bool((is_plain | is_mirrored).all())  # every image is exactly one of the two
    assert 10 < int(is_mirrored.sum()) < 54  # and both occur (p = 0.5 each, 64 draws)


def test_augmentation_is_deterministic_with_a_seeded_generator():
    x = torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8)
    tf = BatchTransform(28, [0.5] * 3, [0.2] * 3, AugmentConfig(hflip=True, vflip=True, rotate=30,
                                                                 scale=(0.8, 1.2), translate=0.1))
    a = tf(x, train=True, generator=torch.Generator().manual_seed(5))
    b = tf(x, train=True, generator=torch.Generator().manual_seed(5))
    c = tf(x, train=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == (8, 3, 28, 28) and torch.isfinite(a).all()
    # per-image parameters: not every image of the batch got the same transform
    same = tf(x[:1].expand(8, -1, -1, -1).contiguous(), train=True, generator=torch.Generator().manual_seed(5))
    assert not all(torch.allclose(same[0], same[i]) for i in range(1, 8))


def test_no_augmentation_when_not_training():
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    aug = BatchTransform(28, [0.3], [0.2], AugmentConfig(hflip=True, vflip=True, rotate=90, scale=(0.5, 2.0)))
    plain = BatchTransform(28, [0.3], [0.2])
    assert torch.equal(aug(x), plain(x))
    assert torch.equal(aug(x, train=False, generator=torch.Generator().manual_seed(0)), plain(x))
    assert torch.allclose(plain(x), (x.float() / 255 - 0.3) / 0.2, atol=1e-5)
    # the identity policy is the identity even with train=True
    assert torch.equal(BatchTransform(28, [0.3], [0.2], AugmentConfig())(x, train=True), plain(x))
