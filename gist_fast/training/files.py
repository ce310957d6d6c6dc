"""Files that training writes: atomic, checksummed, following the umask, and cleaned up after a kill.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` write a temporary file next to the target
  and rename it over the target, so a reader sees the old file or the new one, never half of one.
* Temporaries are named ``.<target>.<host>-<pid>-<random>.gist-fast.tmp``: :func:`remove_stale_temporaries`
  removes those whose writing process (on this host) has died (a kill, a power cut) and leaves
  everything else alone, including another host's on a shared file system.
* A manifest (``gist-fast-manifest.json``: size and SHA-256 of every file of a directory) is written
  last; :func:`verify_manifest` checks a directory against it.
* Files are created with mode ``0o666`` and directories ``0o777``, less the umask (as ``open`` does).
* An ``OSError`` while writing (disk full, read-only directory) is raised again as :class:`WriteError`,
  whose one-line message names the file, after the temporary is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".gist-fast.tmp"
MANIFEST = "gist-fast-manifest.json"
MANIFEST_FORMAT = "gist-fast-manifest/1"
# .<target>.<host>-<pid>-<16 hex>.gist-fast.tmp
_OURS = re.compile(r"^\..+\.([A-Za-z0-9]{1,16})-(\d+)-[0-9a-f]{16}" + re.escape(TMP_SUFFIX) + "$")


def _host() -> str:
    """This machine's name, reduced to letters and digits (at most 16) for temporary names."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


class WriteError(OSError):
    """Writing ``path`` failed (disk full, read-only directory, ...); nothing half-written was left."""

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno or errno.EIO, f"cannot write {path}: {reason}")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


class CorruptFileError(ValueError):
    """A file does not match its checksum (or cannot be parsed); ``path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)


def temporary_name(target: str | os.PathLike, pid: int | None = None) -> Path:
    """A fresh temporary path in ``target``'s directory, recognisable by :func:`remove_stale_temporaries`
    (``pid``: the writing process, default this one)."""
    target = Path(target)
    pid = os.getpid() if pid is None else pid
    return target.parent / f".{target.name}.{_host()}-{pid}-{secrets.token_hex(8)}{TMP_SUFFIX}"


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_directory(path: str | os.PathLike) -> Path:
    """``mkdir -p`` (mode 0o777 less the umask); raises :class:`WriteError` naming ``path``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e) from None
    return path


def current_umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it races with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything below it the modes ``open`` / ``mkdir`` would (0o666 / 0o777
    less the umask): some writers (e.g. a library's model save) create 0o600 files."""
    mask = current_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory).

    Raises:
        WriteError naming ``path``; the temporary file is removed and an old ``path`` is untouched.

    Example:
        >>> atomic_write_bytes(Path(tmp) / "x.bin", b"hello")  # doctest: +SKIP
    """
    path = Path(path)
    make_directory(path.parent)
    tmp = temporary_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files_under(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(TMP_SUFFIX):
            out.append(p.relative_to(root).as_posix())
    return out


def manifest_of(root: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """Size and SHA-256 of every file under ``root`` (relative POSIX paths), plus ``extra`` fields."""
    root = Path(root)
    files = {
        rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in _files_under(root)
    }
    return {"format": MANIFEST_FORMAT, **extra, "files": files}


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``root``'s manifest (default: :func:`manifest_of` ``root``) atomically; returns it."""
    manifest = manifest if manifest is not None else manifest_of(root)
    atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of ``root``; raises :class:`CorruptFileError` naming it when missing or unreadable."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptFileError(path, "missing (an incomplete write, or not written by gist-fast)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(path, f"unreadable ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CorruptFileError(path, f"not a {MANIFEST_FORMAT} manifest")
    return manifest


def verify_manifest(root: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check every file ``root``'s manifest lists (size, then SHA-256); returns the manifest.

    Args:
        root: the directory.
        required: relative paths the manifest must list.

    Raises:
        CorruptFileError naming the first file that is missing, has another size or another hash.
    """
    root = Path(root)
    manifest = read_manifest(root)
    for rel in required:
        if rel not in manifest["files"]:
            raise CorruptFileError(root / MANIFEST, f"does not list {rel}")
    for rel, entry in manifest["files"].items():
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not inside(path, root):
            raise CorruptFileError(root / MANIFEST, f"lists a path outside {root}: {rel!r}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorruptFileError(path, "missing") from None
        if size != entry.get("size"):
            raise CorruptFileError(path, f"{size} bytes, the manifest says {entry.get('size')} (truncated or changed)")
        if sha256_file(path) != entry.get("sha256"):
            raise CorruptFileError(path, "checksum mismatch (the file is corrupted or was changed)")
    return manifest


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when ``path`` resolves (symlinks followed) to ``root`` or somewhere below it."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike, legacy: re.Pattern[str] | None = None) -> list[Path]:
    """Remove our temporaries in ``directory`` (not below it) whose writing process on this host is gone.

    Only names made by :func:`temporary_name` count (plus, when given, names matching ``legacy``,
    for a directory this process holds locked); another program's ``*.tmp`` files are kept.
    Returns the removed paths.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        m = _OURS.match(entry.name)
        ours_and_dead = m is not None and m.group(1) == _host() and not _pid_alive(int(m.group(2)))
        stale = ours_and_dead or (legacy is not None and legacy.match(entry.name))
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
