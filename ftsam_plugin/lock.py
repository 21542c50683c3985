"""One writer per output folder: an advisory `fcntl.flock` on `<folder>/.ftsam.lock`, held while a run writes there.

The operating system drops the lock when the holding process ends, however it ends (even SIGKILL), so a lock is
never stale: the file may stay behind, but only a live process can hold it. The holder writes its PID and start
time into the file, so a second run names who is in its way. Forked DataLoader workers share the lock with their
parent (same open file), which is what a run is.

    lock = FolderLock(folder, what="defense folder")
    lock.check()     # before anything is written: fail at once if a live run holds the folder (creates nothing)
    lock.acquire()   # once the folder exists: take it for this run (FtsamError if another run got there first)
    ...
    lock.release()   # or let the process end

A run that writes several folders (a defense's result, checkpoint and log folders, which flags may put anywhere)
holds one lock per folder, `FolderLocks`, so two runs sharing any one of them cannot both write there.
`held_locks_under(root)` names the live runs holding a lock anywhere below `root` (what a command that would move
or delete a whole tree must check first).

Not guaranteed: `flock` is advisory and local to one machine. On a network file system two processes on two
machines may both get the lock (NFS maps it to byte-range locks only on some setups), so two machines must not
write one network folder at the same time. Across machines, `ftsam grid` keeps one writer per cell with a lock file
of its own that names its host, PID and Slurm job (ftsam_plugin/grid/cell_lock.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from typing import Optional

from ftsam_plugin.errors import FtsamError

__all__ = ["FolderLock", "FolderLocks", "LOCK_NAME", "held_locks_under"]

LOCK_NAME = ".ftsam.lock"


class FolderLock:
    """The advisory lock of one output folder (see the module docstring).

    Args:
        folder: the folder whose writer this lock decides.
        what: how to call the folder in messages ("defense folder", "record folder", ...).
    """

    def __init__(self, folder: "str | os.PathLike[str]", what: str = "folder"):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.what = what
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> Optional[str]:
        """'PID <pid>, started <time>' of the live process holding the lock, or None when nobody holds it.
        Creates nothing (a folder or lock file that does not exist is simply not held)."""
        if self._fd is not None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if _is_busy(exc):
                    return _describe(_read(fd))
                return None  # a file system without flock: nobody can be named
            return None
        finally:
            os.close(fd)  # also drops the probe's shared lock

    def check(self) -> None:
        """FtsamError if another live process holds the folder; writes nothing."""
        who = self.holder()
        if who is not None:
            raise self._busy(who)

    def acquire(self) -> "FolderLock":
        """Take the lock for this process (the folder must exist); FtsamError naming the holder if it is taken."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FtsamError(f"cannot create lock file {self.path}: {exc.strerror}; check the {self.what}'s "
                             f"permissions") from None
        try:
            _flock_exclusive(fd)
        except OSError as exc:
            who = _describe(_read(fd)) if _is_busy(exc) else None
            os.close(fd)
            if who is None:
                raise FtsamError(f"cannot lock {self.path}: {exc.strerror}; use a local folder (the file system "
                                 f"does not support locks)") from None
            raise self._busy(who) from None
        if not _same_file(fd, self.path):  # the folder was moved or deleted while we opened its lock
            os.close(fd)
            raise FtsamError(f"{self.what} {self.folder} was moved or deleted while this run started; run again")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        with contextlib.suppress(OSError):  # the lock is what counts; the note only names the holder
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {stamp}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; an unheld file means nothing)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.release()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def _busy(self, who: str) -> FtsamError:
        return FtsamError(f"{self.what} {self.folder} is in use by another run ({who}); wait for it to finish, or "
                          f"stop it, before writing there")


class FolderLocks:
    """The locks of every folder one run writes (see the module docstring): checked, taken and released together.

    Args:
        folders: {folder: what} (how to call each folder in messages); a folder given twice (also through a
            symlink or a trailing slash) is locked once.
    """

    def __init__(self, folders: "dict[str, str]"):
        seen = {}
        for folder, what in folders.items():
            seen.setdefault(os.path.realpath(os.fspath(folder)), FolderLock(folder, what=what))
        self.locks = [seen[key] for key in sorted(seen)]  # one order for every run

    @property
    def folders(self):
        return [lock.folder for lock in self.locks]

    @property
    def held(self) -> bool:
        return bool(self.locks) and all(lock.held for lock in self.locks)

    def check(self) -> None:
        """FtsamError naming the first folder that a live process holds; writes nothing."""
        for lock in self.locks:
            lock.check()

    def acquire(self) -> "FolderLocks":
        """Take every lock (each folder must exist); on failure the ones already taken are released."""
        try:
            for lock in self.locks:
                lock.acquire()
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        for lock in self.locks:
            lock.release()

    def __enter__(self) -> "FolderLocks":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def held_locks_under(root: "str | os.PathLike[str]", skip: "tuple[str, ...]" = ()) -> "list[tuple[str, str]]":
    """[(folder, 'PID ..., started ...')] for every lock file below `root` (itself included) that a live process
    holds, except in the `skip` folders; symlinked folders are not followed. Creates nothing."""
    skipped = {os.path.realpath(os.fspath(s)) for s in skip}
    found = []
    for dirpath, dirnames, filenames in os.walk(os.fspath(root)):
        dirnames.sort()
        if LOCK_NAME in filenames and os.path.realpath(dirpath) not in skipped:
            who = FolderLock(dirpath).holder()
            if who is not None:
                found.append((dirpath, who))
    return found


def _same_file(fd: int, path: str) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _is_busy(exc: OSError) -> bool:
    return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _flock_exclusive(fd: int, tries: int = 5) -> None:
    # another process's `holder()` probe holds a shared lock for microseconds: retry briefly before giving up
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if not _is_busy(exc) or attempt == tries - 1:
                raise
            time.sleep(0.02)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def _describe(note: str) -> str:
    pid, _, started = note.strip().partition(" ")
    if not pid.isdigit():
        return "PID unknown"
    return f"PID {pid}, started {started}" if started else f"PID {pid}"
