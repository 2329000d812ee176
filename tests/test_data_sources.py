"""Tests for cifarlab.data.sources: every layout, the decoded cache, bad input, stratified subsets.

Fixtures are small files in the real official formats: the python batches are written the way
Python 2 wrote them (protocol 2, `str` opcodes for bytes, `numpy.core.multiarray._reconstruct`).
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.data import sources
from cifarlab.data.sources import Split, load_dataset, stratified_indices, stratified_split
from cifarlab.data.unpickle import load_pickle
from cifarlab.errors import ConfigError, DataError
from helpers import dump_py2

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
JPEG_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg"


# --- writers for the official formats (the python version's pickles: helpers.dump_py2) -----------

def _random_split(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, num_classes, n)


def write_cifar10_python(folder: Path, *, per_batch: int = 4) -> dict[str, np.ndarray]:
    """A cifar-10-batches-py folder; returns the expected arrays."""
    folder.mkdir(parents=True)
    dump_py2({b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR10_CLASSES],
              b"num_vis": 3072}, folder / "batches.meta")
    train_x, train_y = _random_split(5 * per_batch, 10, seed=0)
    test_x, test_y = _random_split(per_batch, 10, seed=1)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, file in enumerate(files):
        x, y = (train_x, train_y) if i < 5 else (test_x, test_y)
        rows = slice(i * per_batch, (i + 1) * per_batch) if i < 5 else slice(None)
        dump_py2({b"batch_label": f"batch {i + 1} of 5".encode(), b"labels": [int(v) for v in y[rows]],
                  b"data": x[rows], b"filenames": [f"img_{j}.png".encode() for j in range(per_batch)]}, folder / file)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _make_tar(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def _write_image_folder(root: Path, *, per_class: int = 2, size: tuple[int, int] = (8, 6)) -> dict:
    """train/ and test/ with classes "ant" and "cat", `per_class` lossless PNGs each; returns the arrays."""
    rng = np.random.default_rng(0)
    expected = {}
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(["ant", "cat"]):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i:04d}.png")
                images.append(pixels.transpose(2, 0, 1))
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels))
    return expected


def _load(path: Path, tmp_path: Path, **kw) -> sources.Dataset:
    return load_dataset(path, cache_dir=tmp_path / "cache", progress=False, **kw)


# --- layouts ------------------------------------------------------------------------------------

def test_cifar10_python_folder_and_parent(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "cifar-10-batches-py"
    want = write_cifar10_python(folder)
    for path in (folder, folder.parent):
        ds = _load(path, tmp_path)
        assert ds.name == "cifar10" and ds.classes == CIFAR10_CLASSES
        assert ds.source == f"cifar10-python:{folder.resolve()}"
        assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
        assert ds.train.images.dtype == torch.uint8 and ds.train.images.is_contiguous()
        assert ds.train.labels.dtype == torch.int64
        assert torch.equal(ds.train.labels, torch.tensor(want["train_y"]))
        assert torch.equal(ds.test.labels, torch.tensor(want["test_y"]))
        # Official row layout: 1024 red values, then green, then blue, each row-major.
        row, c, y, x = want["train_x"][7], 2, 5, 30
        assert ds.train.images[7, c, y, x] == row[c * 1024 + y * 32 + x]
        assert np.array_equal(ds.train.images.numpy().reshape(20, -1), want["train_x"])


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_batches_pickled_by_python3_also_load(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder)
    x, y = _random_split(3, 10, seed=9)
    with open(folder / "test_batch", "wb") as f:  # protocol 2 writes bytes via _codecs.encode
        pickle.dump({b"data": x, b"labels": y.tolist(), b"batch_label": b"testing batch 1 of 1"}, f, protocol=protocol)
    ds = _load(folder, tmp_path)
    assert np.array_equal(ds.test.images.numpy().reshape(3, -1), x) and ds.test.labels.tolist() == y.tolist()


def write_cifar100_python(folder: Path, *, train: int = 6, test: int = 3) -> dict[str, np.ndarray]:
    """A cifar-100-python folder (train, test, meta) with random images; fine label f has coarse label f // 5."""
    folder.mkdir(parents=True)
    dump_py2({b"fine_label_names": [f"fine{i:03d}".encode() for i in range(100)],
              b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]}, folder / "meta")
    want = {}
    for split, n in (("train", train), ("test", test)):
        x, y = _random_split(n, 100, seed=n)
        dump_py2({b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
                  b"fine_labels": [int(v) for v in y], b"coarse_labels": [int(v) // 5 for v in y], b"data": x},
                 folder / split)
        want[f"{split}_x"], want[f"{split}_y"] = x, y
    return want


def test_cifar100_python_folder_fine_and_coarse_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-100-python"
    want = write_cifar100_python(folder)
    ds = _load(tmp_path, tmp_path, name="cifar100")
    assert ds.name == "cifar100" and len(ds.classes) == 100 and ds.classes[3] == "fine003"
    assert ds.source == f"cifar100-python:{folder.resolve()}"
    assert torch.equal(ds.train.labels, torch.tensor(want["train_y"]))
    assert np.array_equal(ds.test.images.numpy().reshape(3, -1), want["test_x"])
    # Both label sets are decoded once and cached together: switching decodes nothing and never mixes them up.
    monkeypatch.setattr(sources, "_decode", lambda *a, **k: pytest.fail("decoded although cached"))
    coarse = _load(folder, tmp_path, name="cifar100", labels="coarse")
    assert coarse.classes == tuple(f"coarse{i:02d}" for i in range(20))
    assert torch.equal(coarse.train.labels, torch.tensor(want["train_y"] // 5))
    assert torch.equal(coarse.test.labels, torch.tensor(want["test_y"] // 5))
    assert torch.equal(coarse.train.images, ds.train.images)
    assert _load(folder, tmp_path, name="cifar100").classes == ds.classes
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npz"))) == 1
    with pytest.raises(DataError, match=r"holds cifar100.*name='cifar100' \(--dataset cifar100\)"):
        _load(folder, tmp_path, name="cifar10")


def test_cifar100_archive_with_coarse_labels_and_the_wrong_dataset_name(tmp_path: Path) -> None:
    want = write_cifar100_python(tmp_path / "src" / "cifar-100-python")
    archive = _make_tar(tmp_path / "src" / "cifar-100-python", tmp_path / "cifar-100-python.tar.gz")
    ds = _load(archive, tmp_path, name="cifar100", labels="coarse")
    assert len(ds.classes) == 20 and ds.source == f"cifar100-python:{archive.resolve()}"
    assert torch.equal(ds.test.labels, torch.tensor(want["test_y"] // 5))
    with pytest.raises(DataError, match=r"cifar-100-python.tar.gz holds cifar100, not cifar10; .*--dataset cifar100"):
        _load(archive, tmp_path / "other")


def test_a_cache_from_before_coarse_labels_is_decoded_again(tmp_path: Path) -> None:
    write_cifar100_python(tmp_path / "cifar-100-python")
    _load(tmp_path, tmp_path, name="cifar100")
    (cache,) = (tmp_path / "cache" / "decoded").glob("*.npz")
    with np.load(cache) as z:  # what a cache written with the fine labels only holds
        old = {k: z[k] for k in z.files if "coarse" not in k}
    with open(cache, "wb") as f:
        np.savez(f, **old)
    assert len(_load(tmp_path, tmp_path, name="cifar100", labels="coarse").classes) == 20


def test_coarse_labels_where_there_are_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10_python(tmp_path / "c10" / "cifar-10-batches-py")
    with pytest.raises(ConfigError, match=r"cifar10 at \S*cifar-10-batches-py \(cifar10-python\) has no coarse labels, "
                                          r"only fine; data.labels 'coarse' \(--labels coarse\) needs the official "
                                          r"CIFAR-100 python version"):
        _load(tmp_path / "c10", tmp_path, labels="coarse")
    with pytest.raises(ConfigError, match="unknown label set 'medium'; choose from fine, coarse"):
        _load(tmp_path / "c10", tmp_path, labels="medium")
    archive = _make_tar(tmp_path / "c10" / "cifar-10-batches-py", tmp_path / "c10.tar.gz")  # known once extracted
    with pytest.raises(ConfigError, match=r"cifar10 at \S*c10.tar.gz \(cifar10-python\) has no coarse labels"):
        _load(archive, tmp_path, labels="coarse")
    _write_image_folder(tmp_path / "imgs")
    monkeypatch.setattr(sources, "_decode", lambda *a, **k: pytest.fail("decoded before refusing"))
    with pytest.raises(ConfigError, match=r"cifar100 at \S*imgs \(image-folder\) has no coarse labels"):
        _load(tmp_path / "imgs", tmp_path, name="cifar100", labels="coarse")


def test_cifar10_binary_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    want = {}
    for i, file in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
        x, y = _random_split(3, 10, seed=i)
        (folder / file).write_bytes(b"".join(bytes([label]) + image.tobytes() for image, label in zip(x, y)))
        want[file] = (x, y)
    ds = _load(folder, tmp_path)
    assert ds.classes == CIFAR10_CLASSES and ds.source.startswith("cifar10-binary:")
    assert np.array_equal(ds.test.images.numpy().reshape(3, -1), want["test_batch.bin"][0])
    assert ds.train.labels[3:6].tolist() == want["data_batch_2.bin"][1].tolist()


def test_archive_file_and_parent_holding_it(tmp_path: Path) -> None:
    want = write_cifar10_python(tmp_path / "src" / "cifar-10-batches-py")
    (tmp_path / "dl").mkdir()
    archive = _make_tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "dl" / "cifar-10-python.tar.gz")
    for path in (archive, archive.parent):
        ds = _load(path, tmp_path)
        assert ds.source == f"cifar10-python:{archive.resolve()}"
        assert np.array_equal(ds.train.images.numpy().reshape(20, -1), want["train_x"])
    # Extracted only to decode: the cache keeps the decoded arrays, nothing else.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["decoded"]
    assert sorted(p.name for p in archive.parent.iterdir()) == ["cifar-10-python.tar.gz"]


def test_image_folder_sorted_classes_and_rgb_conversion(tmp_path: Path) -> None:
    want = _write_image_folder(tmp_path / "imgs")
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(gray, mode="L").save(tmp_path / "imgs" / "test" / "cat" / "0002.png")
    rgba = np.full((6, 8, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 7
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "imgs" / "test" / "cat" / "0003.png")
    ds = _load(tmp_path / "imgs", tmp_path)
    assert ds.classes == ("ant", "cat") and ds.source == f"image-folder:{(tmp_path / 'imgs').resolve()}"
    assert torch.equal(ds.train.images, torch.from_numpy(want["train"][0]))
    assert ds.train.labels.tolist() == [0, 0, 1, 1] and ds.test.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert torch.equal(ds.test.images[4], torch.from_numpy(np.stack([gray] * 3)))
    assert (ds.test.images[5] == 200).all()


def test_image_folder_pool_matches_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_image_folder(tmp_path / "imgs", per_class=6)
    direct = _load(tmp_path / "imgs", tmp_path / "a")
    monkeypatch.setattr(sources, "_IMAGES_PER_TASK", 5)  # 24 files -> 5 pool tasks
    pooled = _load(tmp_path / "imgs", tmp_path / "b")
    assert torch.equal(direct.train.images, pooled.train.images) and torch.equal(direct.test.images, pooled.test.images)
    # An error raised inside a worker reaches the caller as the same DataError.
    Image.new("RGB", (9, 6)).save(tmp_path / "imgs" / "test" / "cat" / "0005.png")
    with pytest.raises(DataError, match=r"0005.png is 9x6 pixels, \S+ is 8x6; pass --image-size"):
        _load(tmp_path / "imgs", tmp_path / "c")


def _write_mixed_folder(root: Path) -> dict[str, np.ndarray]:
    """One image per kind: RGB of 64x48, 32x32 and 16x16 pixels, grayscale, RGBA and palette PNGs."""
    rng = np.random.default_rng(1)
    kinds = {"wide": ("RGB", (48, 64, 3)), "square": ("RGB", (32, 32, 3)), "small": ("RGB", (16, 16, 3)),
             "gray": ("L", (40, 24)), "rgba": ("RGBA", (20, 20, 4)), "palette": ("P", (24, 36))}
    written = {}
    for split in ("train", "test"):
        for cls in ("ant", "cat"):
            (root / split / cls).mkdir(parents=True)
            for name, (mode, shape) in kinds.items():
                image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode="L" if mode == "P" else mode)
                if mode == "P":
                    image = image.convert("RGB").quantize(16)
                image.save(root / split / cls / f"{name}.png")
                written.setdefault(name, np.asarray(image.convert("RGB")))  # train/ant's, the first read
    return written


def test_image_size_resizes_a_mixed_folder_as_torchvision_does(tmp_path: Path) -> None:
    written = _write_mixed_folder(tmp_path / "imgs")
    ds = _load(tmp_path / "imgs", tmp_path, image_size=16)
    assert ds.train.images.shape == (12, 3, 16, 16) and ds.test.images.shape == (12, 3, 16, 16)
    names = sorted(written)  # files are read in name order within each class
    wide = ds.train.images[names.index("wide")].permute(1, 2, 0).numpy()
    # Resize(16) of 64x48 (W x H): the shorter side to 16, the longer to int(16 * 64 / 48) = 21; then the centre.
    reference = Image.fromarray(written["wide"]).resize((21, 16), Image.BILINEAR).crop((2, 0, 18, 16))
    assert np.array_equal(wide, np.asarray(reference))
    small = ds.train.images[names.index("small")].permute(1, 2, 0).numpy()
    assert np.array_equal(small, written["small"])  # already 16x16: untouched
    gray = ds.train.images[names.index("gray")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    # Each size is its own cache entry: 8 does not reuse the 16-pixel copy.
    assert _load(tmp_path / "imgs", tmp_path, image_size=8).train.images.shape[-2:] == (8, 8)
    assert len(list((tmp_path / "cache" / "decoded").iterdir())) == 2


def test_a_mixed_folder_without_image_size_names_two_sizes_and_the_flag(tmp_path: Path) -> None:
    _write_mixed_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"images of two sizes: \S+/train/ant/palette.png is 36x24 pixels, "
                                        r"\S+/train/ant/gray.png is 24x40; pass --image-size N \(config data.image_size\)"):
        _load(tmp_path / "imgs", tmp_path)


@pytest.mark.parametrize("size", [0, -3, 4])
def test_a_bad_image_size_is_refused_before_any_decoding(tmp_path: Path, size: int) -> None:
    with pytest.raises(ConfigError, match=f"data.image_size must be an integer >= 8 .*got {size}"):
        _load(tmp_path / "does-not-matter", tmp_path, image_size=size)


def test_image_size_on_the_official_arrays_points_to_input_size(tmp_path: Path) -> None:
    write_cifar10_python(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ConfigError, match="use --input-size 64 to resize the network input"):
        _load(tmp_path / "cifar-10-batches-py", tmp_path, image_size=64)


def test_env_var_gives_the_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10_python(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path))
    assert len(load_dataset(cache_dir=tmp_path / "cache", download=False, progress=False).train) == 20


@pytest.mark.skipif(not JPEG_DIR.is_dir(), reason="shared cifar10-jpeg copy is absent")
def test_real_jpeg_subset(tmp_path: Path) -> None:
    for split, n in (("train", 20), ("test", 5)):
        for cls in CIFAR10_CLASSES:
            (tmp_path / "jpeg" / split / cls).mkdir(parents=True)
            for file in sorted((JPEG_DIR / split / cls).iterdir())[:n]:
                shutil.copy(file, tmp_path / "jpeg" / split / cls)
    ds = _load(tmp_path / "jpeg", tmp_path)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train.images.shape == (200, 3, 32, 32) and ds.test.images.shape == (50, 3, 32, 32)
    assert ds.train.labels.bincount().tolist() == [20] * 10
    first_bird = sorted((tmp_path / "jpeg" / "test" / "bird").iterdir())[0]
    reference = np.asarray(Image.open(first_bird).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(ds.test.images[10], torch.from_numpy(np.ascontiguousarray(reference)))


# --- the decoded cache --------------------------------------------------------------------------

def test_second_load_reads_cache_and_changed_source_decodes_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_image_folder(tmp_path / "imgs")
    before = sorted(p for p in (tmp_path / "imgs").rglob("*"))
    first = _load(tmp_path / "imgs", tmp_path)
    assert sorted(p for p in (tmp_path / "imgs").rglob("*")) == before  # nothing written beside the source
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npz"))) == 1

    real_decode = sources._decode
    monkeypatch.setattr(sources, "_decode", lambda *a, **k: pytest.fail("decoded although cached"))
    second = _load(tmp_path / "imgs", tmp_path)
    assert torch.equal(first.train.images, second.train.images) and first.classes == second.classes

    Image.new("RGB", (8, 6), (1, 2, 3)).save(tmp_path / "imgs" / "train" / "ant" / "0000.png")
    monkeypatch.setattr(sources, "_decode", real_decode)
    third = _load(tmp_path / "imgs", tmp_path)
    assert third.train.images[0, :, 0, 0].tolist() == [1, 2, 3]
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npz"))) == 1  # overwritten, not piled up


def test_corrupt_cache_file_is_decoded_again(tmp_path: Path) -> None:
    write_cifar10_python(tmp_path / "cifar-10-batches-py")
    _load(tmp_path, tmp_path)
    (cache,) = (tmp_path / "cache" / "decoded").glob("*.npz")
    cache.write_bytes(b"not a zip")
    assert len(_load(tmp_path, tmp_path).train) == 20


# --- bad input ----------------------------------------------------------------------------------

def _garbage_image(root: Path) -> str:
    (root / "train" / "cat" / "0001.png").write_bytes(b"\x89PNG not really")
    return "0001.png: not a readable image"


def _truncated_jpeg(root: Path) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "train" / "cat" / "0001.png").unlink()
    (root / "train" / "cat" / "0001.jpg").write_bytes(buffer.getvalue()[:200])
    return "0001.jpg: not a readable image"


def _wrong_size(root: Path) -> str:
    Image.new("RGB", (8, 7)).save(root / "test" / "ant" / "0001.png")
    return r"images of two sizes: \S*test/ant/0001.png is 8x7 pixels, \S*train/ant/0000.png is 8x6; pass --image-size N"


def _no_test_split(root: Path) -> str:
    shutil.rmtree(root / "test")
    return "missing split folder test/"


def _empty_class(root: Path) -> str:
    shutil.rmtree(root / "test" / "cat")
    (root / "test" / "cat").mkdir()
    return "test/cat: empty class folder"


def _no_classes(root: Path) -> str:
    for split in ("train", "test"):
        shutil.rmtree(root / split)
        (root / split).mkdir()
    return "train/ and test/ hold no class folders"


def _different_classes(root: Path) -> str:
    (root / "test" / "cat").rename(root / "test" / "dog")
    return r"only in train/: \['cat'\], only in test/: \['dog'\]"


@pytest.mark.parametrize("damage", [_garbage_image, _truncated_jpeg, _wrong_size, _no_test_split,
                                    _empty_class, _no_classes, _different_classes])
def test_bad_image_folder(tmp_path: Path, damage) -> None:
    _write_image_folder(tmp_path / "imgs")
    message = damage(tmp_path / "imgs")
    with pytest.raises(DataError, match=message):
        _load(tmp_path / "imgs", tmp_path)


def test_truncated_binary_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES))
    for file in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / file).write_bytes(bytes(3073 * 2))
    (folder / "data_batch_4.bin").write_bytes(bytes(3073 * 2 - 100))
    with pytest.raises(DataError, match="data_batch_4.bin: 6046 bytes is not a whole number of 3073-byte records"):
        _load(folder, tmp_path)


def test_missing_batch_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder)
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="cifar-10-batches-py \\(cifar10-python\\) lacks data_batch_3, test_batch"):
        _load(folder, tmp_path)


def test_wrong_array_shape_in_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder)
    dump_py2({b"labels": [0, 1], b"data": np.zeros((2, 3, 32, 32), np.uint8)}, folder / "data_batch_2")
    with pytest.raises(DataError, match=r"data_batch_2: b'data' must be a uint8 array of shape \(N, 3072\), got uint8 \(2, 3, 32, 32\)"):
        _load(folder, tmp_path)
    dump_py2({b"labels": [0, 1, 2], b"data": np.zeros((2, 3072), np.uint8)}, folder / "data_batch_2")
    with pytest.raises(DataError, match="data_batch_2: expected 2 integer labels"):
        _load(folder, tmp_path)


def _rewrite_batch(folder: Path, split: str, **changes) -> None:
    """Rewrite a cifar-100-python batch with some keys replaced (value None: the key removed)."""
    batch = load_pickle(folder / split)
    for key, value in changes.items():
        if value is None:
            del batch[key.encode()]
        else:
            batch[key.encode()] = value
    dump_py2(batch, folder / split)


def _c100_no_meta(folder: Path) -> str:
    (folder / "meta").unlink()
    return r"cifar-100-python \(cifar100-python\) lacks meta; expected train, test, meta"


def _c100_no_test_split(folder: Path) -> str:
    (folder / "test").unlink()
    return r"cifar-100-python \(cifar100-python\) lacks test; expected train, test, meta"


def _c100_fine_label_out_of_range(folder: Path) -> str:
    _rewrite_batch(folder, "train", fine_labels=[0, 1, 2, 3, 4, 100])
    return r"cifar-100-python/train: b'fine_labels' must lie in \[0, 100\) \(the meta file names 100 classes\), found 0..100"


def _c100_coarse_label_out_of_range(folder: Path) -> str:
    _rewrite_batch(folder, "test", coarse_labels=[-1, 0, 19])
    return r"cifar-100-python/test: b'coarse_labels' must lie in \[0, 20\) .*found -1..19"


def _c100_wrong_data_shape(folder: Path) -> str:
    _rewrite_batch(folder, "train", data=np.zeros((6, 3, 32, 32), np.uint8))
    return (r"cifar-100-python/train: b'data' must be a uint8 array of shape \(N, 3072\), "
            r"got uint8 \(6, 3, 32, 32\)")


def _c100_labels_not_one_per_image(folder: Path) -> str:
    _rewrite_batch(folder, "test", coarse_labels=[0, 1])
    return r"cifar-100-python/test: expected 3 integer labels in b'coarse_labels', got int64 \(2,\)"


def _c100_no_coarse_labels(folder: Path) -> str:
    _rewrite_batch(folder, "train", coarse_labels=None)
    return r"cifar-100-python/train: expected a dict with b'data', b'fine_labels', b'coarse_labels'"


def _c100_no_coarse_names(folder: Path) -> str:
    dump_py2({b"fine_label_names": [b"f"] * 100}, folder / "meta")
    return r"cifar-100-python/meta: expected a dict with b'coarse_label_names': a list of class names"


@pytest.mark.parametrize("damage", [_c100_no_meta, _c100_no_test_split, _c100_fine_label_out_of_range,
                                    _c100_coarse_label_out_of_range, _c100_wrong_data_shape,
                                    _c100_labels_not_one_per_image, _c100_no_coarse_labels, _c100_no_coarse_names])
