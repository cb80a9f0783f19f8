"""The robot's on-disk spool: episodes wait here until the object store has them.

  <spool>/<episode_id>/meta.json       written when the episode starts
  <spool>/<episode_id>/chunk-NNNNN.flc chunk objects (buffer/codec.py), appended while recording
  <spool>/<episode_id>/end.json        written when it ends, with every chunk's digests: sealed

end.json is written atomically (temp file + rename): it is the spool's commit point. Chunks
are written in place, once each (file creation is the costly part on a robot's disk); a chunk
cut short by a kill -9 is detected and dropped when the episode is recovered, since no sealed
end.json names it yet. The spool is bounded by `max_bytes`. When a chunk would not fit, the policy is
explicit: "drop-new" (default) abandons the episode being recorded and keeps everything already
waiting; "drop-oldest" deletes the oldest sealed, not yet uploaded episodes to make room. Either
way it is logged and counted (`dropped_episodes`), and the robot keeps running.

Deleting an uploaded episode is atomic too: the directory is first renamed to
`.removing-<episode_id>` and then emptied, so a kill -9 mid-delete leaves either the whole sealed
episode (uploaded again: idempotent) or a leftover that the next start deletes -- never a sealed
episode with some chunks gone, nor chunks without end.json that recovery would seal again as a
second, incomplete copy of an episode the store already has. An entry that is damaged anyway
(a chunk deleted by hand) is moved aside to `.damaged-<episode_id>` by the uploader, so it does not
block the episodes behind it.

With `durable` (the default) the spool survives a power cut, not only a killed process: chunk
and meta files are fsync'd as they are written (on the writer thread, off the control loop), and
end.json is fsync'd before its rename and its directory after, so a sealed episode on disk always
has its chunks. An end.json that is unreadable anyway (a disk without honest flushes) is not the
end of the episode: the uploader seals it again from its chunks, as after a crash (incomplete).

A disk that is really full (ENOSPC, EDQUOT) takes the same path as a full budget: SpoolFull,
the episode is dropped with a one-line warning. `bytes` counts what is on disk: a write that
fails takes back what it counted and removes what it left, so a disk that fills up once does
not make the spool refuse every later episode.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
from pathlib import Path

from fleetloop.files import fsync_dir, write_atomic

log = logging.getLogger(__name__)

POLICIES = ("drop-new", "drop-oldest")
REMOVING = ".removing-"  # an uploaded episode being deleted (purged at start)
DAMAGED = ".damaged-"    # a sealed episode the uploader could not read, kept for an operator


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class SpoolFull(Exception):
    pass


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _write_counted(spool: "Spool", path: Path, data: bytes, atomic: bool = False) -> None:
    """Write `data` to `path`; its bytes must already be counted in spool.bytes. On failure the
    count is taken back and a partial file removed; a full disk raises SpoolFull."""
    try:
        if atomic:
            write_atomic(path, data, durable=spool.durable)
        elif spool.durable:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # its name is made durable by the seal's directory sync
        else:
            path.write_bytes(data)
    except OSError as e:
        if not atomic:
            try:
                path.unlink()
            except OSError:
                pass
        with spool._lock:
            spool.bytes = max(0, spool.bytes - len(data))
        if e.errno in _DISK_FULL:
            raise SpoolFull(f"disk under spool {spool.root} is full: {e.strerror}") from None
        raise


class Spool:
    def __init__(self, root: str | os.PathLike, max_bytes: int = 2 * 1024 ** 3, on_full: str = "drop-new",
                 durable: bool = True):
        if on_full not in POLICIES:
            raise ValueError(f"spool on_full must be one of {POLICIES}, not {on_full!r}")
        if max_bytes <= 0:
            raise ValueError("spool max_bytes must be positive")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.on_full, self.durable = max_bytes, on_full, durable
        self._lock = threading.Lock()
        self.dropped_episodes = 0
        self.sealed_event = threading.Event()  # set whenever an episode is sealed (wakes the uploader)
        for d in self.root.glob(REMOVING + "*"):  # a delete cut short by a crash: finish it
            shutil.rmtree(d, ignore_errors=True)
        self.damaged = len(list(self.root.glob(DAMAGED + "*")))
        self.bytes = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    # -- recording side ---------------------------------------------------------------------
    def begin(self, episode_id: str, meta: dict) -> Path:
        d = self.root / episode_id
        try:
            d.mkdir(parents=True, exist_ok=False)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise SpoolFull(f"disk under spool {self.root} is full: {e.strerror}") from None
            raise
        data = json.dumps(meta).encode()
        with self._lock:
            self.bytes += len(data)
        _write_counted(self, d / "meta.json", data)
        if self.durable:
            fsync_dir(self.root)  # the episode's directory survives a power cut too
        return d

    def write_chunk(self, episode_id: str, index: int, data: bytes) -> None:
        """Raises SpoolFull when the chunk cannot be stored under the configured policy."""
        need = len(data)
        with self._lock:
            if self.bytes + need > self.max_bytes:
                if self.on_full == "drop-oldest":
                    self._evict_oldest_locked(need, keep=episode_id)
                if self.bytes + need > self.max_bytes:
                    raise SpoolFull(f"spool {self.root} full ({self.bytes} of {self.max_bytes} bytes)")
            self.bytes += need
        _write_counted(self, self.root / episode_id / f"chunk-{index:05d}.flc", data)

    def seal(self, episode_id: str, end: dict) -> None:
        data = json.dumps(end).encode()
        path = self.root / episode_id / "end.json"
        try:
            replaced = path.stat().st_size  # an unreadable seal being redone
        except FileNotFoundError:
            replaced = 0
        with self._lock:
            self.bytes += len(data) - replaced
        _write_counted(self, path, data, atomic=True)
        self.sealed_event.set()

    def drop(self, episode_id: str, why: str) -> None:
        self.remove(episode_id)
        with self._lock:
            self.dropped_episodes += 1
        log.warning("spool: dropped episode %s (%s)", episode_id, why)

    def _evict_oldest_locked(self, need: int, keep: str) -> None:
        for d in self._sealed_dirs():
            if self.bytes + need <= self.max_bytes:
                return
            if d.name == keep:
                continue
            size = _dir_size(d)
            gone = self.root / (REMOVING + d.name)
            try:
                os.rename(d, gone)  # all-or-nothing across a crash, as in remove()
            except FileNotFoundError:
                continue  # uploaded and removed meanwhile
            shutil.rmtree(gone, ignore_errors=True)
            self.bytes -= size
            self.dropped_episodes += 1
            log.warning("spool full: dropped oldest waiting episode %s (%d bytes) to keep recording", d.name, size)

    # -- uploading side ---------------------------------------------------------------------
    def _episode_dirs(self) -> list[Path]:
        return [d for d in self.root.iterdir() if not d.name.startswith(".")]

    def _sealed_dirs(self) -> list[Path]:
        sealed = []
        for d in self._episode_dirs():
            try:  # the uploader may delete a directory while we look
                sealed.append(((d / "end.json").stat().st_mtime_ns, d))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return [d for _t, d in sorted(sealed)]

    def sealed(self) -> list[str]:
        """Episode ids waiting for upload, oldest first."""
        return [d.name for d in self._sealed_dirs()]

    def unsealed(self) -> list[str]:
        return sorted(d.name for d in self._episode_dirs() if d.is_dir() and not (d / "end.json").exists())

    def path(self, episode_id: str) -> Path:
        return self.root / episode_id

    def remove(self, episode_id: str) -> None:
        """Delete an episode's directory, uncounting exactly the files that went away. The rename
        first makes the delete all-or-nothing across a crash (see the module docstring)."""
        d = self.root / episode_id
        gone = self.root / (REMOVING + episode_id)
        try:
            os.rename(d, gone)
        except FileNotFoundError:
            return
        freed = 0
        try:
            files = list(gone.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            files = []
        for f in files:
            try:
                size = f.stat().st_size
                f.unlink()
                freed += size
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("spool: could not delete %s: %s", f, e)
        try:
            gone.rmdir()
        except OSError:
            pass
        with self._lock:
            self.bytes = max(0, self.bytes - freed)

    def set_aside(self, episode_id: str, why: str) -> None:
        """Move a damaged sealed episode out of the upload queue, kept on disk for inspection."""
        try:
            os.rename(self.root / episode_id, self.root / (DAMAGED + episode_id))
        except FileNotFoundError:
            return  # removed meanwhile (evicted by drop-oldest): nothing left to set aside
        with self._lock:
            self.damaged += 1
        log.error("spool: episode %s is damaged (%s); moved to %s%s and skipped so the episodes "
                  "behind it upload", episode_id, why, DAMAGED, episode_id)

    def recount(self) -> int:
        """Recompute `bytes` from the disk (the accounting check the tests use)."""
        with self._lock:
            self.bytes = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
            return self.bytes

    def backlog(self) -> dict:
        return {"episodes": len(self.sealed()), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "dropped_episodes": self.dropped_episodes, "damaged_episodes": self.damaged}


def _dir_size(d: Path) -> int:
    try:
        return sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    except FileNotFoundError:
        return 0
