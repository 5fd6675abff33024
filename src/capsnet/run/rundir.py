"""The one owner of a run dir: every write into it goes through here.

A run dir is where days of GPU work accumulate, so the rules are few and strict:

* **One job at a time.** :class:`RunDir` holds an exclusive lock (``run.lock``) for the
  job's life.  A second process on the same dir stops at once, naming the holder's host
  and pid.  The lock is a kernel lock (``flock``), released when its process dies, so a
  lock left by a killed job is taken over, with a message naming the dead holder.
* **Atomic writes.** A file is written to a temporary file in its *destination* dir,
  fsynced and renamed over the target, so a kill or a full disk leaves either the old
  file or the new one, never half of one, and nothing in ``$TMPDIR`` (a rename across
  file systems would be a copy, which a kill can cut short).  Checkpoints take the same
  path through :class:`AtomicCheckpointIO`, Lightning's ``CheckpointIO`` plugin, so
  ``trainer.save_checkpoint`` and ``ModelCheckpoint`` both use it; each checkpoint carries
  a CRC of its tensors, checked on every load, and the previous ``last.ckpt`` is kept as
  ``last.prev.ckpt``.
* **What this invocation made, and nothing else, is undone on a refusal.**  The run dir
  itself is removed only when this invocation created it (it held nothing but Hydra's
  ``.hydra/`` and an empty job log when the job started).
* **Nothing is deleted to start afresh.** ``resume=false`` moves the previous run's files
  into ``superseded/<time>/``; so does a re-run of an evaluation into the same dir.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
SUPERSEDED_DIR = "superseded"
HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}
LAST = "last.ckpt"
PREVIOUS_LAST = "last.prev.ckpt"
DIGEST_KEY = "capsnet_tensor_crc32"
TMP_MARK = ".tmp-"


class RunDirBusyError(RuntimeError):
    """Another live process holds the run dir."""


class DamagedFileError(RuntimeError):
    """A file of the run dir cannot be read as what it should be; the message names the
    file, what is wrong and the way out."""

    def __init__(self, path: Path | str, problem: str, way_out: str) -> None:
        super().__init__(f"{path} is damaged: {problem}. {way_out}")
        self.path = Path(path)


# ---- atomic writes ------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_path(path: Path) -> Path:
    """The temporary file an atomic write of ``path`` goes through: same dir, own name."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(handle)`` atomically (temp file beside it, fsync, rename).

    On any failure (a full disk among them) the temporary file is removed and the old
    ``path``, if any, is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with tmp.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: Path | str, record: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, way_out: str) -> dict[str, Any] | None:
    """A JSON record, None when absent; a damaged one raises :class:`DamagedFileError`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise DamagedFileError(path, f"not valid JSON ({error})", way_out) from error
    if not isinstance(record, dict):
        raise DamagedFileError(path, f"holds a {type(record).__name__}, not a record", way_out)
    return record


# ---- checkpoints ------------------------------------------------------------------------
def _tensors(node: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a checkpoint's nested dicts and lists, in a fixed order."""
    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, dict):
        for key in sorted(node, key=str):
            yield from _tensors(node[key])
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _tensors(item)


