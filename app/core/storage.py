"""The artifact store: where uploads and sanitized models live, addressed by keys such as
``jobs/<id>/model.pt``. The database keeps each file's key, size and sha256.

Files arrive through a ``StagedFile`` (a hashed temporary file written chunk by chunk) and are
moved into place by ``put`` only once they are complete and checked, so a failed upload never
leaves a partial artifact behind.
"""

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

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

    def local_path(self, key: str) -> Path:
        """A path the worker can hand to the engine (a remote store would download first)."""

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


def read_chunks(file: BinaryIO) -> Iterator[bytes]:
    with file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk
