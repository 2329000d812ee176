"""Atomic file writes and safe loads: a crash or a full disk never leaves half a file behind."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

_ZIP_MAGIC = b"PK\x03\x04"  # how every torch.save file (a zip archive) begins


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then rename tmp_path over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes the file private (0600); give it an ordinary mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def check_writable_folder(path: str | Path, *, what: str) -> None:
    """Refuse, before any work, an output folder that cannot be made: its nearest existing ancestor must be a
    folder this process may write into (or the folder itself exists and is writable)."""
    from cifarlab.errors import CifarlabError

    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise CifarlabError(f"cannot write the {what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CifarlabError(f"cannot write the {what} {path}: no permission to write in {existing}")


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """A header of `columns`, then one line per row; None and missing cells are left empty, a key outside
    `columns` is a ValueError."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return write_text(path, buffer.getvalue())


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def save_tensors(path: str | Path, payload: Any) -> Path:
    """torch.save a dict of tensors and plain values atomically (checkpoints, states, posterior samples)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_tensors(path: str | Path, *, what: str) -> Any:
    """Read what `save_tensors` wrote with `weights_only=True`: tensors and plain containers only, never code.

    Raises CheckpointError naming the file and `what` it should have been when it is missing or unreadable.
    """
    import torch

    from cifarlab.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickles before refusing them; the error says it
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated files, other formats, pickles with code: all refused here
        # torch's own message advises weights_only=False, the one thing never to do with a file one did not make.
        raise CheckpointError(_unreadable(path, what=what, error=error)) from None


def _unreadable(path: Path, *, what: str, error: Exception) -> str:
    """Why torch.load refused `path`, in one sentence: cut short, or never a file cifarlab wrote."""
    foreign = f"{path} is not a cifarlab {what}"
    if zipfile.is_zipfile(path):  # the archive is whole: its contents are foreign or damaged
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") for name in archive.namelist()):
                return f"{foreign} (a zip archive, but not one torch.save wrote)"
        if isinstance(error, pickle.UnpicklingError):
            return (f"{foreign}: it holds Python objects other than tensors and plain values, which are never "
                    "loaded because loading them can run code")
        return f"{path} is corrupted (a torch.save archive whose contents do not read back)"
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head == _ZIP_MAGIC:  # the start of a torch.save archive without its end
        return f"{path} is truncated or corrupted (a torch.save archive without its end)"
    return f"{foreign} (not a file torch.save wrote)"


def write_yaml(path: str | Path, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_yaml(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _jsonable(obj: Any) -> Any:
    # numpy scalars/arrays and Paths show up in metrics; everything else is a bug.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
