"""Load CIFAR-10/100 from any of its usual on-disk forms as uint8 tensors, decoding each source once.

Layouts recognised at `path` itself or in one of its subfolders:

    cifar-10-batches-py/   data_batch_1..5, test_batch, batches.meta            (official python version)
    cifar-100-python/      train, test, meta                                    (official; fine or coarse labels)
    cifar-10-batches-bin/  data_batch_1..5.bin, test_batch.bin, batches.meta.txt (official binary version)
    *.tar.gz               an archive holding one of the above (e.g. cifar-10-python.tar.gz)
    image folder           train/<class>/*, test/<class>/* (any image Pillow reads; of one size, or see image_size)

Decoded arrays are cached in `<cache_dir>/decoded/<hash of the source path and image size>.npz` together with a
fingerprint of the source files (paths, sizes, mtimes); a changed source is decoded again. The cache
never goes beside the source, so read-only or shared dataset folders stay untouched. CIFAR-100's cache holds both
label sets (fine and coarse, see LABEL_SETS), and a load picks one: switching between them never decodes again
and never returns the other set's labels.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from cifarlab.data.download import ARCHIVES, default_cache_dir, download_dataset, extract_archive
from cifarlab.data.unpickle import load_pickle
from cifarlab.config import LABEL_SETS, check_input_size
from cifarlab.errors import ConfigError, DataError
from cifarlab.io import atomic_write

NAMES = ("cifar10", "cifar100")
_CACHE_VERSION = "1"  # bump when the decoded arrays change meaning
# Files per decoding task in the worker pool; fewer files decode in-process. Small enough that 5,000 files
# (one class) split evenly over a few cores, large enough that a task costs far more than its dispatch.
_IMAGES_PER_TASK = 500


@dataclass(frozen=True)
class Split:
    """One split: `images` (N, 3, H, W) uint8, `labels` (N,) int64 (on CPU from load_dataset; callers may move it).

    `images` may instead be float (N, C, H, W): a model's frozen prefix of the images, computed once
    (train.run.precompute_frozen_prefix).
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.ndim != 4 or not (images.dtype == torch.uint8 and images.shape[1] == 3 or images.is_floating_point()):
            raise ValueError(f"Split.images must be a uint8 tensor (N, 3, H, W) or precomputed float inputs "
                             f"(N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != (len(images),):
            raise ValueError(f"Split.labels must be an int64 tensor ({len(images)},), got {labels.dtype} {tuple(labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> Split:
        """The examples at `indices` (a new Split; this one is unchanged)."""
        return Split(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class Dataset:
    name: str  # "cifar10" or "cifar100"
    classes: tuple[str, ...]  # class names in label order
    train: Split
    test: Split
    source: str  # "<layout>:<path>", e.g. "image-folder:/data/cifar10-jpeg"; says which copy a number came from


def load_dataset(
    path: str | Path | None = None, *, name: str = "cifar10", cache_dir: str | Path | None = None,
    download: bool = True, progress: bool = True, download_url: str | None = None, image_size: int | None = None,
    labels: str = "fine",
) -> Dataset:
    """Load dataset `name` from `path` (else `$CIFARLAB_DATA`, else the cache dir).

    `path` may be a folder or archive in one of the layouts above, or a parent folder holding one.
    Only when neither `path` nor `$CIFARLAB_DATA` is given and the cache holds no copy is the
    official archive downloaded into the cache (if `download`), from `download_url` when given
    (a mirror of the official file: its MD5 is still checked). A wrong explicit path is an error,
    never a download. `cache_dir` defaults to `default_cache_dir()`. `image_size` N: an image folder's images
    are resized as they are decoded (shorter side to N, then the centre N x N, as torchvision's Resize(N) +
    CenterCrop(N)); None: they must all have one size. `labels`: "fine" (every layout's labels; CIFAR-100's 100
    classes) or "coarse" (CIFAR-100's 20 superclasses, official python version only).
    """
    if name not in NAMES:
        raise ConfigError(f"unknown dataset {name!r}; choose from {', '.join(NAMES)}")
    if labels not in LABEL_SETS:
        raise ConfigError(f"unknown label set {labels!r}; choose from {', '.join(LABEL_SETS)}")
    check_input_size("data.image_size", image_size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    location = path if path is not None else os.environ.get("CIFARLAB_DATA") or None
    if location is not None:
        location = Path(location).expanduser()
        source = _find(location, name, any_archive=True)
        if source is None:
            raise DataError(_not_found(location, name, "fix the path (or $CIFARLAB_DATA), or leave both unset to use the cache and download"))
    else:
        source = _find(cache_dir, name, any_archive=False) if cache_dir.is_dir() else None
        if source is None:
            if not download:
                raise DataError(_not_found(cache_dir, name, "pass path=..., set $CIFARLAB_DATA, or allow download=True"))
            folder = download_dataset(name, cache_dir=cache_dir, url=download_url, progress=progress)
            source = (layout_of(folder, any_archive=False), folder)
    return _load(*source, name=name, cache_dir=cache_dir, progress=progress, image_size=image_size, labels=labels)


# --- finding a source ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Format:
    """One official CIFAR layout: its files and how to read them."""

    dataset: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_sets: tuple[str, ...]  # of LABEL_SETS; "fine" is the layout's only set, or CIFAR-100's 100 classes
    read_classes: Callable[[Path], dict[str, list[str]]]  # meta file -> {label set: class names}
    # (path, {label set: num_classes}) -> images, {label set: labels}
    read_batch: Callable[[Path, dict[str, int]], tuple[np.ndarray, dict[str, np.ndarray]]]


def _pickle_classes(path: Path, *, keys: dict[str, bytes]) -> dict[str, list[str]]:
    meta = load_pickle(path)
    classes = {}
    for label_set, key in keys.items():
        names = meta.get(key) if isinstance(meta, dict) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
            raise DataError(f"{path}: expected a dict with {key!r}: a list of class names")
        classes[label_set] = [n.decode() if isinstance(n, bytes) else n for n in names]
    return classes


def _pickle_batch(path: Path, num_classes: dict[str, int], *,
                  keys: dict[str, bytes]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    batch = load_pickle(path)
    expected = (b"data", *keys.values())
    if not isinstance(batch, dict) or any(key not in batch for key in expected):
        raise DataError(f"{path}: expected a dict with {', '.join(map(repr, expected))}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {got}")
    images = data.reshape(-1, 3, 32, 32)  # rows are 1024 red, 1024 green, 1024 blue values, row-major
    return images, {label_set: _check_labels(np.asarray(batch[key]), len(images), num_classes[label_set], path,
                                             what=repr(key))
                    for label_set, key in keys.items()}


def _text_classes(path: Path) -> dict[str, list[str]]:
    names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: expected one class name per line, found none")
    return {"fine": names}


def _binary_batch(path: Path, num_classes: dict[str, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte records "
                        "(1 label byte + 3072 pixel bytes); the file is truncated or not CIFAR-10 binary")
    records = raw.reshape(-1, 3073)
    images = np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32)
    return images, {"fine": _check_labels(records[:, 0], len(images), num_classes["fine"], path, what="labels")}


def _check_labels(labels: np.ndarray, n: int, num_classes: int, path: Path, *, what: str) -> np.ndarray:
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: expected {n} integer labels in {what}, got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: {what} must lie in [0, {num_classes}) (the meta file names {num_classes} classes), "
                        f"found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


_TRAIN10 = tuple(f"data_batch_{i}" for i in range(1, 6))
_FORMATS: dict[str, _Format] = {
    "cifar10-python": _Format("cifar10", _TRAIN10, ("test_batch",), "batches.meta", ("fine",),
                              partial(_pickle_classes, keys={"fine": b"label_names"}),
                              partial(_pickle_batch, keys={"fine": b"labels"})),
    "cifar100-python": _Format("cifar100", ("train",), ("test",), "meta", ("fine", "coarse"),
                               partial(_pickle_classes, keys={"fine": b"fine_label_names",
                                                              "coarse": b"coarse_label_names"}),
                               partial(_pickle_batch, keys={"fine": b"fine_labels", "coarse": b"coarse_labels"})),
    "cifar10-binary": _Format("cifar10", tuple(f + ".bin" for f in _TRAIN10), ("test_batch.bin",), "batches.meta.txt",
                              ("fine",), _text_classes, _binary_batch),
}
# Official archive file name -> the dataset it holds.
_OFFICIAL_ARCHIVES = {Path(ARCHIVES[key].url).name: dataset
                      for key, dataset in (("cifar10", "cifar10"), ("cifar100", "cifar100"), ("cifar10-binary", "cifar10"))}
# When a parent holds several sources, the official arrays win over archives and lossy image folders.
_PREFERENCE = (*_FORMATS, "archive", "image-folder")
_LAYOUT_HELP = (
    "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta); "
    "cifar-100-python/ (train, test, meta); "
    "cifar-10-batches-bin/ (data_batch_1..5.bin, test_batch.bin, batches.meta.txt); "
    f"an archive of one of these ({', '.join(sorted(_OFFICIAL_ARCHIVES))}); "
    "an image folder with train/<class>/* and test/<class>/*"
)


def layout_of(path: Path, *, any_archive: bool) -> str | None:
    """The layout of `path` itself, or None. Unofficial archive names count only when `any_archive`."""
    if path.is_file():
        is_tar = path.name.endswith((".tar.gz", ".tgz", ".tar"))
        return "archive" if path.name in _OFFICIAL_ARCHIVES or (any_archive and is_tar) else None
    if not path.is_dir():
        return None
    for layout, fmt in _FORMATS.items():
        if any((path / f).is_file() for f in (fmt.meta, fmt.train[0], fmt.test[0])):
            return layout
    return "image-folder" if (path / "train").is_dir() or (path / "test").is_dir() else None


def dataset_of(layout: str, path: Path) -> str | None:
    """The dataset a layout holds, None when it cannot tell (image folders, unofficial archives)."""
    if layout in _FORMATS:
        return _FORMATS[layout].dataset
    return _OFFICIAL_ARCHIVES.get(path.name) if layout == "archive" else None


def _find(root: Path, name: str, *, any_archive: bool) -> tuple[str, Path] | None:
    """(layout, path) at `root` itself, else the preferred one among its subfolders holding `name`."""
    own = layout_of(root, any_archive=any_archive)
    if own is not None:
        return own, root
    if not root.is_dir():
        return None
    found = []
    for child in sorted(root.iterdir()):
        layout = None if child.name.startswith(".") else layout_of(child, any_archive=False)
        if layout is not None and dataset_of(layout, child) in (name, None):
            found.append((_PREFERENCE.index(layout), layout, child))
    if not found:
        return None
    best = min(found)[0]
    tied = [child for rank, _, child in found if rank == best]
    if len(tied) > 1:
        raise DataError(f"{root} holds several {name} sources: {', '.join(c.name for c in tied)}; pass one of them as path")
    return min(found)[1:]


def _not_found(place: Path, name: str, hint: str) -> str:
    where = f"{place} does not exist" if not place.exists() else f"nothing found in {place} or its subfolders"
    return f"no {name} dataset: {where}. Accepted layouts: {_LAYOUT_HELP}. To fix: {hint}"


# --- decoding with a cache ----------------------------------------------------------------------

def _load(layout: str, path: Path, *, name: str, cache_dir: Path, progress: bool, image_size: int | None,
          labels: str) -> Dataset:
    path = path.resolve()
    _check_label_set(labels, name=name, layout=layout, path=path)  # before decoding, which may take minutes
    key = str(path) if image_size is None else f"{path}\0{image_size}"  # each size is its own decoded copy
    cache = cache_dir / "decoded" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    fingerprint = _fingerprint(path)
    arrays = _read_cache(cache, fingerprint)
    # A cache written before a layout's every label set was kept (CIFAR-100's coarse labels) is decoded again.
    if arrays is None or not all(_array_names(s)[0] in arrays for s in _label_sets(str(arrays["layout"])) or ()):
        arrays = _decode(layout, path, name=name, cache_dir=cache_dir, progress=progress, image_size=image_size)
        _write_cache(cache, arrays, fingerprint)
    layout = str(arrays["layout"])  # an archive's content layout
    held = dataset_of(layout, path)
    if held not in (name, None):
        raise DataError(f"{path} holds {held} ({layout}), not {name}; pass name={held!r} (--dataset {held})")
    _check_label_set(labels, name=name, layout=layout, path=path)
    classes, train_labels, test_labels = _array_names(labels)
    return Dataset(
        name=name,
        classes=tuple(str(c) for c in arrays[classes]),
        train=Split(torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays[train_labels])),
        test=Split(torch.from_numpy(arrays["test_images"]), torch.from_numpy(arrays[test_labels])),
        source=f"{layout}:{path}",
    )


def _label_sets(layout: str) -> tuple[str, ...] | None:
    """The label sets a layout holds; None for an archive, whose content is known once it is extracted."""
    if layout in _FORMATS:
        return _FORMATS[layout].label_sets
    return ("fine",) if layout == "image-folder" else None


def _check_label_set(labels: str, *, name: str, layout: str, path: Path) -> None:
    held = _label_sets(layout)
    if held is not None and labels not in held:
        raise ConfigError(f"{name} at {path} ({layout}) has no {labels} labels, only {', '.join(held)}; "
                          f"data.labels {labels!r} (--labels {labels}) needs the official CIFAR-100 python version "
                          f"(cifar-100-python/ or {Path(ARCHIVES['cifar100'].url).name})")


def _array_names(label_set: str) -> tuple[str, str, str]:
    """Names of a label set's decoded arrays: class names, train labels, test labels."""
    prefix = "" if label_set == "fine" else f"{label_set}_"
    return f"{prefix}classes", f"train_{prefix}labels", f"test_{prefix}labels"


def _fingerprint(path: Path) -> str:
    """Hash of the relative path, size and mtime of every file under `path` (or of `path` itself)."""
    lines = [_CACHE_VERSION]

    def visit(entry: os.DirEntry | Path, relative: str) -> None:
        if entry.is_dir():
            for child in sorted(os.scandir(entry), key=lambda e: e.name):
                visit(child, f"{relative}/{child.name}")
        else:
            st = entry.stat()
            lines.append(f"{relative}\0{st.st_size}\0{st.st_mtime_ns}")

    # os.scandir, not Path.rglob: 60k image files are stat-ed on every load, so per-file cost matters.
    visit(path, ".")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _read_cache(cache: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {k: z[k] for k in z.files if k != "fingerprint"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # unreadable cache: decode again
        return None


def _write_cache(cache: Path, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, fingerprint=np.array(fingerprint), **arrays)

    try:
        atomic_write(cache, write)
    except OSError as e:
        warnings.warn(f"could not cache decoded arrays in {cache} ({e}); the next load decodes again")


def _decode(layout: str, path: Path, *, name: str, cache_dir: Path, progress: bool,
            image_size: int | None) -> dict[str, np.ndarray]:
    """Arrays train_images/labels, test_images/labels, classes, layout (images (N, 3, H, W) uint8), and for each
    further label set (CIFAR-100's coarse) its classes and labels (names from _array_names)."""
    if layout == "archive":
        return _decode_archive(path, name=name, cache_dir=cache_dir, progress=progress, image_size=image_size)
    if layout == "image-folder":
        names, (train_x, train_y), (test_x, test_y) = _decode_image_folder(path, progress=progress,
                                                                           image_size=image_size)
        classes, train_y, test_y = {"fine": names}, {"fine": train_y}, {"fine": test_y}
    elif image_size is not None:
        raise ConfigError(f"--image-size (data.image_size) resizes the images of an image folder; {path} is "
                          f"{layout}, all 32x32: use --input-size {image_size} to resize the network input instead")
    else:
        fmt = _FORMATS[layout]
        missing = [f for f in (*fmt.train, *fmt.test, fmt.meta) if not (path / f).is_file()]
        if missing:
            raise DataError(f"{path} ({layout}) lacks {', '.join(missing)}; "
                            f"expected {', '.join((*fmt.train, *fmt.test, fmt.meta))}")
        classes = fmt.read_classes(path / fmt.meta)
        num_classes = {label_set: len(names) for label_set, names in classes.items()}
        train_x, train_y = _concat([fmt.read_batch(path / f, num_classes) for f in fmt.train])
        test_x, test_y = _concat([fmt.read_batch(path / f, num_classes) for f in fmt.test])
    arrays = {"train_images": train_x, "test_images": test_x, "layout": np.array(layout)}
    for label_set, names in classes.items():
        classes_name, train_name, test_name = _array_names(label_set)
        arrays |= {classes_name: np.array(names), train_name: train_y[label_set], test_name: test_y[label_set]}
    return arrays


def _concat(batches: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return (np.concatenate([x for x, _ in batches]),
            {label_set: np.concatenate([y[label_set] for _, y in batches]) for label_set in batches[0][1]})


def _decode_archive(archive: Path, *, name: str, cache_dir: Path, progress: bool,
                    image_size: int | None) -> dict[str, np.ndarray]:
    # Extracted only for decoding, then deleted: the decoded cache is keyed on the archive itself.
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    try:
        extract_archive(archive, tmp)
        inner = _find(tmp, name, any_archive=False)
        if inner is None or inner[0] == "archive":
            held = [other for other in NAMES if other != name and _find(tmp, other, any_archive=False)]
            if held:
                raise DataError(f"{archive} holds {held[0]}, not {name}; pass name={held[0]!r} (--dataset {held[0]})")
            raise DataError(f"{archive} holds no dataset; accepted layouts: {_LAYOUT_HELP}")
        return _decode(*inner, name=name, cache_dir=cache_dir, progress=progress, image_size=image_size)
    except (DataError, ConfigError) as e:
        # Name the file inside the archive, not the temporary folder it was extracted to (deleted below).
        raise type(e)(str(e).replace(str(tmp), str(archive))) from e.__cause__
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _decode_image_folder(root: Path, *, progress: bool, image_size: int | None) -> tuple[list[str], tuple, tuple]:
    """(classes, (train images, labels), (test images, labels)); classes = sorted folder names."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: missing split folder {split}/; an image folder needs train/<class>/* and test/<class>/*")
    classes = {split: sorted(d.name for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith("."))
               for split in ("train", "test")}
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise DataError(f"{root}: train/ and test/ must have the same class folders; "
                        f"only in train/: {only_train or 'none'}, only in test/: {only_test or 'none'}")
    if not classes["train"]:
        raise DataError(f"{root}: train/ and test/ hold no class folders")
    files, labels = {}, {}
    for split in ("train", "test"):
        files[split], labels[split] = [], []
        for label, cls in enumerate(classes["train"]):
            found = sorted(str(f) for f in (root / split / cls).iterdir() if f.is_file() and not f.name.startswith("."))
            if not found:
                raise DataError(f"{root / split / cls}: empty class folder; every class needs at least one image")
            files[split] += found
            labels[split] += [label] * len(found)
    n_train = len(files["train"])
    size = None if image_size is None else (image_size, image_size)
    images = read_images(files["train"] + files["test"], size=size, crop=True, progress=progress)
    return (classes["train"], (images[:n_train], np.array(labels["train"], dtype=np.int64)),
            (images[n_train:], np.array(labels["test"], dtype=np.int64)))


def read_images(paths: list[str], *, size: tuple[int, int] | None = None, crop: bool = False,
                progress: bool = False) -> np.ndarray:
    """Decode image files to one (N, 3, H, W) uint8 array, in worker processes when there are many (Pillow holds
    the GIL for most of the work on small images, so threads would not help). size (H, W): images of another size
    are resized to it as `decode_image` does (with `crop`); None: every image must have the first one's size."""
    resize = size is not None
    size = size if resize else _read_image(paths[0]).shape[:2]
    tasks = [paths[i:i + _IMAGES_PER_TASK] for i in range(0, len(paths), _IMAGES_PER_TASK)]
    decode = partial(_decode_images, size=size, resize=resize, crop=crop, first=paths[0])
    chunks = []
    with tqdm(total=len(paths), unit="img", desc="decoding images", disable=not progress) as bar:
        if len(tasks) == 1:  # a pool costs more to start than a few hundred images take
            chunks.append(decode(tasks[0]))
            bar.update(len(paths))
        else:
            with ProcessPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1)) as pool:
                for chunk in pool.map(decode, tasks):
                    chunks.append(chunk)
                    bar.update(len(chunk))
    return np.concatenate(chunks)


def _decode_images(paths: list[str], *, size: tuple[int, int], resize: bool, crop: bool, first: str) -> np.ndarray:
    images = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        image = _read_image(path, size if resize else None, crop=crop)
        if image.shape[:2] != size:
            raise DataError(f"images of two sizes: {path} is {image.shape[1]}x{image.shape[0]} pixels, {first} is "
                            f"{size[1]}x{size[0]}; pass --image-size N (config data.image_size) to resize them all "
                            "to N x N as they are decoded")
        images[i] = image
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)


def _read_image(path: str, size: tuple[int, int] | None = None, *, crop: bool = False) -> np.ndarray:
    try:
        return decode_image(path, size, crop=crop)
    except Exception as e:  # Pillow signals broken files with OSError, SyntaxError, ValueError, ...
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def decode_image(path: str | Path, size: tuple[int, int] | None = None, *, crop: bool = False) -> np.ndarray:
    """An image file as (H, W, 3) uint8, resized (bilinear) to size (H, W) when given; grayscale, palette and
    RGBA images are converted to RGB. Pillow's errors propagate, for the caller to name the file in its terms.

    `crop` keeps the aspect ratio, as torchvision's Resize + CenterCrop do: the image is scaled to cover `size`
    (the shorter side fits), then its centre is cut out; without it the image is stretched to `size`.
    """
    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size[1], size[0]):
            image = _cover_and_crop(image, size) if crop else image.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(image)


def _cover_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    # Integer arithmetic, as torchvision's Resize(int): the fitting side exact, the other one truncated.
    if width * image.height >= height * image.width:
        scaled = (width, image.height * width // image.width)
    else:
        scaled = (image.width * height // image.height, height)
    if scaled != image.size:
        image = image.resize(scaled, Image.BILINEAR)
    top, left = round((scaled[1] - height) / 2), round((scaled[0] - width) / 2)  # torchvision's CenterCrop offsets
    return image.crop((left, top, left + width, top + height))


# --- subsets --------------------------------------------------------------------------------------

def stratified_indices(labels: Tensor, n: int, *, seed: int) -> Tensor:
    """`n` sorted indices drawn with equal counts per class as far as the classes allow.

    Classes too small for an equal share give all they have; the rest is spread evenly over the
    others, and the classes receiving one extra (when `n` does not divide) are drawn by `seed`.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if not 0 <= n <= len(labels):
        raise ConfigError(f"cannot draw {n} examples: only {len(labels)} exist")
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    # Water-filling: the largest per-class level `share` with sum(min(count, share)) <= n.
    remaining, left, share = n, len(classes), 0
    for count in counts.sort().values.tolist():
        share = remaining // left
        if count > share:
            break
        remaining, left = remaining - count, left - 1
    quota = counts.clamp(max=share)
    open_classes = (counts > share).nonzero().flatten()
    extra = open_classes[torch.randperm(len(open_classes), generator=generator)[: n - int(quota.sum())]]
    quota[extra] += 1
    picked = []
    for cls, q in zip(classes.tolist(), quota.tolist()):
        members = (labels == cls).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:q]])
    return torch.cat(picked).sort().values


def stratified_split(labels: Tensor, n_holdout: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """(keep, holdout): sorted disjoint indices covering all examples; holdout is stratified."""
    holdout = stratified_indices(labels, n_holdout, seed=seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[holdout] = False
    return mask.nonzero().flatten(), holdout
