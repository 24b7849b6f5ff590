"""Shards that are not on a local disk: `http://` and `https://` URLs, and `pipe:COMMAND` (a shell
command that writes the shard to stdout, webdataset's convention: `pipe:aws s3 cp s3://b/000001.tar -`,
`pipe:curl -s URL`, `pipe:gsutil cat gs://...`).

A remote shard is streamed once into a local file in a per-process cache folder (1 MiB at a time,
never held in memory) and read there like a local shard, by seeking: that keeps the order and the
resume of the `webdataset` source exact. Each process keeps at most `open_shards` such files, the
least recently used are deleted, and the folder goes when the source does.

A transfer that fails with a connection error, a timeout, an HTTP 5xx or 429, a body shorter than its
Content-Length, or a pipe command that exits non-zero is retried `retries` times with exponential
backoff; an HTTP 4xx (the shard is not there) is not. What still fails raises `FetchError`, whose
message names the URL, what happened and how many tries were made.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

REMOTE_PREFIXES = ("http://", "https://", "pipe:")
CHUNK = 1 << 20
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class FetchError(OSError):
    """A remote shard or manifest that could not be fetched (after the retries, when they apply);
    `status` is the HTTP status of a refusal (404, ...), else None."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def is_remote(name: str) -> bool:
    return name.startswith(REMOTE_PREFIXES)


def display_name(name: str) -> str:
    """The last part of a path or URL (`000003.tar`), for messages."""
    tail = name.split()[-1] if name.startswith("pipe:") else name
    return tail.rstrip("/").rsplit("/", 1)[-1] or name


def sibling(url: str, name: str) -> str | None:
    """The URL of `name` in the same folder as the http(s) URL `url`; None for a pipe command."""
    if not url.startswith(("http://", "https://")):
        return None
    return url.rsplit("/", 1)[0] + "/" + name


class _Permanent(Exception):
    """A failure that retrying cannot mend (HTTP 4xx)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _copy_http(url: str, out, timeout: float) -> None:
    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http(s) only, checked above)
    except urllib.error.HTTPError as err:
        if err.code in RETRY_STATUS or err.code >= 500:
            raise OSError(f"HTTP {err.code} {err.reason}") from None
        raise _Permanent(f"HTTP {err.code} {err.reason}", err.code) from None
    with response:
        expected = response.headers.get("Content-Length")
        got = 0
        try:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                got += len(chunk)
        except http.client.HTTPException as err:  # IncompleteRead and kin are not OSErrors
            raise OSError(f"the transfer broke after {got} bytes: {err!r}") from None
    if expected is not None and got != int(expected):
        raise OSError(f"the transfer stopped after {got} of {expected} bytes")


def _copy_pipe(command: str, out, timeout: float) -> None:
    proc = subprocess.Popen(command, shell=True, stdout=out, stderr=subprocess.PIPE)  # noqa: S602 (the user's command)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise OSError(f"the command ran past {timeout:g} s") from None
    if proc.returncode != 0:
        message = err.decode("utf-8", "replace").strip().splitlines()
        raise OSError(
            f"the command exited with status {proc.returncode}" + (f": {message[-1]}" if message else "")
        )


def fetch(url: str, dest: Path, retries: int = 3, timeout: float = 60.0, backoff: float = 0.5) -> Path:
    """Stream the shard at `url` into `dest` (atomically: a partial transfer never has its name)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.part")
    tries = 0
    while True:
        tries += 1
        try:
            with open(tmp, "wb") as out:
                if url.startswith("pipe:"):
                    _copy_pipe(url[len("pipe:") :], out, timeout)
                else:
                    _copy_http(url, out, timeout)
            os.replace(tmp, dest)
            return dest
        except (_Permanent, ValueError) as err:  # ValueError: not a URL urllib can open
            tmp.unlink(missing_ok=True)
            raise FetchError(f"cannot fetch {url}: {err}", getattr(err, "status", None)) from None
        except OSError as err:  # URLError, timeouts, resets and short reads are OSErrors
            tmp.unlink(missing_ok=True)
            if tries > retries:
                raise FetchError(f"cannot fetch {url}: {err} (after {tries} tries)") from None
            time.sleep(backoff * 2 ** (tries - 1))


def fetch_bytes(url: str, retries: int = 3, timeout: float = 60.0) -> bytes:
    """A small remote file (a manifest), through a temporary file."""
    with tempfile.TemporaryDirectory(prefix="coalign-fetch-") as folder:
        return fetch(url, Path(folder) / "file", retries, timeout).read_bytes()


class ShardCache:
    """Local copies of remote shards for one process: a folder made on first use (inside `parent`),
    removed with the cache or at exit. A DataLoader worker gets a fresh cache (see `__getstate__`)
    whose folder lies inside the main process's, so it is removed with that one even when the
    worker exits without running its own finalizers."""

    def __init__(self, parent: str | None = None):
        self.parent = parent
        self.folder: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def _folder(self) -> Path:
        if self.folder is None:
            if self.parent is not None:
                Path(self.parent).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=f"coalign-shards-{os.getpid()}-", dir=self.parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        return self.folder

    def path(self, shard: int) -> Path:
        return self._folder() / f"{shard:08d}.tar"

    def drop(self, shard: int) -> None:
        if self.folder is not None:
            (self.folder / f"{shard:08d}.tar").unlink(missing_ok=True)

    def __getstate__(self) -> dict:
        return {"parent": str(self._folder())}  # a worker's copies go inside this process's folder

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["parent"])