def test_bad_cifar100_archive_names_the_file_inside_it(tmp_path: Path, damage) -> None:
    folder = tmp_path / "src" / "cifar-100-python"
    write_cifar100_python(folder)
    message = damage(folder)
    archive = _make_tar(folder, tmp_path / "cifar-100-python.tar.gz")
    with pytest.raises(DataError, match=message) as error:
        _load(archive, tmp_path, name="cifar100")
    # The file is named inside the archive, not in the temporary folder it was extracted to.
    assert str(error.value).startswith(f"{archive.resolve()}/cifar-100-python") and ".extract-" not in str(error.value)
    with pytest.raises(DataError, match=message):  # the folder itself
        _load(folder, tmp_path, name="cifar100")


def test_truncated_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch is not a readable CIFAR pickle"):
        _load(folder, tmp_path)


class _Payload:
    def __init__(self, function, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function", [os.system, exec])
def test_crafted_pickle_runs_nothing(tmp_path: Path, function) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder)
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w').close()"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Payload(function, command), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_1: refuses to load (posix\.system|__builtin__\.exec)"):
        _load(folder, tmp_path)
    assert not marker.exists()


def test_nothing_found_lists_places_and_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    (tmp_path / "cache").mkdir()
    with pytest.raises(DataError) as error:
        load_dataset(cache_dir=tmp_path / "cache", download=False)
    message = str(error.value)
    assert f"nothing found in {tmp_path / 'cache'}" in message
    assert "cifar-10-batches-py/" in message and "train/<class>/*" in message and "cifar-10-binary.tar.gz" in message
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'} does not exist"):
        _load(tmp_path / "nowhere", tmp_path)


