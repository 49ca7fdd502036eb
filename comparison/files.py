"""Files a run writes: all-or-nothing writes, checksums, and the lock of a results directory.

Every file of a results directory is written through :func:`atomic_path`: the content goes to a
private temporary file beside the target, is flushed to disk, and replaces the target with
``os.replace`` in one step. A crash or Ctrl-C leaves the old file or the new one, never half of
one. A temporary file left by a killed process starts with ``.`` and ends with ``.tmp``;
:func:`remove_stale_temporaries` clears them at the next start.

A write that fails because of the machine (a full or read-only disk, an I/O error) raises
:class:`MachineFaultError` naming the file: such an error says nothing about the experiment, so
the runner stops on it instead of recording a result.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

TEMPORARY_SUFFIX = ".tmp"
LOCK_FILE = ".lock"

# Errors of the machine rather than of the code or the experiment, and what to do about each.
_RESUME = "run the same command again (what finished is kept; nothing is recorded for the interrupted cell)"
MACHINE_FAULTS = {
    errno.ENOSPC: ("no space left on device", f"free some space (or choose another --out), then {_RESUME}"),
    errno.EDQUOT: ("disk quota exceeded", f"free some space (or choose another --out), then {_RESUME}"),
    errno.EROFS: ("read-only file system", f"make it writable (or choose another --out), then {_RESUME}"),
    errno.EIO: ("input/output error", f"check the disk, then {_RESUME}"),
}
# Free space under which a write torch reports as cut short is taken for a full disk.
FULL_DISK_BYTES = 16 << 20


class MachineFaultError(OSError):
    """A write failed because of the machine (a full or read-only disk, an I/O error).

    Its message names the cause and the path (``no space left on device writing DIR/x.csv``);
    :attr:`advice` says what to do. The runner never records it as a cell's result: the run
    stops, and the same command completes the table once the fault is fixed.
    """

    @property
    def advice(self) -> str:
        return MACHINE_FAULTS.get(self.errno, ("", "fix the machine, then run the same command again"))[1]

    def __str__(self) -> str:
        return self.strerror


def is_machine_fault(error: BaseException) -> bool:
    """True for an ``OSError`` of the machine (:data:`MACHINE_FAULTS`: ENOSPC, EDQUOT, EROFS, EIO)."""
    return isinstance(error, OSError) and error.errno in MACHINE_FAULTS


def machine_fault(error: OSError, path: str | Path | None = None) -> MachineFaultError:
    """``error`` (a machine fault) as a :class:`MachineFaultError` naming ``path`` (else its own file)."""
    if isinstance(error, MachineFaultError) and path is None:
        return error
    where = path or error.filename or "a file (the system did not say which)"
    cause = MACHINE_FAULTS.get(error.errno, (error.strerror or str(error), ""))[0]
    return MachineFaultError(error.errno, f"{cause} writing {where}", str(where))


def save_torch(payload: object, path: str | Path) -> None:
    """``torch.save(payload, path)``, with a write the disk cut short raised as an ``OSError``.

    torch's own writer reports a short write as a ``RuntimeError`` (``unexpected pos 15232 vs
    15128``, ``PytorchStreamWriter failed writing``) that names neither the file nor the disk;
    it becomes a :class:`MachineFaultError` (ENOSPC when the disk is nearly full, else EIO).
    """
    import torch

    try:
        torch.save(payload, path)
    except RuntimeError as error:
        text = str(error)
        if not any(sign in text for sign in ("unexpected pos", "PytorchStreamWriter failed", "file write failed")):
            raise
        code = errno.ENOSPC if free_bytes(Path(path).parent) < FULL_DISK_BYTES else errno.EIO
        raise machine_fault(OSError(code, os.strerror(code)), path) from error


def free_bytes(directory: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``directory``."""
    return shutil.disk_usage(directory).free


def is_writable(directory: str | Path) -> bool:
    """True when this process may create files in ``directory`` (False on a read-only file system)."""
    return os.access(directory, os.W_OK)


