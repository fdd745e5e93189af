"""
Run folders of the ``pyro-wakesleep`` command: one run per folder, never replaced or mixed
silently.

- :func:`new_run_folder` gives each run without ``--output`` a folder of its own,
  ``runs/<date>_<time>``, and :func:`point_latest` points ``runs/latest`` at the newest one
  (once it holds a checkpoint), as Hydra's dated output folders and Lightning's ``version_N``
  do.
- :class:`RunLock` makes a command the only writer of a folder: a lock file holding the
  owner's process id, locked with ``fcntl.flock``, which the operating system releases when
  the process dies, so a lock left by a killed run is taken over by the next command.
- :func:`claim` refuses a folder that holds a run unless it is replaced as a whole
  (``--overwrite``).
- :func:`write_json`, :func:`write_csv` and :func:`write_figure` write atomically (a temporary
  file, then a rename), like the checkpoint.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..files import atomic_write, remove_stale_temporaries

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: a lock file with a live owner's pid
    fcntl = None  # type: ignore[assignment]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.csv"
#: The final evaluation of ``train``, as JSON.
FINAL = "final.json"
FIGURES = ("learning_curves.png", "fantasies.png", "reconstructions.png")
LOCK = "run.lock"
#: The files a run writes in its folder.
RUN_FILES = (CHECKPOINT, CONFIG, METRICS, FINAL, *FIGURES)
#: The files ``evaluate`` writes in a run's folder (``evaluation_<samples>.json``).
EVALUATIONS = "evaluation_*.json"


def evaluation_file(num_samples: Optional[int], test_points: Optional[int] = None) -> str:
    """The name of the file ``evaluate`` writes: ``evaluation_<num_samples>.json`` on the run's
    own test points, ``evaluation_<num_samples>_test<test_points>.json`` on the
    ``test_points`` that ``--test-size`` chose, or ``evaluation_exact.json`` for an exact
    evaluation (``num_samples`` ``None``)."""
    if num_samples is None:
        return "evaluation_exact.json"
    tag = "" if test_points is None else f"_test{test_points}"
    return f"evaluation_{num_samples}{tag}.json"


class RunFolderError(Exception):
    """A run folder cannot be used as asked: it holds another run, another command is using
    it, or it is not a folder."""


# ------------------------------------------------------------------------- folders


def new_run_folder(root: Path) -> Path:
    """
    Create and return a new folder ``root/<date>_<time>`` (with ``-1``, ``-2``, ... when two
    runs start in the same second).
    """
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        folder = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RunFolderError(f"{root}: cannot create a new run folder for {stamp}")


def point_latest(folder: Path) -> Optional[str]:
    """
    Point ``folder.parent / "latest"`` at ``folder`` (a relative symbolic link, replaced
    atomically). Returns a warning when that cannot be done (``latest`` is a real folder or
    file, or the system makes no links), else ``None``.
    """
    link = folder.parent / "latest"
    if link.exists() and not link.is_symlink():
        return f"{link} is not a link (a run of an earlier version?): left as it is"
    tmp = folder.parent / f".latest.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(folder.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as error:
        if tmp.is_symlink():
            tmp.unlink()
        return f"cannot point {link} at {folder.name} ({error.strerror or error})"
    return None


def run_files(folder: Path) -> List[str]:
    """The run files present in ``folder``: :data:`RUN_FILES`, then the evaluations
    (:data:`EVALUATIONS`)."""
    present = [name for name in RUN_FILES if (folder / name).exists()]
    return present + sorted(p.name for p in folder.glob(EVALUATIONS) if p.is_file())


def claim(folder: Path, overwrite: bool) -> None:
    """
    Make ``folder`` ready for a new run: refuse one that holds a run (any of
    :data:`RUN_FILES` or an evaluation), or with ``overwrite`` remove that run's files (and
    nothing else).

    :raises RunFolderError: naming the files found and the ways on.
    """
    present = run_files(folder)
    if present and not overwrite:
        raise RunFolderError(
            f"{folder} holds a run ({', '.join(present)}): continue it with --resume {folder}, "
            "replace it with --overwrite, or choose another --output"
        )
    for name in present:
        (folder / name).unlink()
    for name in RUN_FILES:
        remove_stale_temporaries(folder / name)


# ------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """
    Hold ``folder/run.lock`` while a command writes to ``folder`` (a context manager). The
    folder is created if needed, and removed again on release if it was created here and is
    empty then (a run that stopped before writing anything leaves nothing behind).

    :param folder: the run folder.
    :param created: the caller has just created ``folder`` (remove it on release if empty).
    :raises RunFolderError: on entry, when another live process holds the lock (naming its
        process id), or ``folder`` is not a folder.
    """

    def __init__(self, folder: Path, created: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: Optional[int] = None
        self._created = created

    def __enter__(self) -> RunLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise RunFolderError(f"{self.folder} is not a folder")
        self._created = self._created or not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = self._acquire()
        except BaseException:
            self._remove_if_created()
            raise
        os.ftruncate(self._fd, 0)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.write(self._fd, f"{os.getpid()} {socket.gethostname()} {started}\n".encode())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _in_use(self, owner: str) -> RunFolderError:
        words = owner.split()
        who = f"process {words[0]}" + (f" on {words[1]}" if len(words) > 1 else "")
        return RunFolderError(
            f"{self.folder} is in use by {who} (another pyro-wakesleep command); wait for it to "
            f"finish or stop it (a lock left by a process that died is taken over: {self.path})"
        )

    def _acquire(self) -> int:
        while True:
            if fcntl is None:  # pragma: no cover - Windows
                return self._acquire_without_flock()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200).decode(errors="replace")
                os.close(fd)
                raise self._in_use(owner) from None
            # The previous owner may have removed the file between our open and our lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _acquire_without_flock(self) -> int:  # pragma: no cover - Windows
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self.path.read_text(errors="replace")
                words = owner.split()
                if words and words[0].isdigit() and _pid_alive(int(words[0])):
                    raise self._in_use(owner) from None
                self.path.unlink()  # the owner died: take the lock over

    def release(self) -> None:
        """Remove the lock file and let the lock go."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created:
            try:
                self.folder.rmdir()  # only if empty
            except OSError:
                pass


# ------------------------------------------------------------------------- files


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_csv(path: Path, fields: Sequence[str], rows: List[Dict[str, Any]]) -> None:
    """Write ``rows`` (dicts over ``fields``) as a CSV file with a header, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = buffer.getvalue()
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_figure(path: Path, figure: Any, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG, atomically."""
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=dpi))