def tensor_crc(checkpoint: dict[str, Any]) -> int:
    """CRC-32 of the raw bytes of every tensor in a checkpoint (weights, optimiser state).

    PyTorch's zip format checks no checksum on load, so flipped bytes inside a tensor
    would load as wrong weights; this catches them.
    """
    crc = 0
    for tensor in _tensors({k: v for k, v in checkpoint.items() if k != DIGEST_KEY}):
        flat = tensor.detach().reshape(-1).contiguous()
        if flat.numel():
            crc = zlib.crc32(flat.cpu().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def checkpoint_way_out(path: Path) -> str:
    previous = path.with_name(PREVIOUS_LAST)
    if path.name == LAST and previous.is_file():
        return (
            f"The checkpoint before it is kept: to continue from there, `mv {previous} {path}` and run the same "
            f"command again; or start this run afresh with resume=false (the old files are moved to "
            f"{SUPERSEDED_DIR}/)"
        )
    return "Start the run afresh with resume=false (the old files are moved to superseded/), or restore the file"


def load_checkpoint_file(path: Path | str, map_location: Any = "cpu", *, verify: bool = True) -> dict[str, Any]:
    """``torch.load`` a checkpoint, naming the file and the way out when it is damaged."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as error:  # zip, pickle and EOF errors all mean a damaged file here
        raise DamagedFileError(
            path, f"not a readable checkpoint ({type(error).__name__}: {error})", checkpoint_way_out(path)
        ) from error
    if not isinstance(raw, dict):
        raise DamagedFileError(path, f"holds a {type(raw).__name__}, not a checkpoint", checkpoint_way_out(path))
    stored = raw.get(DIGEST_KEY)
    if verify and stored is not None and tensor_crc(raw) != stored:
        raise DamagedFileError(
            path, "its tensors do not match their checksum (altered bytes)", checkpoint_way_out(path)
        )
    return raw


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, written atomically *in the checkpoint's own dir*.

    Lightning's default writes through fsspec's transaction, whose temporary file lives in
    ``$TMPDIR``: when the run dir is on another file system the final move is a copy, and
    a kill during it left a truncated ``last.ckpt``, the run's only checkpoint.  Here the
    temporary file is beside the target and renamed over it; the replaced ``last.ckpt`` is
    kept as ``last.prev.ckpt``.  Every checkpoint carries a CRC of its tensors, checked on
    load.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        checkpoint[DIGEST_KEY] = tensor_crc(checkpoint)
        # Serialised in memory first (as Lightning does): the file write alone can then fail,
        # and a full disk says so (OSError ENOSPC) rather than torch's "unexpected pos".
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        if path.name == LAST and path.is_file():
            _keep_previous(path)
        atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return load_checkpoint_file(path, map_location if map_location is not None else "cpu")


def _keep_previous(last: Path) -> None:
    """``last.ckpt`` -> ``last.prev.ckpt`` without a moment in which no ``last.ckpt`` exists
    (a hard link, then a rename over the old copy)."""
    previous = last.with_name(PREVIOUS_LAST)
    link = temp_path(previous)
    link.unlink(missing_ok=True)
    try:
        os.link(last, link)
    except OSError:  # no hard links on this file system: a copy, written atomically
        atomic_write(previous, lambda handle: handle.write(last.read_bytes()))
        return
    os.replace(link, previous)


# ---- the run dir ------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """The run dir of one job: its lock, what this invocation created, and its writes.

    Args:
        path: the run dir (Hydra has already created it and written ``.hydra/``).
        job_log: the name of Hydra's job log in it (``train.log``), if any.
    """

    def __init__(self, path: Path | str, job_log: str | None = None) -> None:
        self.path = Path(path)
        self.job_log = job_log
        self.created: list[Path] = []
        self.made_by_this_invocation = self._looks_new()
        self._lock_handle: IO[str] | None = None
        self._lock_created = False

    def _looks_new(self) -> bool:
        """Whether this invocation created the dir: Hydra made it just now when it holds
        nothing but ``.hydra/`` with Hydra's three files and an empty job log."""
        if not self.path.is_dir():
            return True
        entries = set(os.listdir(self.path))
        if not entries <= {".hydra", *(filter(None, [self.job_log]))}:
            return False
        hydra = self.path / ".hydra"
        if hydra.exists() and not set(os.listdir(hydra)) <= HYDRA_FILES:
            return False
        log_file = self.path / self.job_log if self.job_log else None
        return log_file is None or not log_file.exists() or log_file.stat().st_size == 0

    # -- lock ------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the run dir for this job, or raise :class:`RunDirBusyError` naming the holder."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        self._lock_created = not lock.exists()
        handle = lock.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(lock)
            handle.close()
            raise RunDirBusyError(
                f"{self.path} is in use by another job ({_describe(holder)}): two jobs must never train one run "
                f"dir. Wait for it to finish (a rerun then resumes or skips), or stop it first."
            ) from None
        except OSError as error:
            handle.close()
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            self._acquire_without_flock(lock)
            return
        previous = _holder(lock)
        if previous and not previous.get("released") and previous.get("pid") != os.getpid():
            log.warning("took over %s from %s, which is no longer running", lock, _describe(previous))
        self._lock_handle = handle
        self._write_holder(handle)
        self._clean_stale_temporaries()

    def _acquire_without_flock(self, lock: Path) -> None:
        """Where the file system has no flock (some network mounts): a pid file, taken over
        only when its holder is known to be dead (same host, no such pid)."""
        previous = _holder(lock)
        if previous and not previous.get("released"):
            same_host = previous.get("host") == socket.gethostname()
            if not same_host or _alive(int(previous.get("pid", -1))):
                raise RunDirBusyError(
                    f"{self.path} is held by {_describe(previous)} ({lock}; this file system has no flock). If that "
                    f"job is gone, delete {lock} and run again."
                )
            log.warning("took over %s from %s, which is no longer running", lock, _describe(previous))
        self._lock_handle = lock.open("a+")
        self._write_holder(self._lock_handle)
        self._clean_stale_temporaries()

    def _write_holder(self, handle: IO[str]) -> None:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        handle.flush()

    def release(self) -> None:
        """Free the lock; the file stays, marked released (unlinking it would race a waiter)."""
        if self._lock_handle is None:
            return
        with contextlib.suppress(OSError):
            self._lock_handle.seek(0)
            self._lock_handle.truncate()
            self._lock_handle.write(json.dumps({"released": True, "host": socket.gethostname(), "pid": os.getpid()}))
            self._lock_handle.flush()
        self._lock_handle.close()  # closing drops the flock
        self._lock_handle = None

    @property
    def holds_lock(self) -> bool:
        return self._lock_handle is not None

    def _clean_stale_temporaries(self) -> None:
        """Temporary files of killed writers (``.<name>.tmp-<pid>``): with the lock held,
        nobody else writes here, so every such file is a leftover of this run's own."""
        for folder in (self.path, self.path / "checkpoints"):
            if folder.is_dir():
                for entry in folder.iterdir():
                    if entry.name.startswith(".") and TMP_MARK in entry.name and entry.is_file():
                        log.info("removing %s, left by a writer that was killed", entry)
                        entry.unlink(missing_ok=True)

    # -- writes ----------------------------------------------------------------------------
    def _note(self, path: Path) -> None:
        if not path.exists():
            self.created.append(path)

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        self._note(path)
        return atomic_write_text(path, text)

    def write_json(self, name: str, record: dict[str, Any]) -> Path:
        path = self.path / name
        self._note(path)
        return atomic_write_json(path, record)

    def mkdir(self, name: str) -> Path:
        path = self.path / name
        self._note(path)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def supersede(self, keep: set[str]) -> Path | None:
        """Move everything of the previous run (all entries but ``keep``, the lock and
        ``superseded/``) into ``superseded/<time>/``; the record first, so a kill midway
        leaves no completed record beside the files of an unfinished run."""
        entries = [e for e in sorted(os.listdir(self.path)) if e not in {*keep, LOCK_FILE, SUPERSEDED_DIR}]
        if not entries:
            return None
        target = self.path / SUPERSEDED_DIR / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        while target.exists():
            target = target.with_name(target.name + "_")
        target.mkdir(parents=True)
        entries.sort(key=lambda e: e != "metrics.json")
        for entry in entries:
            os.replace(self.path / entry, target / entry)
        _fsync_dir(self.path)
        log.warning("moved the previous run's files (%s) to %s", ", ".join(entries), target)
        return target

    def undo(self) -> None:
        """On a refusal: remove what this invocation created, and the dir itself only if
        this invocation created it and nothing else is in it now."""
        for path in reversed(self.created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        lock = self.path / LOCK_FILE
        self.release()
        if self._lock_created:
            lock.unlink(missing_ok=True)
        if self.made_by_this_invocation and self.path.is_dir():
            hydra_own = {".hydra", *(filter(None, [self.job_log]))}
            if set(os.listdir(self.path)) <= hydra_own:
                shutil.rmtree(self.path, ignore_errors=True)


def _holder(lock: Path) -> dict[str, Any] | None:
    try:
        text = lock.read_text().strip()
        return json.loads(text) if text else None
    except (OSError, json.JSONDecodeError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that left no name"
    since = holder.get("since")
    started = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{started}"