def _file_mode() -> int:
    # Results are ordinary files, readable as the umask allows (temporary files start private).
    # Linux reports the umask without changing it; elsewhere the common default is assumed.
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one step.

    If the body raises (or is interrupted), the temporary file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
        os.close(handle)
    except OSError as error:
        if is_machine_fault(error):
            raise machine_fault(error, path) from error
        raise
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, _file_mode())
        os.replace(temporary, path)
    except BaseException as error:
        # The disk that failed the write may fail this too; the first error is the one to report.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if is_machine_fault(error):
            raise machine_fault(error, path) from error
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` all or nothing."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: object) -> None:
    """Write ``payload`` as indented JSON to ``path`` all or nothing."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def save_torch_atomic(payload: object, path: str | Path) -> None:
    """``torch.save(payload)`` to ``path`` all or nothing (a full disk raises :class:`MachineFaultError`)."""
    with atomic_path(path) as temporary:
        save_torch(payload, temporary)


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files (``.*.tmp``) and scratch folders a killed run left under ``directory``.

    Call it only while holding the directory's :class:`DirectoryLock`: then no live writer owns them.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.rglob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in directory.glob(".scratch-*"):
        if path.is_dir():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def move_aside(path: str | Path, reason: str) -> Path:
    """Move a damaged file to ``<its folder>/damaged/`` (never delete it); returns the new path.

    A ``.why`` file beside it says what was wrong.
    """
    path = Path(path)
    damaged = path.parent / "damaged"
    damaged.mkdir(exist_ok=True)
    target = damaged / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    counter = 0
    while target.exists():
        counter += 1
        target = damaged / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{counter}"
    os.replace(path, target)
    target.with_name(target.name + ".why").write_text(reason + "\n", encoding="utf-8")
    return target


class DirectoryBusyError(RuntimeError):
    """Another live process holds the lock of a results directory."""


class DirectoryLock:
    """An exclusive lock on a results directory, held while a run writes it.

    The lock is a file ``.lock`` holding the owner's host, pid and start time. A lock whose
    process is gone (same host, pid not running) is stale: it is taken over. A live owner makes
    :meth:`acquire` raise :class:`DirectoryBusyError` naming it, or wait with ``wait_s``. An
    owner on another host (a shared file system) cannot be checked from here: it counts as
    live unless ``break_lock`` is set, which the user passes after making sure it is gone.

    Attributes:
        took_over: the owner of a lock that was taken over (stale, or broken), else ``None``.
        broke: True when that lock was taken over by ``break_lock`` rather than found stale.

    Example::

        >>> with DirectoryLock(out_dir):
        ...     ...  # write cells
    """

    def __init__(self, directory: str | Path, *, wait_s: float = 0.0, poll_s: float = 1.0,
                 break_lock: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.break_lock = break_lock
        self.took_over: dict | None = None
        self.broke = False

    def owner(self) -> dict | None:
        """The recorded owner of the lock, or ``None`` when unlocked (an unreadable lock counts as stale)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": -1, "host": "?", "unreadable": True}

    @staticmethod
    def _on_this_host(owner: dict) -> bool:
        return owner.get("host") == socket.gethostname()

    @classmethod
    def _alive(cls, owner: dict) -> bool:
        if owner.get("unreadable"):
            return False
        if not cls._on_this_host(owner):
            return True  # cannot check another host's processes: assume it is running
        pid = int(owner.get("pid", -1))
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _busy_error(self, owner: dict) -> DirectoryBusyError:
        held = (f"{self.directory} is in use by process {owner.get('pid')} on {owner.get('host')} "
                f"(since {owner.get('since')})")
        if not self._on_this_host(owner):
            return DirectoryBusyError(
                f"{held}, another host: this one ({socket.gethostname()}) cannot check whether that process "
                f"still runs. If it does, wait for it (--wait SECONDS queues behind it); if you have made sure "
                f"it is gone, run again with --break-lock to take the lock over")
        if self.break_lock:
            return DirectoryBusyError(f"{held}, and that process is still running on this host; --break-lock "
                                      f"takes over only a lock whose owner is gone: stop process "
                                      f"{owner.get('pid')} or wait for it")
        return DirectoryBusyError(f"{held}; wait for it to finish, or pass --wait to queue behind it")

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            # The lock appears with its content in one step (a hard link of a finished file), so
            # another process never reads a half-written lock and takes it for a stale one.
            handle, draft = tempfile.mkstemp(dir=self.directory, prefix=".lock.", suffix=TEMPORARY_SUFFIX)
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(me, stream)
            try:
                os.link(draft, self.path)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released between our two calls
                stale = not self._alive(owner)
                if stale or (self.break_lock and not self._on_this_host(owner)):
                    self.took_over, self.broke = owner, not stale
                    self.path.unlink(missing_ok=True)
                    continue
                if time.monotonic() >= deadline:
                    raise self._busy_error(owner) from None
                time.sleep(self.poll_s)
            else:
                return self
            finally:
                os.unlink(draft)

    def release(self) -> None:
        owner = self.owner()
        if owner and owner.get("pid") == os.getpid() and self._on_this_host(owner):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, error_type, *rest) -> None:
        if error_type is None:
            self.release()
            return
        # Leaving on an error: a disk that failed the run may fail this too, and the run's own
        # error is the one to report (a lock left behind is stale, and the next run takes it over).
        with contextlib.suppress(OSError):
            self.release()
