"""Atomic, verified writes: every output of this package goes through :class:`Staging`.

Files are written into a hidden staging folder beside their destination
(``.nadmm-tmp-<pid>-<host>-<random>``), each file is checked after writing
(:func:`verify_file`: non-empty, a ``.gz`` decompresses completely with a matching CRC, a NIfTI
holds all the bytes its header announces, a PNG ends with its ``IEND`` chunk, JSON parses, a
``torch.save`` archive passes its CRC checks), and only then are the files moved into place
with ``os.replace``. A writer that fails quietly (SimpleITK's NIfTI writer only *prints*
``wrote only 0 of … bytes`` on a full disk) is caught by the check, and nothing half-written
ever appears under a final name.

The staging folder's name records the writing process (pid and a hash of the host name), so a
folder left behind by a killed process (``SIGKILL``, power loss) is recognised and removed by
the next :class:`Staging` in the same folder — only if that process is gone, and only folders
made on this host.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["Staging", "atomic_write", "verify_file", "clean_stale", "STAGING_PREFIX"]

STAGING_PREFIX = ".nadmm-tmp-"
_STAGING_RE = re.compile(r"^\.nadmm-tmp-(\d+)-([0-9a-f]{8})-")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process) or cannot tell: keep its folder
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove staging folders in ``folder`` left by dead processes of this host.

    Only names made by :class:`Staging` count (``.nadmm-tmp-<pid>-<host>-…``); a folder whose
    process still runs, or that was made on another host (a shared file system), is kept.
    Returns the removed paths.
    """
    removed: list[Path] = []
    host = _host_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _STAGING_RE.match(entry.name)
        if not m or m.group(2) != host or _pid_alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except OSError:
                continue
        removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _gunzip_length(path: Path) -> int:
    """Decompressed length of a gzip file; raises ``OSError`` if it is truncated or corrupt."""
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise OSError(f"truncated or corrupt gzip data ({exc})") from None
    return total


