"""Safe loading of BackdoorBench `.pt` records and atomic writing of every file the plugin produces.

`safe_load` never executes pickled code: it runs `torch.load(weights_only=True)` with only the numpy
globals a BackdoorBench `attack_result.pt` needs (arrays, dtypes, scalars) allowlisted; `check_finite_state`
refuses weights holding NaN/inf. Every writer goes through a temp file `.<name>.<random>.tmp` in the destination
folder, fsync and `os.replace`, so a crash or a full disk never leaves a half-written file behind and the previous
file stays intact; a process killed mid-write leaves only such a temp file, which `remove_stale_temp_files` clears.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ftsam_plugin.errors import FtsamError

__all__ = ["safe_load", "check_finite_state", "atomic_save", "atomic_write_text", "atomic_write_bytes", "write_csv",
           "numpy_safe_globals", "remove_stale_temp_files", "file_fingerprint", "write_error",
           "make_output_folder"]

# Fixed-size numeric and bool dtypes only: no object, string, void or datetime dtypes.
_DTYPE_CLASS_NAMES = (
    "BoolDType",
    "Int8DType", "Int16DType", "Int32DType", "Int64DType",
    "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType",
    "ByteDType", "UByteDType", "ShortDType", "UShortDType", "IntDType", "UIntDType",
    "LongDType", "ULongDType", "LongLongDType", "ULongLongDType",
    "Float16DType", "Float32DType", "Float64DType", "LongDoubleDType",
    "Complex64DType", "Complex128DType", "CLongDoubleDType",
)  # fmt: skip


def _multiarray_module():
    # numpy 2.x keeps the real module at numpy._core; numpy 1.x at numpy.core.
    try:
        from numpy._core import multiarray  # type: ignore[attr-defined]
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def numpy_safe_globals() -> list:
    """The allowlist passed to `torch.serialization.safe_globals`: (object, "pickled.name") pairs.

    Both spellings of the multiarray helpers are listed, because a file written under numpy 1.x names
    `numpy.core.multiarray._reconstruct` and one written under numpy 2.x names `numpy._core.multiarray._reconstruct`.
    """
    multiarray = _multiarray_module()
    entries: list = []
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append((multiarray._reconstruct, f"{prefix}._reconstruct"))
        entries.append((multiarray.scalar, f"{prefix}.scalar"))
    entries.append((np.ndarray, "numpy.ndarray"))
    entries.append((np.dtype, "numpy.dtype"))
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: each dtype instance has its own class
    if dtypes is not None:
        for name in _DTYPE_CLASS_NAMES:
            cls = getattr(dtypes, name, None)
            if cls is not None:
                entries.append((cls, f"numpy.dtypes.{name}"))
    return entries


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_BUILD_RE = re.compile(r"but got <class '([\w.]+)'>")


def safe_load(path: "str | os.PathLike[str]", what: str = "attack result", fix: str = "re-create it") -> Any:
    """Load a `.pt` file without running pickled code.

    Args:
        path: the file (e.g. `record/<r>/attack_result.pt`).
        what: how to call the file in error messages.
        fix: what to do with an empty, truncated or corrupt file (e.g. "delete it or run without --resume")

    Returns:
        The loaded object, on CPU.

    Raises:
        FtsamError: missing, empty, truncated or non-torch file, or one that needs a global outside the
            numpy allowlist (the global is named; it was refused, not executed).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FtsamError(f"{what} file {path} does not exist; check the path (or run the attack first)")
    if os.path.isdir(path):
        raise FtsamError(f"{what} path {path} is a folder, not a file; pass the .pt file inside it")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise FtsamError(f"cannot read {what} file {path}: {exc.strerror or exc}; check its permissions") from exc
    if size == 0:
        raise FtsamError(f"{what} file {path} is empty (0 bytes), the run that wrote it did not finish; {fix}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise FtsamError(f"cannot read {what} file {path}: {exc.strerror or exc}; check its permissions") from exc
    # torch.save writes a zip archive (torch >= 1.6) or a protocol-2 pickle (legacy); anything else is another format
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise FtsamError(f"{what} file {path} is not a torch file (it starts with {head!r}); pass the .pt file that "
                         f"torch.save wrote, or {fix}")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FtsamError:
        raise
    except PermissionError as exc:
        raise FtsamError(f"cannot read {what} file {path}: permission denied; check its permissions") from exc
    except pickle.UnpicklingError as exc:
        raise FtsamError(_unpickling_message(path, what, str(exc))) from None
    except Exception as exc:  # torch/zip/pickle internals raise many types (RuntimeError, EOFError, KeyError, ...)
        raise FtsamError(_corrupt_message(path, what, exc, fix)) from None


def check_finite_state(state: Any, what: str) -> None:
    """FtsamError naming the first floating-point tensor of `state` (a state dict) that holds NaN or inf.

    Args:
        state: mapping of name -> tensor (non-tensors are ignored).
        what: how to call the weights in the message, e.g. "attack result record/x/attack_result.pt".
    """
    if not isinstance(state, Mapping):
        return
    bad = [key for key, value in state.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise FtsamError(f"{what} holds NaN or infinite weights ({len(bad)} tensor(s), first: {bad[0]}); it comes "
                         f"from a diverged run: re-create it")


def _unpickling_message(path: str, what: str, text: str) -> str:
    match = _GLOBAL_RE.search(text) or _BUILD_RE.search(text)
    if match:
        return (
            f"{what} file {path} needs the Python global '{match.group(1)}', which is not on the safe list; "
            f"it was refused and not executed. Re-save the file with plain tensors/numpy arrays, or load it "
            f"only if you trust its source"
        )
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        detail = _first_line(text.split("WeightsUnpickler error:", 1)[-1])
        return (
            f"{what} file {path} holds content outside the safe list ({detail}); it was refused and not executed. "
            f"Re-save it with plain tensors/numpy arrays"
        )
    return f"{what} file {path} is not a readable torch file ({_first_line(text)}); re-create it with torch.save"


def _corrupt_message(path: str, what: str, exc: BaseException, fix: str = "re-create it") -> str:
    text = str(exc)
    if isinstance(exc, (EOFError, OSError, zipfile.BadZipFile)) or "zip archive" in text or "central directory" in text:
        return f"{what} file {path} is truncated or corrupt ({_first_line(text) or type(exc).__name__}); {fix}"
    return f"{what} file {path} is not a readable torch file ({type(exc).__name__}: {_first_line(text)}); {fix}"


def _first_line(text: str) -> str:
    # First non-empty line, cut at its first sentence: torch's messages run on for several lines.
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line.split(". ")[0].rstrip(".")[:160]
    return ""


def file_fingerprint(path: "str | os.PathLike[str]", with_hash: bool = True) -> dict:
    """{size, mtime_ns[, sha256]} of a file: what caches key on to notice that the file was replaced."""
    st = os.stat(path)
    out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        out["sha256"] = digest.hexdigest()
    return out


# ---------------------------------------------------------------------------------------------- writing


DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no space, size limit, quota
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _os_error_message(path: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in DISK_FULL:
        return f"disk full: cannot write {path} ({reason}); free space or choose another output folder"
    if exc.errno in NOT_WRITABLE:
        return (f"not writable: cannot write {path} ({reason}); check the folder's permissions or choose another "
                f"output folder")
    return f"cannot write {path}: {reason}; check the path or choose another output folder"


def write_error(path: str, exc: BaseException) -> Optional[FtsamError]:
    """The one-line FtsamError for an exception raised while writing `path`, or None when it is not a write error.
    torch.save reports a failed write as RuntimeError ('unexpected pos ...', 'PytorchStreamWriter failed ...')
    with the OSError as its context; that OSError is what is reported."""
    if isinstance(exc, FtsamError):
        return None
    seen = exc
    for _ in range(5):  # the exception, then what it was raised from or during
        if isinstance(seen, OSError) and not isinstance(seen, FtsamError):
            return FtsamError(_os_error_message(path, seen))
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("unexpected pos", "PytorchStreamWriter",
                                                                     "file write failed")):
        return FtsamError(f"disk full or not writable: cannot write {path} ({_first_line(str(exc))}); free space or "
                          f"choose another output folder")
    return None


def make_output_folder(folder: "str | os.PathLike[str]") -> None:
    """Create `folder` (and parents) or raise an FtsamError naming why it cannot be written."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise FtsamError(f"cannot create output folder {folder}: {reason}; free that path or fix its permissions"
                         ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FtsamError(f"not writable: output folder {folder}; fix its permissions or choose another one")


def _ensure_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise FtsamError(
            f"cannot create folder {parent} for {path}: {exc.strerror or exc}; choose another output folder"
        ) from exc
    if not os.path.isdir(parent):
        raise FtsamError(
            f"cannot create folder {parent} for {path}: a file is in the way; choose another output folder"
        )
    return parent


# mkstemp's names: prefix, 8 characters of [a-z0-9_], suffix
TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


def remove_stale_temp_files(folder: "str | os.PathLike[str]", before: float) -> List[str]:
    """Delete the temp files our atomic writes leave when a process is killed mid-write: files named
    `.<name>.<8 random characters>.tmp` directly in `folder`, last modified before `before` (a time.time()).
    Call it only while holding the folder's lock (no other run of ours is writing there). Returns what went."""
    folder = os.fspath(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP_RE.match(entry.name):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < before:
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed


def _atomic_write(path: "str | os.PathLike[str]", write: Callable[[io.BufferedWriter], None]) -> None:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FtsamError(f"cannot write {path}: it is a folder; choose a file name")
    parent = _ensure_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise FtsamError(_os_error_message(path, exc)) from exc
    try:
        os.chmod(tmp, _new_file_mode(path))
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        error = write_error(path, exc) if isinstance(exc, Exception) else None
        if error is not None:
            raise error from exc
        raise
    _fsync_dir(parent)


def _new_file_mode(path: str) -> int:
    # mkstemp creates 0600; give the file the mode a plain open() would (keep an existing file's mode).
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(parent: str) -> None:
    # Makes the rename durable; not supported everywhere (e.g. Windows), so best effort.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj: Any, path: "str | os.PathLike[str]") -> None:
    """`torch.save(obj)` to `path` atomically (temp file in the same folder, fsync, os.replace)."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    """Write `data` to `path` atomically."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: "str | os.PathLike[str]", text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (UTF-8, newlines written as given)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode(encoding))


def write_csv(
    path: "str | os.PathLike[str]",
    rows: Iterable[Mapping[str, Any]],
    columns: Optional[Sequence[str]] = None,
) -> None:
    """Write a list of dicts as CSV atomically.

    Args:
        path: destination file.
        rows: one mapping per row.
        columns: column order; default: keys in order of first appearance across rows. Missing values are
            written empty; a key not in an explicit `columns` raises ValueError.
    """
    rows = list(rows)
    if columns is None:
        seen: dict = {}
        for row in rows:
            for key in row:
                seen.setdefault(key, None)
        columns = list(seen)
    else:
        columns = list(columns)
        allowed = set(columns)
        for row in rows:
            extra = [key for key in row if key not in allowed]
            if extra:
                raise ValueError(f"row has keys {extra} not in columns {columns}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(dict(row))
    atomic_write_text(path, buffer.getvalue())
