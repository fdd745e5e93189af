"""
Atomic file writes: a temporary file in the target's folder, flushed and synced, then renamed
over the target, so that a process killed while writing leaves the previous file intact and a
reader never sees half a file. Temporary files carry their writer's process id and host, so
that the next successful write of the same target removes those that killed writers left
(never a live writer's). Checkpoints (:mod:`pyro_wakesleep.checkpoint`) and the command's run
files (:mod:`pyro_wakesleep.cli.runs`) are written this way.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


def _temporary_prefix(path: Path) -> str:
    """``.NAME.`` for every temporary file of ``path``; ``.NAME.PID@HOST.`` for this process's."""
    return f".{path.name}."


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the temporary file ``name`` belongs to a live process of this machine."""
    owner = name[len(prefix) :].rsplit(".", 2)[0]  # PID@HOST of PID@HOST.RANDOM.tmp
    pid, _, host = owner.partition("@")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: PathLike) -> None:
    """Remove the temporary files that writers of ``path`` killed mid-write left behind (those of
    live processes on this machine stay)."""
    path = Path(path)
    prefix = _temporary_prefix(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp") and not _owner_alive(name, prefix):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


def _new_file_mode(path: Path) -> int:
    """The permissions a plain ``open`` would give ``path``: its own if it exists, else
    read-write for all less the process's umask (mkstemp's files are private)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    umask = 0o022
    try:
        with open("/proc/self/status") as status:  # Linux: the umask without changing it
            for line in status:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o666 & ~umask


def atomic_write(path: PathLike, write: Any, mode: str = "wb") -> None:
    """
    Write ``path`` atomically: ``write(file)`` fills a temporary file in the same folder, which
    is flushed, synced, then renamed over ``path``. A failure leaves ``path`` as it was and
    raises ``OSError`` naming it; a success also removes temporary files of ``path`` left by
    killed writers.

    :param path: the target file.
    :param write: a function of the open temporary file.
    :param mode: ``"wb"`` or ``"w"``.
    """
    path = Path(path)
    prefix = f"{_temporary_prefix(path)}{os.getpid()}@{socket.gethostname()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        newline = None if "b" in mode else ""
        with os.fdopen(fd, mode, newline=newline) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise OSError(f"{path}: cannot be written ({error.strerror or error})") from error
        if isinstance(error, RuntimeError):  # torch's writer reports a full disk this way
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise OSError(f"{path}: cannot be written ({reason}); is the disk full?") from error
        raise
    remove_stale_temporaries(path)


def atomic_save(obj: Any, path: PathLike) -> None:
    """
    :func:`torch.save` ``obj`` to ``path`` atomically (see :func:`atomic_write`).

    :param obj: what to save.
    :param path: the target file.
    :raises OSError: naming the file, when it cannot be written (a full disk, say); the
        previous file is then unchanged.
    """
    atomic_write(path, lambda f: torch.save(obj, f))
