"""`cifarlab env`: every field printed, the precision `auto` picks with the CPU faked both ways, the data it finds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab import __version__, hardware
from cifarlab.cli import main
from cifarlab.environment import gather_environment

AVX2_ONLY = hardware.CpuInfo(model="AMD EPYC (AVX2)", flags=frozenset({"avx", "avx2", "fma"}))
AMX = hardware.CpuInfo(model="Intel Xeon (Sapphire Rapids)", flags=frozenset({"avx2", "avx512f", "amx_bf16"}))


def test_env_prints_one_line_per_field(capsys):
    assert main(["env", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in out.splitlines() if not line.startswith(" ")}
    for key in ("cifarlab", "torch", "numpy", "opacus", "tensorboard", "python", "os", "cpu", "threads", "devices",
                "--device auto", "cache", "$CIFARLAB_DATA", "datasets"):
        assert key in lines, key
    assert __version__ in lines["cifarlab"] and torch.__version__ in lines["torch"]
    assert hardware.cpu_info().isa in lines["cpu"]
    assert lines["threads"].split()[1:] == ["1", "(--threads)"]
    assert "cpu: " in lines["devices"] and "auto precision" in lines["devices"]


@pytest.mark.parametrize("cpu, precision, reason", [
    (AVX2_ONLY, "fp32", "auto: CPU lacks native bf16"),
    (AMX, "bf16", "auto: CPU has native bf16"),
], ids=["avx2", "amx"])  # fmt: skip
def test_the_precision_line_says_what_auto_picks_and_why(monkeypatch, cpu, precision, reason):
    monkeypatch.setattr(hardware, "cpu_info", lambda: cpu)
    env = gather_environment()
    assert env.devices[0].precision.precision == precision
    line = next(line for line in env.format().splitlines() if line.startswith("devices"))
    assert f"cpu: {cpu.model}; auto precision {precision} ({reason}" in line
    assert cpu.isa in env.format()


def test_threads_come_from_the_flag_the_environment_or_the_cores(monkeypatch):
    monkeypatch.delenv(hardware.THREADS_ENV, raising=False)
    assert (gather_environment().threads, gather_environment().threads_source) == (
        hardware.available_cores(), "the cores this process may use")
    monkeypatch.setenv(hardware.THREADS_ENV, "3")
    env = gather_environment()
    assert (env.threads, env.threads_source) == (3, "$CIFARLAB_THREADS")
    env = gather_environment(threads="2")
    assert (env.threads, env.threads_source) == (2, "--threads")


def test_cache_size_and_the_datasets_found(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "cifar-10-batches-py").mkdir(parents=True)
    (cache / "cifar-10-batches-py" / "batches.meta").write_bytes(b"x" * 300)
    (cache / "cifar-10-python.tar.gz").write_bytes(b"x" * 1000)  # official archive name: found by name alone
    (cache / "decoded").mkdir()
    with open(cache / "decoded" / "0123.npz", "wb") as f:
        np.savez(f, fingerprint=np.array("f"), layout=np.array("cifar10-python"), classes=np.array(["a", "b"]),
                 train_labels=np.zeros(7, dtype=np.int64), test_labels=np.zeros(3, dtype=np.int64))
    expected_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    folder = tmp_path / "mine" / "pictures"  # an image folder one level down, as ../shared/datasets holds them
    for split, count in (("train", 4), ("test", 2)):
        for name in ("cat", "dog"):
            (folder / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32)).save(folder / split / name / f"{i}.png")
    monkeypatch.setenv("CIFARLAB_CACHE", str(cache))
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "nowhere"))

    env = gather_environment(data=tmp_path / "mine")
    assert env.cache_dir == cache and env.cache_source == "$CIFARLAB_CACHE" and env.cache_bytes == expected_bytes
    found = {(d.where, d.path.name): (d.dataset, d.layout, d.detail) for d in env.datasets}
    assert found == {
        ("cache", "cifar-10-batches-py"): ("cifar10", "cifar10-python", "300 B"),
        ("cache", "cifar-10-python.tar.gz"): ("cifar10", "archive", "1.0 KB"),
        ("--data", "pictures"): (None, "image-folder", "2 classes, 8 train + 4 test images"),
    }
    (decoded,) = env.decoded
    assert (decoded.layout, decoded.classes, decoded.train_images, decoded.test_images) == ("cifar10-python", 2, 7, 3)
    text = env.format()
    assert f"{cache} ($CIFARLAB_CACHE)" in text
    assert f"$CIFARLAB_DATA: nothing found in {tmp_path / 'nowhere'}" in text
    assert "decoded cifar10-python, 2 classes, 7 + 3 images" in text


def test_an_empty_cache_says_what_train_would_do(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "empty"))
    env = gather_environment()
    assert env.cache_bytes == 0 and env.datasets == () and env.decoded == ()
    assert "none (cifarlab train downloads CIFAR-10 into the cache)" in env.format()
