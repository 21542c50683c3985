"""Pre-flight image check: every image file a run will read opens and decodes, before anything is written.

A record references its poisoned images as files, and image-folder datasets keep their clean images as files; one
junk, truncated or unreadable file used to crash a run after its first epoch. `check_record_images` reads each
file once and fails with one line naming the first bad file and how many are bad.

Cost. A run reads tens of thousands of small images (CIFAR-10: 14,000 poisoned PNGs and 10,000 test JPEGs) and
the check must stay a small fraction of one epoch, so each file gets a structural check of its bytes (what a junk
or truncated file breaks): a PNG's signature, header (size, colour type) and final IEND chunk; a JPEG's start
marker, frame header (size, components) and end marker; a binary PPM's header and exact pixel count. A file that
does not pass (another format, an unusual PNG or JPEG, a broken file) is decoded in full and converted to RGB, as
the data pipeline does, and is refused only if that fails. Corruption inside intact structure (a flipped bit in
the compressed pixels) is not looked for: the data pipeline reports such a file in one line when it reads it.
Images of any PIL mode that converts to RGB are accepted (grayscale, palette, RGBA: converted as BackdoorBench's
loaders do); any size up to MAX_PIXELS decoded pixels is (the transforms resize), read from the header before
anything is decoded (a 20000 x 20000 PNG is a 1 MB file and a 1.2 GB decode). Only regular files are read, at most
MAX_FILE_BYTES each: a path that is a symlink to /dev/zero, a FIFO or a socket is refused without being read (it
would never end, or block the run). Images held in memory (torchvision's CIFAR arrays,
poisoned images kept in RAM) have no file and need no check. The bytes of the clean training images also give
the resume fingerprint (`digest`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from PIL import Image

from ftsam_plugin.errors import FtsamError

from .backdoor import BackdoorDataset

__all__ = ["check_record_images", "check_image_files", "inspect_image", "digest"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk with its CRC: the last 12 bytes of a PNG
PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}  # colour type -> PIL mode (8-bit samples)
JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOFn markers
JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # components -> PIL mode
JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field (TEM, RSTn)


def digest(data: bytes) -> str:
    """A short content digest of a file's bytes (blake2b, 64 bits, hex)."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


MAX_PIXELS = 4096 * 4096  # decoded pixels per image (CIFAR: 1,024; GTSRB's largest: ~60,000)
MAX_FILE_BYTES = 64 << 20  # per image file


def _png_mode(data: bytes) -> Optional[Tuple[str, int, int]]:
    if len(data) < 45 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or not data.endswith(PNG_END):
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if width == 0 or height == 0 or depth != 8 or colour not in PNG_MODES:
        return None
    return PNG_MODES[colour], width, height


def _jpeg_mode(data: bytes) -> Optional[Tuple[str, int, int]]:
    if data[:2] != b"\xff\xd8" or not data.endswith(b"\xff\xd9"):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:  # walk the marker segments up to the frame header
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in JPEG_STANDALONE:
            i += 2
        elif marker in JPEG_FRAMES:
            if i + 10 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            mode = JPEG_MODES.get(data[i + 9])
            return (mode, width, height) if width and height and mode else None
        elif marker == 0xDA:  # scan data before any frame header
            return None
        else:
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


_PPM_HEADER = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+(\d+)\s")  # binary RGB PPM (GTSRB's format), no comments


def _ppm_mode(data: bytes) -> Optional[Tuple[str, int, int]]:
    header = _PPM_HEADER.match(data)
    if header is None:
        return None
    width, height, maxval = (int(v) for v in header.groups())
    if width == 0 or height == 0 or not 0 < maxval < 256:
        return None
    complete = len(data) - header.end() == width * height * 3  # all pixels there, nothing more
    return ("RGB", width, height) if complete else None


# structural checks, tried in order: (mode, width, height), or None (a file none of them accepts is decoded in full)
QUICK_CHECKS = (_png_mode, _jpeg_mode, _ppm_mode)


class _Refused(Exception):
    """A file refused before it is read or decoded (its message is the reason)."""


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise _Refused(f"{width}x{height} pixels, more than the {MAX_PIXELS} this pipeline decodes")


def _decode(data: bytes) -> str:
    """Decode in full and convert to RGB (what the data pipeline does), after checking the size its header gives;
    returns the file's mode."""
    with Image.open(io.BytesIO(data)) as img:
        _check_pixels(*img.size)
        mode = img.mode
        img.convert("RGB")
    return mode


READ_CHUNK = 1 << 16


def _read(path: str) -> bytes:
    # os.read: half the per-file cost of open().read() on small files. O_NONBLOCK: opening a FIFO does not wait for a
    # writer; fstat then refuses anything but a regular file (of the path's target: symlinks are followed)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Refused(f"not a regular file but {_file_kind(info.st_mode)}")
        if info.st_size > MAX_FILE_BYTES:
            raise _Refused(f"{info.st_size} bytes, more than the {MAX_FILE_BYTES} an image file may have")
        chunks = [os.read(fd, READ_CHUNK)]
        while len(chunks[-1]) == READ_CHUNK:
            chunks.append(os.read(fd, READ_CHUNK))
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def inspect_image(path: str) -> Tuple[Optional[str], Optional[bytes]]:
    """(problem, bytes) for one image file: problem is None when the file is usable (see the module docstring),
    else a short reason ('missing', 'cannot identify image file ...', 'image file is truncated ...')."""
    try:
        data = _read(path)
    except FileNotFoundError:
        return "missing", None
    except IsADirectoryError:
        return "a folder, not an image", None
    except _Refused as exc:
        return str(exc), None
    except OSError as exc:
        return exc.strerror or type(exc).__name__, None
    found = next((result for result in (check(data) for check in QUICK_CHECKS) if result), None)
    try:
        if found:
            _check_pixels(found[1], found[2])
            return None, data
        _decode(data)
    except _Refused as exc:
        return str(exc), data
    except Exception as exc:  # PIL raises many types for bad files (UnidentifiedImageError, OSError, SyntaxError, ...)
        text = str(exc).strip().splitlines()
        return (text[0][:120] if text else type(exc).__name__), data
    return None, data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a file"


# what a file is -> how to fix a bad one
KINDS = {
    "poisoned image": "restore the record's bd_*_dataset folders or re-create the attack record",
    "clean image": "replace or restore it in the dataset folder (or pass the right --dataset_path)",
}


def check_image_files(files: Mapping[str, str], digests_of: Iterable[str] = ()) -> Dict[str, str]:
    """Check every file of `files` ({path: kind}, a KINDS key) once (see the module docstring).

    Returns:
        {path: digest} of the `digests_of` files (which must be in `files`).

    Raises:
        FtsamError: 'N of the M image files this run reads cannot be used (first: <kind> <path>: <reason>); <fix>'.
    """
    wanted = set(digests_of)
    bad: List[Tuple[str, str]] = []
    digests: Dict[str, str] = {}
    for path in files:
        problem, data = inspect_image(path)
        if problem is not None:
            bad.append((path, problem))
        elif path in wanted:
            digests[path] = digest(data)
    if bad:
        path, problem = bad[0]
        kind = files[path]
        raise FtsamError(f"{len(bad)} of the {len(files)} image files this run reads cannot be used (first: {kind} "
                         f"{path}: {problem}); {KINDS[kind]}")
    return digests


def _unwrap(dataset):
    return getattr(dataset, "wrapped_dataset", dataset)  # TransformDataset / BackdoorBench's wrapper


def clean_files(dataset, indices: Optional[Sequence[int]] = None) -> List[str]:
    """The files behind a clean dataset's items `indices` (all when None); [] for images held in memory."""
    raw = _unwrap(dataset)
    paths = getattr(raw, "paths", None)  # ours: ImageListDataset
    if paths is None and isinstance(getattr(raw, "samples", None), list):
        paths = [p for p, _ in raw.samples]  # torchvision's ImageFolder (BackdoorBench's tiny)
    if paths is None:
        return []
    return list(paths) if indices is None else [paths[int(i)] for i in indices]


def poisoned_files(dataset) -> List[str]:
    """The poisoned-image files a backdoor dataset references (ours, or BackdoorBench's at its stored paths)."""
    if dataset is None:
        return []
    raw = _unwrap(dataset)
    if isinstance(raw, BackdoorDataset):
        return raw.image_files()
    container = raw.retrieve_state()["bd_data_container"]
    if container.get("save_folder_path") is None:
        return []  # kept in memory
    return [entry["path"] for entry in container["data_dict"].values() if isinstance(entry, Mapping)]


def check_record_images(result: Mapping, train_indices: Sequence[int] = (),
                        test_indices: Optional[Sequence[int]] = None) -> Dict[str, str]:
    """The pre-flight check of a run on a loaded record (a `load_attack_result` dict).

    Args:
        result: the record.
        train_indices: clean training items the run trains on (their digests are returned).
        test_indices: clean test items the run evaluates on (default: all).

    Returns:
        {path: digest} of the training images (empty for in-memory data).
    """
    train = clean_files(result["clean_train"], train_indices)
    files = dict.fromkeys(poisoned_files(result.get("bd_train")) + poisoned_files(result.get("bd_test")),
                          "poisoned image")
    files.update(dict.fromkeys(clean_files(result["clean_test"], test_indices) + train, "clean image"))
    return check_image_files(files, train)
