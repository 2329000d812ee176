"""Tests for cifarlab.data.download against a local HTTP server (the machine has no internet)."""
from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from cifarlab.data import download as dl
from cifarlab.data.download import ARCHIVES, default_cache_dir, download, download_dataset, extract_archive
from cifarlab.data.sources import load_dataset
from cifarlab.errors import DataError
from test_data_sources import write_cifar10_python  # pytest puts tests/ on sys.path


class _Server:
    """Serves `files` (url path -> bytes) on 127.0.0.1, honouring `Range: bytes=N-` unless told not to."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.cut_at: int | None = None  # drop the connection after this many body bytes
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                wanted = self.headers.get("Range")
                server.requests.append((self.path, wanted))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted and server.honour_range else 0
                if start >= len(body) > 0:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:server.cut_at])

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    thread = threading.Thread(target=s.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _cifar10_archive(tmp_path: Path) -> bytes:
    write_cifar10_python(tmp_path / "src" / "cifar-10-batches-py")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buffer.getvalue()


BODY = bytes(range(256)) * 4000  # ~1 MB, so a download spans several reads


def test_full_download(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    dest = download(server.url + "/f.bin", tmp_path / "sub" / "f.bin", md5=_md5(BODY), progress=False)
    assert dest == tmp_path / "sub" / "f.bin" and dest.read_bytes() == BODY
    assert not (tmp_path / "sub" / "f.bin.part").exists()
    download(server.url + "/f.bin", dest, md5=_md5(BODY), progress=False)
    assert len(server.requests) == 1  # a verified file is not fetched again


def test_md5_mismatch_removes_the_file(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    with pytest.raises(DataError, match=f"MD5 {_md5(BODY)}, expected 0123"):
        download(server.url + "/f.bin", tmp_path / "f.bin", md5="0123", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_resume_from_partial_file(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    (tmp_path / "f.bin.part").write_bytes(BODY[:300_000])
    download(server.url + "/f.bin", tmp_path / "f.bin", md5=_md5(BODY), progress=False)
    assert server.requests == [("/f.bin", "bytes=300000-")]
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_interrupted_download_keeps_part_and_resumes(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    server.cut_at = 123_456
    with pytest.raises(DataError, match="interrupted .* run again to resume"):
        download(server.url + "/f.bin", tmp_path / "f.bin", md5=_md5(BODY), progress=False)
    assert (tmp_path / "f.bin.part").read_bytes() == BODY[:123_456]
    server.cut_at = None
    download(server.url + "/f.bin", tmp_path / "f.bin", md5=_md5(BODY), progress=False)
    assert server.requests[-1] == ("/f.bin", "bytes=123456-") and (tmp_path / "f.bin").read_bytes() == BODY


def test_server_ignoring_range_restarts(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    server.honour_range = False
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes that must not be kept")
    download(server.url + "/f.bin", tmp_path / "f.bin", md5=_md5(BODY), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_complete_part_file_answered_416_restarts(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    (tmp_path / "f.bin.part").write_bytes(BODY + b"extra")
    download(server.url + "/f.bin", tmp_path / "f.bin", md5=_md5(BODY), progress=False)
    assert [r for _, r in server.requests] == [f"bytes={len(BODY) + 5}-", None]
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_http_and_connection_errors(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot download .*/missing: HTTP 404"):
        download(server.url + "/missing", tmp_path / "f", md5="0", progress=False)
    with pytest.raises(DataError, match="cannot download http://127.0.0.1:9/x"):
        download("http://127.0.0.1:9/x", tmp_path / "f", md5="0", progress=False)


def test_download_dataset_extracts_once(server: _Server, tmp_path: Path) -> None:
    body = _cifar10_archive(tmp_path)
    server.files["/c10.tar.gz"] = body
    folder = download_dataset("cifar10", cache_dir=tmp_path / "cache", url=server.url + "/c10.tar.gz", md5=_md5(body))
    assert folder == tmp_path / "cache" / "cifar-10-batches-py" and (folder / "data_batch_5").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert download_dataset("cifar10", cache_dir=tmp_path / "cache", url=server.url + "/c10.tar.gz") == folder
    assert len(server.requests) == 1
    with pytest.raises(DataError, match="unknown dataset 'svhn'; downloadable: cifar10, cifar100, cifar10-binary"):
        download_dataset("svhn", cache_dir=tmp_path)


def test_load_dataset_downloads_into_the_cache(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    body = _cifar10_archive(tmp_path)
    server.files["/mirror/cifar-10-python.tar.gz"] = body
    # download_url is a mirror of the official file, so the official MD5 applies: swap in the fixture's.
    monkeypatch.setitem(ARCHIVES, "cifar10", dl.Archive(ARCHIVES["cifar10"].url, _md5(body), "cifar-10-batches-py"))
    cache = tmp_path / "cache"
    ds = load_dataset(None, cache_dir=cache, download=True, progress=False,
                      download_url=server.url + "/mirror/cifar-10-python.tar.gz")
    assert len(ds.train) == 20 and ds.source == f"cifar10-python:{(cache / 'cifar-10-batches-py').resolve()}"
    again = load_dataset(None, cache_dir=cache, download=False, progress=False)
    assert again.source == ds.source and len(server.requests) == 1


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CIFARLAB_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "cifarlab"


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buffer.getvalue()


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member, message", [
    (tarfile.TarInfo("/tmp/evil"), "unsafe member path '/tmp/evil'"),
    (tarfile.TarInfo("a/../../evil"), "unsafe member path 'a/../../evil'"),
    (_link("a/link", tarfile.SYMTYPE, "/etc/passwd"), "member 'a/link' is a link"),
    (_link("a/hard", tarfile.LNKTYPE, "/etc/passwd"), "member 'a/hard' is a link"),
])
def test_extract_rejects_unsafe_members(tmp_path: Path, member: tarfile.TarInfo, message: str) -> None:
    (tmp_path / "bad.tar.gz").write_bytes(_tar_with(member, b"owned"))
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=message):
        extract_archive(tmp_path / "bad.tar.gz", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == [] and not (tmp_path / "evil").exists()


def test_extract_rejects_corrupt_archive(tmp_path: Path) -> None:
    (tmp_path / "bad.tar.gz").write_bytes(_cifar10_archive(tmp_path)[:300])
    with pytest.raises(DataError, match="bad.tar.gz is not a readable tar archive"):
        extract_archive(tmp_path / "bad.tar.gz", tmp_path / "out")
