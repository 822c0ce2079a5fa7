"""The artifact store: where uploads and sanitized models live, addressed by keys such as
``jobs/<id>/model.pt``. The database keeps each file's key, size and sha256.

Files arrive through a ``StagedFile`` (a hashed temporary file written chunk by chunk) and are
moved into place by ``put`` only once they are complete and checked, so a failed upload never
leaves a partial artifact behind.

Two stores: a directory (``LocalArtifactStore``, shared by NFS when workers run on several
hosts), or a bucket of S3 or an S3-compatible server (``S3ArtifactStore``, through fsspec's
s3fs), chosen by ``make_artifact_store`` from the settings.
"""

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from app.core.config import Settings

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    key: str
    size: int
    sha256: str


class StagedFile:
    """A local temporary file that counts and hashes what is written to it."""

    def __init__(self, path: Path):
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def copy_from(self, source: Path) -> None:
        with open(source, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                self.write(chunk)

    def close(self) -> None:
        self._file.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class ArtifactStore(Protocol):
    def stage(self) -> StagedFile:
        """A new temporary file to stream into; ``discard`` it or ``put`` it."""

    def put(self, staged: StagedFile, key: str) -> StoredFile:
        """Moves a complete staged file to ``key``."""

    def open(self, key: str) -> BinaryIO: ...

    def local_copy(self, key: str) -> AbstractContextManager[Path]:
        """The artifact as a local file the worker can hand to the engine, for the length of the
        ``with`` block (a remote store downloads it, and removes the copy afterwards)."""

    def delete_prefix(self, prefix: str) -> None:
        """Removes every artifact under ``prefix`` (a job's folder); missing ones are fine."""


class LocalArtifactStore:
    """Artifacts as files under one directory; staging lives in the same file system, so moving a
    finished upload into place is an atomic rename."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)

    def stage(self) -> StagedFile:
        return StagedFile(self.staging / uuid.uuid4().hex)

    def put(self, staged: StagedFile, key: str) -> StoredFile:
        staged.close()
        target = self.local_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, target)
        return StoredFile(key, staged.size, staged.sha256)

    def open(self, key: str) -> BinaryIO:
        return open(self.local_path(key), "rb")

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        yield self.local_path(key)

    def local_path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"artifact key {key!r} points outside the store")
        return path

    def delete_prefix(self, prefix: str) -> None:
        path = self.local_path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class S3ArtifactStore:
    """Artifacts as objects under ``s3://BUCKET/PREFIX/``, so workers on several hosts share them
    without a shared disk. Staging is a local file; ``put`` uploads it once it is complete (an
    object appears whole or not at all, as S3 makes multipart uploads visible only when they are
    completed). Credentials come from the usual AWS_* variables (or the host's role)."""

    def __init__(self, url: str, endpoint_url: str | None, staging: Path):
        self.root = url.removeprefix("s3://").rstrip("/")
        self.filesystem = s3_filesystem(endpoint_url)
        self.staging = staging
        self.staging.mkdir(parents=True, exist_ok=True)

    def stage(self) -> StagedFile:
        return StagedFile(self.staging / uuid.uuid4().hex)

    def put(self, staged: StagedFile, key: str) -> StoredFile:
        staged.close()
        self.filesystem.put_file(str(staged.path), self.object_path(key))
        staged.path.unlink()
        return StoredFile(key, staged.size, staged.sha256)

    def open(self, key: str) -> BinaryIO:
        return self.filesystem.open(self.object_path(key), "rb", block_size=8 * CHUNK_BYTES)

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(dir=self.staging) as directory:
            path = Path(directory) / key.rsplit("/", 1)[-1]
            self.filesystem.get_file(self.object_path(key), str(path))
            yield path

    def delete_prefix(self, prefix: str) -> None:
        try:
            self.filesystem.rm(self.object_path(prefix), recursive=True)
        except FileNotFoundError:
            pass

    def object_path(self, key: str) -> str:
        if not key or {"", ".", ".."} & set(key.split("/")):
            raise ValueError(f"artifact key {key!r} is not a plain relative path")
        return f"{self.root}/{key}"


def s3_filesystem(endpoint_url: str | None):
    """An s3fs file system for AWS, or for the S3-compatible server at ``endpoint_url``."""
    import s3fs

    # No listings cache: other processes (the API, other workers) add and delete objects.
    return s3fs.S3FileSystem(endpoint_url=endpoint_url, use_listings_cache=False)


def make_artifact_store(settings: Settings) -> ArtifactStore:
    """The store the settings name: S3 with artifact_store_url, else the artifact_dir."""
    if settings.artifact_store_url:
        return S3ArtifactStore(settings.artifact_store_url, settings.s3_endpoint_url,
                               settings.data_dir / "staging")
    return LocalArtifactStore(settings.artifact_dir)


def read_chunks(file: BinaryIO) -> Iterator[bytes]:
    with file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk
