"""cifarlab as users install it: a wheel built from the checkout, installed outside it, runs recipes end to end.

The build works on a copy of the build inputs, so the checkout gets no build/ folder from a test run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import write_image_folder
from cifarlab import __version__

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(path.name for path in (ROOT / "cifarlab" / "recipes").glob("*.yaml"))
BUILD_INPUTS = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what a build reads: the package and the top-level build files."""
    copy = tmp_path_factory.mktemp("source")
    shutil.copytree(ROOT / "cifarlab", copy / "cifarlab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_INPUTS:
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out)], cwd=source, check=True, capture_output=True)  # fmt: skip
    (built,) = out.glob("cifarlab-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    return target


def installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a command with only the installed copy importable, from a folder outside the checkout."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_wheel_ships_every_recipe(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"cifarlab/recipes/{name}" for name in RECIPES} <= names
    assert "fast-cpu.yaml" in RECIPES and "tutorial.yaml" in RECIPES


def test_the_sdist_ships_every_recipe(source: Path, tmp_path: Path):
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=source, check=True, capture_output=True, text=True)
    sdist = tmp_path / result.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
    assert {f"cifarlab-{__version__}/cifarlab/recipes/{name}" for name in RECIPES} <= names


def test_the_installed_package_lists_and_trains_a_recipe(site: Path, tmp_path: Path):
    python = sys.executable
    where = installed(site, tmp_path, python, "-c", "import cifarlab; print(cifarlab.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr  # not the checkout

    assert installed(site, tmp_path, python, "-m", "cifarlab", "--version").stdout.strip() == f"cifarlab {__version__}"
    recipes = installed(site, tmp_path, str(site / "bin" / "cifarlab"), "recipes")  # the console script
    listed = {line.split()[0] for line in recipes.stdout.splitlines()}
    assert {Path(name).stem for name in RECIPES} == listed, recipes.stderr

    images = write_image_folder(tmp_path / "images")
    run = tmp_path / "run"
    trained = installed(site, tmp_path, python, "-m", "cifarlab", "train", "--recipe", "tutorial", "--epochs", "1",
                        "--data", str(images), "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == "tutorial" and summary["epochs"] == 1
    assert (summary["train_images"], summary["test_images"]) == (60, 15) and summary["precision"] in ("fp32", "bf16")
