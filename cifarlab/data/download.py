"""Fetch the official CIFAR archives (Krizhevsky, 2009, https://www.cs.toronto.edu/~kriz/cifar.html)
into the cache: resumable HTTP download, MD5 check, safe tar extraction."""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from cifarlab.errors import DataError


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    folder: str  # the top-level folder inside the archive


_KRIZ = "https://www.cs.toronto.edu/~kriz"
ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(f"{_KRIZ}/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": Archive(f"{_KRIZ}/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
    "cifar10-binary": Archive(f"{_KRIZ}/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin"),
}
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """Where downloads and decoded arrays live: `$CIFARLAB_CACHE`, else `~/.cache/cifarlab`."""
    return Path(os.environ.get("CIFARLAB_CACHE") or Path.home() / ".cache" / "cifarlab").expanduser()


def download(url: str, dest: str | Path, *, md5: str, progress: bool = True) -> Path:
    """Download `url` to `dest` and check its MD5.

    Bytes stream into `dest.part`, which a later call resumes with an HTTP Range request;
    `dest` appears (atomic rename) only once the MD5 matches. A mismatch removes the bad file.
    """
    dest = Path(dest)
    if dest.is_file() and _md5(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _fetch(url, part, progress=progress)
    actual = _md5(part)
    if actual != md5:
        part.unlink()
        raise DataError(f"download of {url} is corrupt: MD5 {actual}, expected {md5}; the bad file was removed, run again")
    # io.atomic_write does not fit: a resumable download needs a stable `.part` name.
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, *, progress: bool) -> None:
    start = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the .part is as long as the file (or longer): start over
            part.unlink()
            return _fetch(url, part, progress=progress)
        raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except OSError as e:  # includes URLError: refused, unreachable, unknown host, timeout
        raise DataError(f"cannot download {url}: {getattr(e, 'reason', e)}") from e
    with response:
        # A server that ignores Range answers 200 with the whole file: restart instead of appending.
        resumed = start > 0 and response.status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {start}-")
        length = int(response.headers.get("Content-Length") or 0)
        done = start if resumed else 0
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=done + length or None, initial=done, unit="B", unit_scale=True,
            desc=Path(url).name, disable=not progress,
        ) as bar:
            received = 0
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise DataError(f"download of {url} was interrupted ({e}); run again to resume from {part}") from e
    # http.client ends a body cut short by a dropped connection silently: compare with Content-Length.
    if received < length:
        raise DataError(f"download of {url} was interrupted after {received} of {length} bytes; run again to resume from {part}")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def extract_archive(archive: str | Path, dest: str | Path) -> None:
    """Extract a tar archive into `dest`, refusing absolute paths, `..` and links.

    Members are written one by one (no `extractall`), so nothing outside `dest` is ever touched.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts:
                    raise DataError(f"{archive}: unsafe member path {member.name!r} (absolute or with '..')")
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"{archive}: member {member.name!r} is a link or special file; only files and folders are allowed")
                target = dest.joinpath(*name.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{archive} is not a readable tar archive: {e}") from e


def download_dataset(
    name: str = "cifar10", *, cache_dir: str | Path | None = None,
    url: str | None = None, md5: str | None = None, progress: bool = True,
) -> Path:
    """Download the official archive `name` into the cache, extract it, return the extracted folder.

    `url` replaces the official address (a mirror, or a local server in tests); `md5` the official sum.
    """
    if name not in ARCHIVES:
        raise DataError(f"unknown dataset {name!r}; downloadable: {', '.join(ARCHIVES)}")
    entry = ARCHIVES[name]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / entry.folder
    if folder.is_dir():
        return folder
    archive = download(url or entry.url, cache_dir / Path(entry.url).name, md5=md5 or entry.md5, progress=progress)
    # Extract beside the target, then rename: an interrupted extraction never looks like a dataset.
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    try:
        extract_archive(archive, tmp)
        if not (tmp / entry.folder).is_dir():
            raise DataError(f"{archive} does not contain the folder {entry.folder}/")
        os.replace(tmp / entry.folder, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
