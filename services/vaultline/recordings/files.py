"""The recording store: a directory of encrypted recordings, one file per recording SID.

Files are written as Twilio sent them (still encrypted), atomically: a temporary file in the
same directory, fsync, rename, fsync of the directory; then read back and hashed, so a file is
only called durable once what is on disk is what was downloaded. 0600 files in a 0700
directory. Blocking calls: run them in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Final

__all__ = ["RecordingFiles", "StoreError"]

_NAME: Final = re.compile(r"RE[0-9a-f]{32}\.wav\.enc\Z")


class StoreError(OSError):
    """The recording store cannot keep or give a file."""


class RecordingFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"RecordingFiles({self.directory})"

    @staticmethod
    def name_for(sid: str) -> str:
        name = f"{sid}.wav.enc"
        if not _NAME.match(name):
            raise StoreError(f"not a recording sid: {sid[:40]!r}")
        return name

    def _path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise StoreError("not a recording file name")
        return self.directory / name

    def put(self, sid: str, data: bytes) -> tuple[str, bytes]:
        """Keep `data` durably as the recording's file; (its name, SHA-256), verified."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = self.name_for(sid)
        final = self._path(name)
        temp = self.directory / f".{name}.{os.getpid()}.tmp"
        digest = hashlib.sha256(data).digest()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if hashlib.sha256(final.read_bytes()).digest() != digest:
            raise StoreError(f"{name}: what is on disk is not what was written")
        return name, digest

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{name} is not in the recording store") from None

    def exists(self, name: str) -> bool:
        return bool(name) and self._path(name).is_file()

    def delete(self, name: str) -> bool:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return False
        return True
