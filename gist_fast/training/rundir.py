"""The run directory (``--output``): one run at a time, and a finished run is never overwritten silently.

* :class:`RunLock` holds an exclusive ``flock`` on ``OUTPUT/.gist-fast.lock`` for the run; a second run
  on the same directory is refused with the holder's pid. The kernel drops the lock when its process
  dies, so a killed run never blocks the next one.
* :func:`prepare_run_directory` refuses a directory that holds an earlier run unless ``--resume``
  (continue it) or ``--overwrite`` (remove its model, checkpoints and logs first) is given, and removes
  temporaries a killed run left behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .files import MANIFEST, WriteError, make_directory, remove_stale_temporaries

LOCK = ".gist-fast.lock"
SAVING_MARKER = ".gist-fast-saving"
# files whose presence means an earlier run wrote here
_RUN_FILES = ("results.json", "metrics.jsonl", MANIFEST, SAVING_MARKER, "model.safetensors")
# temporaries of an older gist-fast (tempfile's 8 random characters); removed only under the lock
_LEGACY_TMP = re.compile(r"^\.(step-\d{8}|latest|results\.json)\.[A-Za-z0-9_]{8}\.tmp$")

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded against each other
    fcntl = None


class RunDirectoryBusy(ValueError):
    """Another process is training into the same output directory."""


class RunLock:
    """An exclusive, non-blocking lock of a run directory, held until :meth:`release`.

    Args:
        output: the run directory (created if missing).

    Raises:
        RunDirectoryBusy naming the directory and the pid of the run holding it.

    Example:
        >>> with RunLock("runs/x"):  # doctest: +SKIP
        ...     train()
    """

    def __init__(self, output: str | os.PathLike) -> None:
        self.output = make_directory(output)
        self.path = self.output / LOCK
        self._fd: int | None = None
        if fcntl is None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WriteError(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryBusy(
                f"output directory {self.output} is in use by another gist-fast run (pid {holder}); "
                "wait for it to finish or choose another --output"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise WriteError(self.path, e) from None
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the lock file stays; it is empty of meaning without a holder)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def earlier_run_files(output: str | os.PathLike) -> list[Path]:
    """What an earlier run left in ``output``: final model, results, metrics log, checkpoints."""
    output = Path(output)
    found = [output / name for name in _RUN_FILES if (output / name).exists()]
    checkpoints = output / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.glob("step-*")):
        found.append(checkpoints)
    return found


def prepare_run_directory(output: str | os.PathLike, *, resume: bool, overwrite: bool) -> list[Path]:
    """Check ``output`` (locked by this process) before a run writes there; returns what was removed.

    A directory with an earlier run is refused unless ``resume`` (continue it) or ``overwrite``
    (its final model, checkpoints, ``metrics.jsonl`` and ``results.json`` are removed; the guide
    cache and the default run's data are kept). Stale temporaries of a killed run are removed.

    Raises:
        ValueError naming the directory and the option to use.
    """
    output = Path(output)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    removed = remove_stale_temporaries(output, _LEGACY_TMP)
    removed += remove_stale_temporaries(output / "checkpoints", _LEGACY_TMP)
    earlier = earlier_run_files(output)
    if not earlier or resume:
        return removed
    if not overwrite:
        names = ", ".join(p.name for p in earlier)
        raise ValueError(
            f"output directory {output} already holds a run ({names}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output"
        )
    _remove_final_model(output)
    for name in ("results.json", "metrics.jsonl", SAVING_MARKER):
        (output / name).unlink(missing_ok=True)
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
    return removed + earlier


def _remove_final_model(output: Path) -> None:
    """Remove the files the final model's manifest lists, then the manifest."""
    import json

    try:
        listed = json.loads((output / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        listed = {}
    for rel in listed:
        path = output / rel
        if ".." not in Path(rel).parts and path.is_file():
            path.unlink()
    (output / MANIFEST).unlink(missing_ok=True)
