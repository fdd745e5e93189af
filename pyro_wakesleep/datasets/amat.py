"""
The original text files ``binarized_mnist_{train,valid,test}.amat``: one image per line, 784
space-separated 0/1 values. :func:`parse_amat` reads one file (fast for the canonical layout,
line by line otherwise, and MATLAB files that carry the ``.amat`` name through scipy);
:func:`amat_split` tells the split from the file name.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import dataset_error
from .layout import NUM_PIXELS, unpack_split

_AMAT_SPLIT = re.compile(r"(?:^|[_\-.])(train|valid|test)$")


def amat_split(path: Path) -> str | None:
    """
    The split a ``.amat`` file holds, from its name (``binarized_mnist_test.amat`` -> "test").

    :param path: the file.
    """
    match = _AMAT_SPLIT.search(path.stem.lower())
    return match.group(1) if match else None


def _parse_amat_lines(raw: bytes, path: object) -> np.ndarray:
    """
    The slow, careful parser: one row per non-blank line, 784 whitespace-separated 0/1 values
    (``0``, ``1``, or the same as floats, e.g. ``1.0``). Finds and reports the first bad line.

    :param raw: the file's bytes.
    :param path: the file, for error messages.
    """
    rows = []
    fix = "each line must hold 784 space-separated values 0 or 1, one image per line"
    for lineno, line in enumerate(raw.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != NUM_PIXELS:
            raise dataset_error(path, f"line {lineno} has {len(tokens)} values, expected 784", fix)
        try:
            values = np.array([float(t) for t in tokens])
        except ValueError as err:
            raise dataset_error(
                path, f"line {lineno} holds a value that is not a number", fix
            ) from err
        bad = (values != 0) & (values != 1)
        if bad.any():
            col = int(np.argmax(bad))
            raise dataset_error(
                path,
                f"line {lineno} value {col + 1} is {tokens[col].decode(errors='replace')!r},"
                " not 0 or 1",
                fix,
            )
        rows.append(values.astype(np.uint8))
    if not rows:
        raise dataset_error(path, "holds no rows", fix)
    return np.stack(rows)


def parse_amat(path: Path, name: object = None) -> np.ndarray:
    """
    Rows of one ``binarized_mnist_*.amat`` file as uint8 0/1 (N, 784).

    The original files are text, one image per line. Files in the canonical layout (single
    spaces, ``\\n`` or ``\\r\\n`` line ends) are parsed in one vectorized pass; anything else
    goes through a line-by-line parser that reports the first bad line. Some copies that carry
    the ``.amat`` name are really MATLAB v5 files holding a uint8 variable ``X``; those are read
    with ``scipy.io.loadmat`` when scipy is installed.

    :param path: the file.
    :param name: how to name the file in error messages (default: ``path``).
    """
    name = path if name is None else name
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise dataset_error(name, "file not found", "check the path or use download=True") from err
    except OSError as err:
        raise dataset_error(name, f"cannot be read ({err.strerror})", "check the path") from err
    if raw.startswith(b"MATLAB"):
        return _parse_matlab_amat(path, name)
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    if raw and not raw.endswith(b"\n"):
        raw += b"\n"
    width = 2 * NUM_PIXELS  # "0 1 ... 1\n": 784 digits, 783 spaces and a newline
    if raw and len(raw) % width == 0:
        grid = np.frombuffer(raw, dtype=np.uint8).reshape(-1, width)
        digits = grid[:, 0::2]
        if (
            (grid[:, 1:-1:2] == ord(" ")).all()
            and (grid[:, -1] == ord("\n")).all()
            and ((digits == ord("0")) | (digits == ord("1"))).all()
        ):
            return digits - np.uint8(ord("0"))
    return _parse_amat_lines(raw, name)


def _parse_matlab_amat(path: Path, name: object) -> np.ndarray:
    """
    A MATLAB v5 file named ``.amat`` holding the rows as a variable ``X`` (N, 784) of 0/1.

    :param path: the file.
    :param name: how to name the file in error messages.
    """
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise dataset_error(
            name,
            "is a MATLAB .mat file, not the text .amat format, and scipy is not installed",
            "pip install scipy, or use the text .amat files or a binarized_mnist.npz",
        ) from err
    try:
        content = loadmat(str(path))
    except Exception as err:  # scipy raises many types for a corrupt file
        raise dataset_error(
            name, f"is a corrupt MATLAB file ({type(err).__name__})", "download it again"
        ) from err
    if "X" not in content:
        raise dataset_error(
            name, "MATLAB file has no variable 'X'", "store the rows (N, 784) as 'X'"
        )
    return unpack_split(np.asarray(content["X"]), "X", name)
