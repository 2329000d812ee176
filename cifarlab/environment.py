"""What this installation runs on and what data it sees: the facts a bug report needs, gathered in one place.

`gather_environment()` returns an `Environment`; `cifarlab env` prints its `format()`. Nothing here trains or
decodes: versions come from package metadata (no imports of optional packages), datasets from file layouts.
"""
from __future__ import annotations

import math
import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from cifarlab import __version__, hardware
from cifarlab.data import sources
from cifarlab.data.download import default_cache_dir

# Distribution names reported beside cifarlab; the optional ones show "not installed" where absent.
PACKAGES = ("numpy", "opacus", "torchvision", "timm", "tensorboard")  # besides torch, whose build it names
DATA_ENV = "CIFARLAB_DATA"
CACHE_ENV = "CIFARLAB_CACHE"


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "cpu", "cuda:0", "mps"
    name: str  # CPU model or GPU name
    precision: hardware.PrecisionChoice  # what `precision: auto` computes in there, and why


@dataclass(frozen=True)
class FoundDataset:
    where: str  # which place it was found in: "cache", "$CIFARLAB_DATA" or "--data"
    path: Path
    layout: str  # a sources layout: "cifar10-python", "archive", "image-folder", ...
    dataset: str | None  # "cifar10" / "cifar100"; None where the layout cannot tell (image folders)
    detail: str  # image counts, or the archive's size


@dataclass(frozen=True)
class DecodedArrays:
    """One `<cache>/decoded/*.npz`: a source decoded once, reused by every later run."""

    path: Path
    layout: str
    classes: int
    train_images: int
    test_images: int
    bytes: int


@dataclass(frozen=True)
class Environment:
    versions: dict[str, str | None]  # distribution -> version; None: not installed
    python: str
    os: str
    cpu: hardware.CpuInfo
    cores: int  # cores this process may use
    devices: tuple[DeviceInfo, ...]
    auto_device: str  # what `--device auto` picks
    threads: int  # torch intra-op threads cifarlab commands use
    threads_source: str
    cache_dir: Path
    cache_source: str  # "$CIFARLAB_CACHE" or "default"
    cache_bytes: int  # everything under cache_dir (downloads, extracted copies, decoded arrays)
    data_env: str | None  # $CIFARLAB_DATA
    searched: tuple[tuple[str, Path], ...]  # (where, folder) of each place looked in
    datasets: tuple[FoundDataset, ...]
    decoded: tuple[DecodedArrays, ...]

    def format(self) -> str:
        """One screen of `key  value` lines, for a terminal or a bug report."""
        lines = [("cifarlab", self.versions["cifarlab"] or "?")]
        lines += [(name, version or "not installed") for name, version in self.versions.items() if name != "cifarlab"]
        lines += [("python", self.python), ("os", self.os),
                  ("cpu", f"{self.cpu.model}; ISA {self.cpu.isa}; {self.cores} cores usable"),
                  ("threads", f"{self.threads} ({self.threads_source})")]
        for i, info in enumerate(self.devices):
            precision = f"auto precision {info.precision.precision} ({info.precision.reason})"
            lines.append(("devices" if i == 0 else "", f"{info.device}: {info.name}; {precision}"))
        lines.append(("--device auto", self.auto_device))
        lines.append(("cache", f"{self.cache_dir} ({self.cache_source}), {_size(self.cache_bytes)}"))
        lines.append(("$" + DATA_ENV, self.data_env or "not set"))
        found = [f"{d.where}: {d.dataset + ' as ' if d.dataset else ''}{d.layout} at {d.path} ({d.detail})"
                 for d in self.datasets]
        found += [f"{where}: nothing found in {root}" for where, root in self.searched
                  if where != "cache" and not any(d.where == where for d in self.datasets)]
        found += [f"cache: decoded {d.layout}, {d.classes} classes, {d.train_images} + {d.test_images} images "
                  f"({_size(d.bytes)}, {d.path.name})" for d in self.decoded]
        for i, text in enumerate(found or ["none (cifarlab train downloads CIFAR-10 into the cache)"]):
            lines.append(("datasets" if i == 0 else "", text))
        width = max(len(key) for key, _ in lines)
        return "\n".join(f"{key:{width}s}  {value}" for key, value in lines)