def test_unknown_name_and_ambiguous_parent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'; choose from cifar10, cifar100"):
        _load(tmp_path, tmp_path, name="mnist")
    _write_image_folder(tmp_path / "one")
    _write_image_folder(tmp_path / "two")
    with pytest.raises(DataError, match="several cifar10 sources: one, two"):
        _load(tmp_path, tmp_path)


# --- Split and stratified subsets -----------------------------------------------------------------

def test_split_validates_and_subsets() -> None:
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    split = Split(images, torch.tensor([0, 1, 2, 1, 0]))
    sub = split.subset(torch.tensor([4, 1]))
    assert torch.equal(sub.images, images[[4, 1]]) and sub.labels.tolist() == [0, 1] and len(split) == 5
    for bad in (images.to(torch.int16), images[:, :1], images[0]):
        with pytest.raises(ValueError, match="uint8"):
            Split(bad, split.labels[:len(bad)])
    assert Split(images[:, :1].float(), split.labels).images.shape == (5, 1, 2, 2)  # a precomputed frozen prefix
    with pytest.raises(ValueError, match=r"int64 tensor \(5,\)"):
        Split(images, split.labels[:4])


def test_stratified_indices_balanced_deterministic_sorted() -> None:
    labels = torch.arange(10).repeat(30)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    idx = stratified_indices(labels, 50, seed=3)
    assert labels[idx].bincount().tolist() == [5] * 10
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 50 and idx.dtype == torch.int64
    assert torch.equal(idx, stratified_indices(labels, 50, seed=3))
    assert not torch.equal(idx, stratified_indices(labels, 50, seed=4))
    uneven = stratified_indices(labels, 53, seed=3)
    assert sorted(labels[uneven].bincount().tolist()) == [5] * 7 + [6] * 3


def test_stratified_indices_small_classes_give_all_they_have() -> None:
    labels = torch.tensor([0] * 2 + [1] * 10 + [2] * 10 + [3] * 4)
    assert labels[stratified_indices(labels, 14, seed=0)].bincount().tolist() == [2, 4, 4, 4]
    counts = labels[stratified_indices(labels, 17, seed=0)].bincount().tolist()
    assert counts[0] == 2 and counts[3] == 4 and sorted(counts[1:3]) == [5, 6]
    assert torch.equal(stratified_indices(labels, 26, seed=0), torch.arange(26))
    assert len(stratified_indices(labels, 0, seed=0)) == 0
    with pytest.raises(ConfigError, match="cannot draw 27 examples: only 26 exist"):
        stratified_indices(labels, 27, seed=0)


def test_stratified_split_is_a_partition() -> None:
    labels = torch.arange(4).repeat(25)
    keep, holdout = stratified_split(labels, 20, seed=1)
    assert labels[holdout].bincount().tolist() == [5] * 4
    assert torch.equal(torch.cat([keep, holdout]).sort().values, torch.arange(100))
    assert torch.equal(keep, keep.sort().values)
    with pytest.raises(ConfigError, match="only 100 exist"):
        stratified_split(labels, 101, seed=1)