def nifti_payload(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(needed, present)`` bytes of a NIfTI file's uncompressed stream, or ``None`` if
    ``path`` is not a NIfTI-1/2 file. ``needed`` is the header's data offset plus the voxel
    data it announces; a complete file has ``present >= needed``."""
    import nibabel as nib

    p = Path(path)
    name = p.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        img = nib.load(p)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds on a bad header
        raise OSError(f"unreadable NIfTI header ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        return None
    proxy = img.dataobj
    count = 1
    for n in proxy.shape:
        count *= int(n)
    needed = int(proxy.offset) + count * img.get_data_dtype().itemsize
    present = _gunzip_length(p) if name.endswith(".gz") else p.stat().st_size
    return needed, present


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(prefix)) == prefix


def verify_file(path: str | os.PathLike) -> None:
    """Check that a just-written file is complete; raise ``OSError`` saying why if not.

    Checks by kind: every file exists and is not empty; ``.gz`` decompresses to the end with a
    matching CRC; NIfTI (``.nii``, ``.nii.gz``) holds ``vox_offset + voxels * itemsize``
    bytes; ``.png`` starts with the PNG signature and ends with ``IEND``; ``.json`` parses;
    ``.pt``/``.zip`` archives pass their CRC checks.
    """
    p = Path(path)
    if not p.is_file():
        raise OSError("the file was not written")
    size = p.stat().st_size
    if size == 0:
        raise OSError("the file is empty")
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        payload = nifti_payload(p)
        if payload is not None and payload[1] < payload[0]:
            raise OSError(f"only {payload[1]} of {payload[0]} bytes were written")
    elif name.endswith(".gz"):
        _gunzip_length(p)
    elif name.endswith(".png"):
        with open(p, "rb") as fh:
            head = fh.read(8)
            fh.seek(max(size - 8, 0))
            tail = fh.read(8)
        if head != _PNG_SIGNATURE or tail != _PNG_END:
            raise OSError("the PNG file is incomplete")
    elif name.endswith(".json"):
        try:
            json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise OSError(f"the JSON file is incomplete ({exc})") from None
    elif name.endswith((".pt", ".pth", ".zip")) and _starts_with(p, b"PK\x03\x04"):
        # torch.save writes a zip archive: a truncated one lacks its central directory.
        try:
            with zipfile.ZipFile(p) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise OSError(f"the archive is incomplete ({exc})") from None
        if bad is not None:
            raise OSError(f"the archive member {bad!r} is corrupt")


# --------------------------------------------------------------------------------------------
# Staging
# --------------------------------------------------------------------------------------------


class Staging:
    """A hidden folder in ``parent`` where a set of files is written, verified, then moved.

    Use as a context manager (the folder is removed if the block raises)::

        with Staging(outdir) as st:
            st.add("a.json", lambda p: p.write_text("{}"))
            st.commit(outdir)

    Creating one removes stale staging folders of dead processes in ``parent``
    (:func:`clean_stale`). ``target`` (optional) names the final folder in error messages.
    """

    def __init__(self, parent: str | os.PathLike, target: str | os.PathLike | None = None):
        self.parent = Path(parent)
        self.target = Path(target) if target is not None else self.parent
        clean_stale(self.parent)
        prefix = f"{STAGING_PREFIX}{os.getpid()}-{_host_tag()}-"
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.parent))
        self._verified: set[str] = set()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()

    def path(self, name: str) -> Path:
        """Where to write ``name`` (then call :meth:`add`, or let :meth:`commit` verify it)."""
        return self.tmp / name

    def add(
        self, name: str, write: Callable[[Path], object],
        check: Callable[[Path], None] | None = None,
    ) -> Path:
        """``write(path)`` the file ``name``, then verify it (:func:`verify_file`, then the
        optional format-specific ``check``); raises ``OSError`` naming the final path."""
        p = self.path(name)
        write(p)
        self.verify(name, check)
        return p

    def written(self, name: str) -> Path:
        """Record that ``name`` was written into this folder by a writer that verifies its own
        output (:func:`atomic_write`, ``io.write_image``), so :meth:`commit` does not re-check
        it. Raises ``OSError`` if it is not there."""
        p = self.path(name)
        if not p.is_file():
            raise OSError(f"cannot write '{self.target / name}': the file was not written")
        self._verified.add(name)
        return p

    def verify(self, name: str, check: Callable[[Path], None] | None = None) -> None:
        p = self.path(name)
        try:
            verify_file(p)
            if check is not None:
                check(p)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OSError(f"cannot write '{self.target / name}': {reason}") from None
        self._verified.add(name)

    def names(self) -> list[str]:
        return sorted(os.listdir(self.tmp))

    def commit(
        self, target: str | os.PathLike | None = None, replaces: Iterable[str] = (),
        last: Iterable[str] = (),
    ) -> list[str]:
        """Move the staged files into ``target`` (created if missing) and remove this folder.

        ``last`` names files that mark the set as complete (e.g. ``summary.json``): any old one
        in ``target`` is removed first and the new one moved in last, so an interrupted commit
        reads as unfinished. Names in ``replaces`` that the new set lacks are removed from
        ``target`` (what a previous run wrote and this one did not). Other files in ``target``
        are left alone. Headers (``.mhd``, ``.hdr``) move after their data files. Returns the
        moved names.
        """
        target = Path(target) if target is not None else self.target
        names = self.names()
        for name in names:
            if name not in self._verified:
                self.verify(name)
        last = [n for n in last if n in names]
        target.mkdir(exist_ok=True)
        for name in last:
            (target / name).unlink(missing_ok=True)
        order = sorted(
            (n for n in names if n not in last), key=lambda n: n.endswith((".mhd", ".hdr"))
        )
        for name in order:
            os.replace(self.tmp / name, target / name)
        for name in set(replaces) - set(names):
            (target / name).unlink(missing_ok=True)
        for name in last:
            os.replace(self.tmp / name, target / name)
        self.discard()
        return names

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object],
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write one file atomically: ``write(tmp)`` in a staging folder beside ``path``, verify it
    (:func:`verify_file` and ``check``), then ``os.replace`` it onto ``path``."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    with Staging(folder, target=folder) as staging:
        staging.add(path.name, write, check)
        staging.commit(folder)
    return path
