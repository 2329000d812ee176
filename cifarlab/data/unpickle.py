"""Read the pickled CIFAR "python version" files without running code from them.

The official batches are Python 2 pickles of dicts (bytes keys) holding numpy arrays, lists and
bytes. A plain `pickle.load` would call any function a crafted file names; this unpickler
resolves only the few globals those files need and refuses everything else.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.errors import DataError

# numpy pickles an array as `_reconstruct(ndarray, shape, dtype)` + state (protocols <= 4) or
# `_frombuffer(buffer, dtype, shape, order)` (protocol 5); their modules are `numpy.core.*` in the
# official files and `numpy._core.*` when numpy >= 2 writes. `_codecs.encode` is how Python 3
# writes bytes under protocol 2. None of these can run code.
_RECONSTRUCT = np.zeros(0).__reduce_ex__(2)[0]
_FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # written by Python 2: its `str` is bytes
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: refuses to load {module}.{name}; a CIFAR pickle only holds numpy arrays, "
                "lists and bytes (the file is not an official CIFAR batch, or was tampered with)"
            ) from None


def load_pickle(path: str | Path) -> Any:
    """Unpickle a CIFAR python-version file (dict with bytes keys) safely."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbled pickles raise many types (EOFError, UnpicklingError, ValueError...)
        raise DataError(f"{path} is not a readable CIFAR pickle: {type(e).__name__}: {e}") from e