def gather_environment(*, threads: int | str | None = None, data: str | Path | None = None,
                       cache_dir: str | Path | None = None) -> Environment:
    """The environment as cifarlab sees it; `threads` is a --threads value, `data` a --data path to look in."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data_env = os.environ.get(DATA_ENV) or None
    places = [("cache", cache, False)]  # (where, root, any archive name): the rules load_dataset applies to each
    places += [("$" + DATA_ENV, Path(data_env).expanduser(), True)] if data_env else []
    places += [("--data", Path(data).expanduser(), True)] if data is not None else []
    return Environment(
        # torch's own version string names its build (+cpu, +cu121), which the distribution's metadata may not
        versions={"cifarlab": __version__, "torch": torch.__version__, **{name: _version(name) for name in PACKAGES}},
        python=f"{platform.python_version()} ({sys.executable})",
        os=platform.platform(),
        cpu=hardware.cpu_info(),
        cores=hardware.available_cores(),
        devices=_devices(),
        auto_device=str(hardware.resolve_device("auto")),
        threads=hardware.thread_count(threads),
        threads_source=_threads_source(threads),
        cache_dir=cache,
        cache_source="$" + CACHE_ENV if os.environ.get(CACHE_ENV) else "default",
        cache_bytes=_tree_bytes(cache),
        data_env=data_env,
        searched=tuple((where, root) for where, root, _ in places),
        datasets=tuple(found for where, root, any_archive in places for found in _datasets(where, root, any_archive)),
        decoded=_decoded(cache / "decoded"),
    )


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> tuple[DeviceInfo, ...]:
    cpu = torch.device("cpu")
    devices = [DeviceInfo("cpu", hardware.cpu_info().model, hardware.choose_precision(cpu))]
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        cuda = torch.device("cuda", index)
        devices.append(DeviceInfo(str(cuda), torch.cuda.get_device_name(cuda), hardware.choose_precision(cuda)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps = torch.device("mps")
        devices.append(DeviceInfo("mps", "Apple GPU (MPS)", hardware.choose_precision(mps)))
    return tuple(devices)


def _threads_source(flag: int | str | None) -> str:
    """Mirrors hardware.thread_count's order: the flag, then the environment, then the usable cores."""
    if flag is not None:
        return "--threads"
    if os.environ.get(hardware.THREADS_ENV, "").strip():
        return "$" + hardware.THREADS_ENV
    return "the cores this process may use"


def _datasets(where: str, root: Path, any_archive: bool) -> list[FoundDataset]:
    """The sources `root` holds, itself or one level down: the places load_dataset looks in."""
    # sources' own layout rules, so this lists exactly what `cifarlab train --data root` could load
    own = sources.layout_of(root, any_archive=any_archive)
    if own is not None:
        candidates = [(own, root)]
    elif root.is_dir():
        children = (child for child in sorted(root.iterdir()) if not child.name.startswith("."))
        candidates = [(layout, child) for child in children
                      if (layout := sources.layout_of(child, any_archive=False)) is not None]
    else:
        candidates = []
    return [FoundDataset(where, path, layout, sources.dataset_of(layout, path), _detail(layout, path))
            for layout, path in candidates]


def _detail(layout: str, path: Path) -> str:
    if layout == "image-folder":
        counts = {split: _files_below(path / split) for split in ("train", "test")}
        classes = sum(1 for d in (path / "train").iterdir() if d.is_dir()) if (path / "train").is_dir() else 0
        return f"{classes} classes, {counts['train']} train + {counts['test']} test images"
    return _size(_tree_bytes(path))


def _files_below(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    # os.scandir, not rglob: an image folder holds 60,000 files
    return sum(1 for d in os.scandir(folder) if d.is_dir() for f in os.scandir(d.path) if f.is_file())


def _decoded(folder: Path) -> tuple[DecodedArrays, ...]:
    found = []
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        try:
            with np.load(path, allow_pickle=False) as arrays:  # lazy: only the small members are read
                found.append(DecodedArrays(path, str(arrays["layout"]), len(arrays["classes"]),
                                           len(arrays["train_labels"]), len(arrays["test_labels"]),
                                           path.stat().st_size))
        except (OSError, ValueError, KeyError):  # half-written or foreign: the loader decodes again anyway
            continue
    return tuple(found)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # removed while walking (a run writing its cache)
                continue
    return total


def _size(count: int) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    power = min(len(units) - 1, int(math.log10(max(count, 1))) // 3)
    return f"{count} B" if power == 0 else f"{count / 1000**power:.1f} {units[power]}"
