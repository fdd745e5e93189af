"""
Datasets for wake-sleep experiments: binarized MNIST, plain MNIST with dynamic binarization, a
small shipped subset of binarized MNIST, and the bars problem.

- :func:`load_binarized_mnist` reads the standard *fixed* binarization of MNIST (Salakhutdinov &
  Murray 2008; Larochelle & Murray 2011): 50,000 / 10,000 / 10,000 rows of 784 zeros and ones,
  either from a compact ``.npz`` (bit-packed rows) or from the original text files
  ``binarized_mnist_{train,valid,test}.amat``. :func:`download_binarized_mnist` fetches those
  files, checks them and caches them as a compact ``.npz``.
- The rows of the fixed ``test`` split are the MNIST test images sorted by label with a stable
  sort, so their labels are ``np.sort(y_test)``: :func:`binarized_mnist_test_labels`. The
  ``train``/``valid`` rows are a shuffle of the MNIST training images and carry no labels.
- :func:`load_mnist` reads plain MNIST (``x_train``, ``y_train``, ``x_test``, ``y_test``) and
  :func:`dynamic_binarization` draws a fresh Bernoulli(pixel / 255) image each call.
- :func:`load_digits` loads ``pyro_wakesleep/data/digits.npz``, 3,000 training and 1,000
  labelled test rows of the fixed binarized MNIST shipped with the package (see
  :mod:`pyro_wakesleep.data.make_digits` for where the rows come from).
- :class:`Bars` is the bars problem of Hinton, Dayan, Frey & Neal (1995), with its exact data
  distribution, entropy and KL divergence to a model.
- :func:`load_dataset` picks one of these by name.
- :func:`read_npz`, :func:`npz_bytes`, :func:`write_atomic` and :func:`packed_sha256` are the
  file helpers these use: ``.npz`` archives read without pickle, ``.npz`` bytes that depend only
  on the arrays, atomic writes, and the checksum of bit-packed rows.

Every missing or malformed file raises :class:`DatasetError`, whose one-line message names the
file, what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Union
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np
import torch

__all__ = [
    "BINARIZED_MNIST_SHA256",
    "BINARIZED_MNIST_SIZES",
    "BINARIZED_MNIST_URL",
    "CACHE_ENV_VAR",
    "DATASET_NAMES",
    "Bars",
    "DatasetError",
    "binarized_mnist_test_labels",
    "default_cache_dir",
    "download_binarized_mnist",
    "dynamic_binarization",
    "load_binarized_mnist",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "npz_bytes",
    "packed_sha256",
    "read_npz",
    "write_atomic",
]

PathLike = Union[str, Path]

#: Where the original text files ``binarized_mnist_{train,valid,test}.amat`` were published.
BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"

#: Rows in each split of the fixed binarized MNIST.
BINARIZED_MNIST_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}

#: sha256 of ``np.packbits(rows, axis=1).tobytes()`` for each split, ``rows`` being the uint8 0/1
#: array (N, 784) in file order. No published checksum of the original text files is known, and
#: text files can differ in whitespace while holding the same data, so the check is on the parsed
#: rows instead. These values were computed from ``binarized_mnist.npz`` of the project's shared
#: data, whose arrays were taken from mingzhang-yin/ARM-gradient and found identical, element for
#: element, to an independent copy in mad-ant/TheanoNADE (see the project's data SOURCES.md).
BINARIZED_MNIST_SHA256 = {
    "train": "727146c35424b019f3e350e1e69faa05644a0abaf787e3f4e1a9632220a13906",
    "valid": "a256ac44ae26be720fad8616a05ed6ecfd1619930d9a208379bb2a4405df5b6d",
    "test": "9fcd8da6f0fdf09b2ba30fe63a0bb784042a0de82563172530229b983e294ff2",
}

#: Environment variable that overrides the default cache folder ``~/.cache/pyro_wakesleep``.
CACHE_ENV_VAR = "PYRO_WAKESLEEP_CACHE"

_SPLITS = ("train", "valid", "test")
_NUM_PIXELS = 784
_PACKED_WIDTH = (_NUM_PIXELS + 7) // 8  # 98 bytes per bit-packed row
_MNIST_SIZES = {"train": 60_000, "test": 10_000}
_COMPACT_NAME = "binarized_mnist.npz"
_AMAT_SPLIT = re.compile(r"(?:^|[_\-.])(train|valid|test)$")


class DatasetError(ValueError):
    """A data file is missing or malformed; the message names the file, the problem and a fix."""


def _error(path: object, problem: str, fix: str) -> DatasetError:
    """
    Build a one-line :class:`DatasetError`.

    :param path: the file or folder concerned.
    :param problem: what is wrong with it.
    :param fix: how to fix it.
    """
    message = f"{path}: {problem}; {fix}"
    return DatasetError(" ".join(message.split()))


# --------------------------------------------------------------------------------------------
# Cache folder and compact files
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """
    The cache folder: ``$PYRO_WAKESLEEP_CACHE`` if set, else ``~/.cache/pyro_wakesleep``.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pyro_wakesleep"


def _resolve_cache_dir(cache_dir: PathLike | None) -> Path:
    """
    :param cache_dir: an explicit folder, or None for :func:`default_cache_dir`.
    """
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def npz_bytes(arrays: Mapping[str, np.ndarray], compresslevel: int = 6) -> bytes:
    """
    A compressed ``.npz`` whose bytes depend only on the arrays (fixed member timestamps), so
    rewriting the same arrays gives the same file. ``np.load`` reads it like any other ``.npz``.

    :param arrays: name -> array; no object arrays.
    :param compresslevel: zlib level, 0..9 (9 is about 5x slower than 6 for 3% less).
    :returns: the bytes of the ``.npz`` file (write them with :func:`write_atomic`).
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue(), compresslevel=compresslevel)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """
    Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``,
    so ``path`` is either absent, the old file or the complete new one, never a partial file.

    :param path: the destination; missing parent folders are created.
    :param data: the bytes to write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result is an ordinary data file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def packed_sha256(packed: np.ndarray) -> str:
    """
    The checksum of bit-packed rows, as in :data:`BINARIZED_MNIST_SHA256`: the sha256 of their
    bytes in row-major order.

    :param packed: bit-packed rows, uint8 (N, 98), i.e. ``np.packbits(rows, axis=1)`` of the
        uint8 0/1 rows (N, 784).
    :returns: the hex digest.
    """
    return hashlib.sha256(np.ascontiguousarray(packed, dtype=np.uint8).tobytes()).hexdigest()


def read_npz(path: Path | io.BytesIO, name: object) -> dict[str, np.ndarray]:
    """
    All arrays of an ``.npz``, read eagerly without pickle.

    :param path: the file, or an in-memory copy of it.
    :param name: how to name the file in error messages.
    :returns: array name -> array.
    :raises DatasetError: the file is missing, a single ``.npy`` array, truncated or corrupt, or
        holds object arrays (which would need pickle).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise _error(
                    name, "is a single .npy array, not an .npz archive", "pass an .npz file"
                )
            return {key: npz[key] for key in npz.files}
    except DatasetError:
        raise
    except FileNotFoundError as err:
        raise _error(name, "file not found", "check the path") from err
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise _error(
            name,
            f"cannot be read as an .npz archive ({type(err).__name__}: {err})",
            "the file is truncated or corrupt; delete it and download or regenerate it",
        ) from err


def _unpack_split(array: np.ndarray, split: str, path: object) -> np.ndarray:
    """
    Rows of one split as uint8 0/1 (N, 784), from bit-packed uint8 (N, 98) (as written by
    ``np.packbits(x, axis=1)``) or from unpacked 0/1 values (N, 784).

    :param array: the stored array.
    :param split: its name, for error messages.
    :param path: the file, for error messages.
    """
    fix = "write each split as np.packbits(x, axis=1) of the uint8 0/1 rows x (N, 784)"
    if array.ndim != 2 or array.shape[1] not in (_PACKED_WIDTH, _NUM_PIXELS):
        raise _error(
            path, f"array '{split}' has shape {array.shape}, expected (N, 98) or (N, 784)", fix
        )
    if array.shape[1] == _PACKED_WIDTH:
        if array.dtype != np.uint8:
            raise _error(path, f"packed array '{split}' has dtype {array.dtype}, not uint8", fix)
        return np.unpackbits(array, axis=1)  # 98 bytes are exactly 784 bits: no padding
    if array.dtype.kind not in "biuf":
        raise _error(path, f"array '{split}' has non-numeric dtype {array.dtype}", fix)
    bad = (array != 0) & (array != 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        value = array[row, col].item()
        raise _error(path, f"array '{split}' row {row} pixel {col} is {value!r}, not 0 or 1", fix)
    return array.astype(np.uint8)


def _check_rows(rows: int, split: str, path: object) -> None:
    """
    :param rows: number of rows found.
    :param split: the split name; only train/valid/test are checked.
    :param path: the file, for error messages.
    """
    expected = BINARIZED_MNIST_SIZES.get(split)
    if expected is not None and rows != expected:
        raise _error(
            path,
            f"split '{split}' has {rows} rows, expected {expected}",
            "the file is incomplete or not the standard binarized MNIST; "
            "pass check_sizes=False to load it anyway",
        )


def _load_compact(path: Path, check_sizes: bool) -> dict[str, np.ndarray]:
    """
    The three splits of a compact binarized-MNIST ``.npz``, as uint8 0/1 arrays (N, 784).

    :param path: the file.
    :param check_sizes: require 50,000 / 10,000 / 10,000 rows.
    """
    arrays = read_npz(path, path)
    missing = [split for split in _SPLITS if split not in arrays]
    if missing:
        raise _error(
            path,
            f"has no array {', '.join(repr(m) for m in missing)} (found: "
            f"{', '.join(sorted(arrays)) or 'nothing'})",
            "expected arrays train, valid and test as in binarized_mnist.npz",
        )
    if "shape" in arrays and arrays["shape"].tolist() != [28, 28]:
        raise _error(
            path, f"'shape' is {arrays['shape'].tolist()}, expected [28, 28]", "use 28x28 images"
        )
    out = {}
    for split in _SPLITS:
        out[split] = _unpack_split(arrays[split], split, path)
        if check_sizes:
            _check_rows(len(out[split]), split, path)
    return out


# --------------------------------------------------------------------------------------------
# .amat text files
# --------------------------------------------------------------------------------------------


def _amat_split(path: Path) -> str | None:
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
        if len(tokens) != _NUM_PIXELS:
            raise _error(path, f"line {lineno} has {len(tokens)} values, expected 784", fix)
        try:
            values = np.array([float(t) for t in tokens])
        except ValueError as err:
            raise _error(path, f"line {lineno} holds a value that is not a number", fix) from err
        bad = (values != 0) & (values != 1)
        if bad.any():
            col = int(np.argmax(bad))
            raise _error(
                path,
                f"line {lineno} value {col + 1} is {tokens[col].decode(errors='replace')!r},"
                " not 0 or 1",
                fix,
            )
        rows.append(values.astype(np.uint8))
    if not rows:
        raise _error(path, "holds no rows", fix)
    return np.stack(rows)


def _parse_amat(path: Path, name: object = None) -> np.ndarray:
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
        raise _error(name, "file not found", "check the path or use download=True") from err
    except OSError as err:
        raise _error(name, f"cannot be read ({err.strerror})", "check the path") from err
    if raw.startswith(b"MATLAB"):
        return _parse_matlab_amat(path, name)
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    if raw and not raw.endswith(b"\n"):
        raw += b"\n"
    width = 2 * _NUM_PIXELS  # "0 1 ... 1\n": 784 digits, 783 spaces and a newline
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
        raise _error(
            name,
            "is a MATLAB .mat file, not the text .amat format, and scipy is not installed",
            "pip install scipy, or use the text .amat files or a binarized_mnist.npz",
        ) from err
    try:
        content = loadmat(str(path))
    except Exception as err:  # scipy raises many types for a corrupt file
        raise _error(
            name, f"is a corrupt MATLAB file ({type(err).__name__})", "download it again"
        ) from err
    if "X" not in content:
        raise _error(name, "MATLAB file has no variable 'X'", "store the rows (N, 784) as 'X'")
    return _unpack_split(np.asarray(content["X"]), "X", name)


def _load_amat_dir(folder: Path, check_sizes: bool) -> dict[str, np.ndarray]:
    """
    :param folder: holds ``binarized_mnist_{train,valid,test}.amat``.
    :param check_sizes: require 50,000 / 10,000 / 10,000 rows.
    """
    out = {}
    for split in _SPLITS:
        file = folder / f"binarized_mnist_{split}.amat"
        out[split] = _parse_amat(file)
        if check_sizes:
            _check_rows(len(out[split]), split, file)
    return out


# --------------------------------------------------------------------------------------------
# Fixed binarized MNIST
# --------------------------------------------------------------------------------------------


def _to_float(rows: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """
    :param rows: split -> uint8 0/1 array.
    """
    return {split: torch.from_numpy(np.ascontiguousarray(x)).float() for split, x in rows.items()}


def load_binarized_mnist(
    path: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    download: bool = False,
    check_sizes: bool = True,
) -> dict[str, torch.Tensor]:
    """
    The fixed binarized MNIST as float32 tensors of zeros and ones:
    ``{"train": (50000, 784), "valid": (10000, 784), "test": (10000, 784)}``, rows in the
    order of the original ``.amat`` files. The ``test`` rows are the MNIST test set sorted by
    label (see :func:`binarized_mnist_test_labels`).

    ``path`` may be

    - a compact ``.npz`` with uint8 arrays ``train``, ``valid``, ``test``, each
      ``np.packbits(x, axis=1)`` of the 0/1 rows (unpacked 0/1 arrays (N, 784) are accepted
      too), and optionally ``shape`` = [28, 28];
    - a folder holding ``binarized_mnist_{train,valid,test}.amat`` (text, one row of 784
      space-separated 0/1 values per line), or else a ``binarized_mnist.npz``;
    - a single ``.amat`` file: the result then has one entry, keyed by the split named in the
      file name (``binarized_mnist_test.amat`` -> ``{"test": ...}``), or ``"data"`` if the
      name names no split;
    - None: ``binarized_mnist.npz`` in the cache folder, downloaded first if ``download``.

    :param path: where the data is; see above.
    :param cache_dir: the cache folder used when ``path`` is None (default
        :func:`default_cache_dir`).
    :param download: with ``path=None``, download the data if it is not in the cache yet.
    :param check_sizes: require the standard 50,000 / 10,000 / 10,000 rows (turn off for
        subsets).
    :raises DatasetError: the file is missing, has the wrong extension or is malformed.
    """
    if path is None:
        cache = _resolve_cache_dir(cache_dir)
        compact = cache / _COMPACT_NAME
        if not compact.exists():
            if not download:
                raise _error(
                    compact,
                    "no path given and binarized MNIST is not in the cache",
                    "pass path= to your copy, or download=True to fetch it",
                )
            compact = download_binarized_mnist(cache)
        return _to_float(_load_compact(compact, check_sizes))
    path = Path(path).expanduser()
    if path.is_dir():
        amat = [path / f"binarized_mnist_{split}.amat" for split in _SPLITS]
        if any(file.exists() for file in amat) or not (path / _COMPACT_NAME).exists():
            missing = [file.name for file in amat if not file.exists()]
            if missing:
                raise _error(
                    path,
                    f"folder lacks {', '.join(missing)}",
                    f"put the three binarized_mnist_*.amat files or a {_COMPACT_NAME} there",
                )
            return _to_float(_load_amat_dir(path, check_sizes))
        return _to_float(_load_compact(path / _COMPACT_NAME, check_sizes))
    if not path.exists():
        raise _error(
            path, "file not found", "check the path, or call with download=True and no path"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _to_float(_load_compact(path, check_sizes))
    if suffix == ".amat":
        split = _amat_split(path)
        rows = _parse_amat(path)
        if check_sizes and split is not None:
            _check_rows(len(rows), split, path)
        return _to_float({split or "data": rows})
    raise _error(
        path,
        f"unsupported file type '{path.suffix}'",
        "pass a .npz, a .amat file or a folder with the binarized_mnist_*.amat files",
    )


def download_binarized_mnist(
    cache_dir: PathLike | None = None,
    *,
    base_url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """
    Download ``binarized_mnist_{train,valid,test}.amat`` from ``base_url``, check them and
    save them as a compact ``binarized_mnist.npz`` in the cache folder; return its path.

    If a valid ``binarized_mnist.npz`` (matching ``checksums``) is already in the cache, nothing
    is downloaded. The text files are fetched into a temporary folder inside the cache folder,
    parsed, and each split checked against ``checksums`` (sha256 of the bit-packed rows, see
    :data:`BINARIZED_MNIST_SHA256`) before the ``.npz`` is written atomically; on any failure
    the temporary files are removed and no ``binarized_mnist.npz`` is left behind.

    :param cache_dir: the cache folder (default :func:`default_cache_dir`, i.e.
        ``$PYRO_WAKESLEEP_CACHE`` or ``~/.cache/pyro_wakesleep``).
    :param base_url: the URL the three file names are appended to (a mirror, or a ``file://``
        URL of a local folder); default :data:`BINARIZED_MNIST_URL`.
    :param checksums: split -> sha256 of ``np.packbits(rows, axis=1).tobytes()``; default
        :data:`BINARIZED_MNIST_SHA256`.
    :param timeout: seconds to wait for the server.
    :raises DatasetError: a download failed or a file is malformed or has the wrong checksum.
    """
    base_url = BINARIZED_MNIST_URL if base_url is None else base_url
    checksums = BINARIZED_MNIST_SHA256 if checksums is None else checksums
    cache = _resolve_cache_dir(cache_dir)
    target = cache / _COMPACT_NAME
    if target.exists():
        try:
            arrays = read_npz(target, target)
            if all(
                split in arrays and packed_sha256(arrays[split]) == checksums[split]
                for split in _SPLITS
            ):
                return target
        except DatasetError:
            pass  # a corrupt cache entry is replaced below
    cache.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
    try:
        packed = {}
        for split in _SPLITS:
            name = f"binarized_mnist_{split}.amat"
            url = base_url.rstrip("/") + "/" + name
            file = workdir / name
            try:
                with urlopen(url, timeout=timeout) as response, open(file, "wb") as out:
                    shutil.copyfileobj(response, out, length=1 << 20)
            except (URLError, OSError) as err:
                reason = getattr(err, "reason", None) or err
                raise _error(
                    url,
                    f"download failed ({reason})",
                    "check the network, or fetch the .amat files yourself and pass path=",
                ) from err
            packed[split] = np.packbits(_parse_amat(file, name=url), axis=1)
            digest = packed_sha256(packed[split])
            if digest != checksums[split]:
                raise _error(
                    url,
                    f"checksum mismatch for split '{split}' (sha256 of packed rows {digest}, "
                    f"expected {checksums[split]})",
                    "the download is corrupt or the file changed upstream; retry, or use a "
                    "verified copy with path=",
                )
            file.unlink()
        packed["shape"] = np.array([28, 28], dtype=np.int64)
        write_atomic(target, npz_bytes(packed))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target


def binarized_mnist_test_labels(mnist_path: PathLike) -> torch.Tensor:
    """
    Labels of the fixed binarized MNIST ``test`` rows, int64 (10000,).

    The test rows are the MNIST test images sorted by label with a stable sort (row ``i`` is
    MNIST test image ``np.argsort(y_test, kind="stable")[i]``), so the labels are
    ``np.sort(y_test)``. The ``train``/``valid`` rows are a random permutation of the MNIST
    training set and have no recoverable labels.

    :param mnist_path: plain MNIST ``.npz`` (see :func:`load_mnist`).
    :raises DatasetError: the file is missing or malformed.
    """
    y_test = load_mnist(mnist_path)["y_test"]
    return torch.sort(y_test, stable=True).values


# --------------------------------------------------------------------------------------------
# Plain MNIST and dynamic binarization
# --------------------------------------------------------------------------------------------


def load_mnist(path: PathLike, *, check_sizes: bool = True) -> dict[str, torch.Tensor]:
    """
    Plain MNIST from an ``.npz`` with uint8 ``x_train`` (60000, 28, 28), ``y_train`` (60000,),
    ``x_test`` (10000, 28, 28) and ``y_test`` (10000,), in the original order with raw 0..255
    pixels. Returns the same keys as tensors: images uint8, labels int64.

    :param path: the ``.npz`` file.
    :param check_sizes: require 60,000 training and 10,000 test images.
    :raises DatasetError: the file is missing or malformed.
    """
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix.lower() != ".npz":
        raise _error(path, "is not an .npz file", "pass an mnist.npz with x_train/y_train/...")
    arrays = read_npz(path, path)
    fix = "expected uint8 x_train (N, 28, 28), y_train (N,), x_test and y_test as in mnist.npz"
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise _error(path, f"has no array {', '.join(repr(m) for m in missing)}", fix)
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise _error(path, f"x_{split} is {x.dtype} {x.shape}", fix)
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise _error(path, f"y_{split} is {y.dtype} {y.shape} for {len(x)} images", fix)
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise _error(path, f"y_{split} holds labels outside 0..9", fix)
        if check_sizes and len(x) != _MNIST_SIZES[split]:
            raise _error(
                path,
                f"x_{split} has {len(x)} images, expected {_MNIST_SIZES[split]}",
                "pass check_sizes=False to load a subset",
            )
        out[f"x_{split}"] = torch.from_numpy(np.ascontiguousarray(x))
        out[f"y_{split}"] = torch.from_numpy(y.astype(np.int64))
    return out


def dynamic_binarization(
    images: torch.Tensor | np.ndarray, generator: torch.Generator | None = None
) -> torch.Tensor:
    """
    A fresh binarization: each pixel is 1 with probability pixel / 255, drawn anew each call.

    :param images: (N, ...) integer intensities 0..255 (e.g. uint8 (N, 28, 28)), or floats
        in [0, 1] that are used as the probabilities directly.
    :param generator: random generator for reproducible draws.
    :returns: float32 (N, prod(...)) of zeros and ones, e.g. (N, 784).
    :raises ValueError: intensities outside 0..255, or floats outside [0, 1].
    """
    images = torch.as_tensor(images)
    if images.dtype.is_floating_point:
        probs = images.float()
        if probs.numel() and (probs.min() < 0 or probs.max() > 1):
            raise ValueError("floating-point images must be probabilities in [0, 1]")
    elif images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"images of dtype {images.dtype} are not intensities 0..255")
    else:
        if images.numel() and (images.min() < 0 or images.max() > 255):
            raise ValueError("integer images must hold intensities in 0..255")
        probs = images.float() / 255.0
    probs = probs.reshape(probs.shape[0], -1)
    return torch.bernoulli(probs, generator=generator)


# --------------------------------------------------------------------------------------------
# The shipped subset
# --------------------------------------------------------------------------------------------


def load_digits() -> dict[str, torch.Tensor]:
    """
    The small real subset of the fixed binarized MNIST shipped with the package
    (``pyro_wakesleep/data/digits.npz``, read through :mod:`importlib.resources`, so it works
    from an installed wheel): ``"train"`` float32 (3000, 784), the first 3,000 rows of the
    binarized ``train`` split; ``"test"`` float32 (1000, 784), every 10th row of the
    label-sorted binarized ``test`` split (all ten digits, about 100 each); ``"test_labels"``
    int64 (1000,). :mod:`pyro_wakesleep.data.make_digits` regenerates the file.

    :raises DatasetError: the shipped file is missing or malformed (a broken installation).
    """
    resource = resources.files("pyro_wakesleep.data").joinpath("digits.npz")
    name = f"pyro_wakesleep/data/digits.npz ({resource})"
    fix = "reinstall pyro-wakesleep or run python -m pyro_wakesleep.data.make_digits"
    try:
        data = resource.read_bytes()
    except OSError as err:
        raise _error(name, "is missing from the installed package", fix) from err
    arrays = read_npz(io.BytesIO(data), name)
    for key in ("train", "test", "test_labels"):
        if key not in arrays:
            raise _error(name, f"has no array '{key}'", fix)
    train = _unpack_split(arrays["train"], "train", name)
    test = _unpack_split(arrays["test"], "test", name)
    labels = arrays["test_labels"]
    if labels.shape != (len(test),) or labels.dtype.kind not in "iu":
        raise _error(name, f"test_labels is {labels.dtype} {labels.shape}", fix)
    return {
        "train": torch.from_numpy(train).float(),
        "test": torch.from_numpy(test).float(),
        "test_labels": torch.from_numpy(labels.astype(np.int64)),
    }


# --------------------------------------------------------------------------------------------
# The bars problem
# --------------------------------------------------------------------------------------------


class Bars:
    """
    The bars problem (Hinton, Dayan, Frey & Neal 1995): ``size`` x ``size`` binary images.
    With probability ``p_vertical`` the bars are vertical, else horizontal; each of the
    ``size`` bars is then on independently with probability ``p_on``. Images are flattened
    row-major; a vertical bar is a column of ones.

    The all-off and all-on images arise from both orientations, so the distinct images number
    ``2 * 2**size - 2`` (30 for 4x4), and the default 4x4 distribution has entropy about
    2.376 nats.

    :param size: side of the square image.
    :param p_vertical: probability that the bars are vertical.
    :param p_on: probability that each bar is on.
    """

    def __init__(self, size: int = 4, p_vertical: float = 2 / 3, p_on: float = 0.2) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        for name, p in (("p_vertical", p_vertical), ("p_on", p_on)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        self.size = size
        self.p_vertical = float(p_vertical)
        self.p_on = float(p_on)

    def __repr__(self) -> str:
        return f"Bars(size={self.size}, p_vertical={self.p_vertical}, p_on={self.p_on})"

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """
        Draw ``num`` images. For a given generator state the draws equal those of
        ``examples/quickstart.py`` (first the bars, then the orientations).

        :param num: number of images.
        :param generator: random generator for reproducible draws.
        :returns: float32 (num, size * size) of zeros and ones.
        """
        s = self.size
        on = torch.rand(num, s, generator=generator) < self.p_on
        vertical = torch.rand(num, generator=generator) < self.p_vertical
        columns = on[:, None, :].expand(-1, s, s)  # vertical bars: column j is bar j
        rows = on[:, :, None].expand(-1, s, s)  # horizontal bars: row j is bar j
        images = torch.where(vertical[:, None, None], columns, rows)
        return images.reshape(num, s * s).float()

    def distribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The exact data distribution over distinct images with positive probability. Images that
        arise from both orientations (all off, all on) are merged, their probabilities added.
        Order: vertical patterns by bar code 0, 1, ..., then the remaining horizontal ones.

        :returns: ``(images, probs)``: float32 (M, size * size) and float64 (M,) summing to 1.
        """
        s = self.size
        if s > 20:
            raise ValueError(f"distribution() enumerates 2 * 2**size images; size {s} is too big")
        codes = torch.arange(2**s)
        on = (codes[:, None] >> torch.arange(s)) & 1  # (2**s, s), bar j on = bit j of the code
        num_on = on.sum(1).double()
        p_bars = self.p_on**num_on * (1 - self.p_on) ** (s - num_on)
        probs: dict[tuple, float] = {}
        for vertical, p_orientation in ((True, self.p_vertical), (False, 1 - self.p_vertical)):
            grids = on[:, None, :].expand(-1, s, s) if vertical else on[:, :, None].expand(-1, s, s)
            for grid, p in zip(grids.reshape(-1, s * s).tolist(), p_bars.tolist()):
                key = tuple(grid)
                probs[key] = probs.get(key, 0.0) + p_orientation * p
        support = [(key, p) for key, p in probs.items() if p > 0]
        images = torch.tensor([key for key, _ in support], dtype=torch.float32)
        return images, torch.tensor([p for _, p in support], dtype=torch.float64)

    def entropy(self) -> float:
        """
        The exact entropy of the data distribution in nats.
        """
        _, probs = self.distribution()
        return float(-(probs * probs.log()).sum())

    def kl_bits(
        self, model_log_probs: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
    ) -> float:
        """
        KL[p_data || p_model] in bits, summed exactly over the distinct data images.

        :param model_log_probs: the model's natural-log probabilities of the images of
            :meth:`distribution`, in that order, shape (M,); or a function mapping those
            images (M, size * size) to them.
        :returns: the divergence in bits; ``inf`` if the model gives a data image probability 0.
        """
        images, probs = self.distribution()
        if callable(model_log_probs):
            model_log_probs = model_log_probs(images)
        log_q = torch.as_tensor(model_log_probs).detach().to(torch.float64).reshape(-1)
        if log_q.shape != probs.shape:
            raise ValueError(
                f"model_log_probs has {log_q.numel()} values, expected {len(probs)} "
                "(one per image of distribution())"
            )
        return float((probs * (probs.log() - log_q)).sum() / math.log(2))


# --------------------------------------------------------------------------------------------
# By name
# --------------------------------------------------------------------------------------------

DATASET_NAMES = ("digits", "bars", "binarized-mnist", "mnist-dynamic")


def load_dataset(
    name_or_path: PathLike,
    path: PathLike | None = None,
    *,
    labels_path: PathLike | None = None,
    download: bool = False,
    generator: torch.Generator | None = None,
    num_train: int = 10_000,
    num_test: int = 1_000,
) -> dict[str, Any]:
    """
    A dataset by name, for command-line tools. Every result has float32 0/1 ``"train"`` and
    ``"test"`` tensors of shape (N, D); other keys as listed.

    - ``"digits"``: :func:`load_digits` (shipped; adds ``"test_labels"``).
    - ``"bars"``: ``num_train`` and ``num_test`` draws from ``Bars()`` using ``generator``.
    - ``"binarized-mnist"``: :func:`load_binarized_mnist` of ``path`` (None: the cache, fetched
      if ``download``); adds ``"valid"``, and ``"test_labels"`` if ``labels_path`` names a
      plain MNIST ``.npz``.
    - ``"mnist-dynamic"``: plain MNIST from ``path`` (see :func:`load_mnist`) split the usual
      way, ``x_train[:50000]`` / ``x_train[50000:]`` / ``x_test``. ``"train"``, ``"valid"``,
      ``"test"`` are one Bernoulli(pixel / 255) draw each (with ``generator``);
      ``"train_probs"`` holds the training intensities pixel / 255 and ``"dynamic"`` is a
      function ``dynamic(generator=None) -> Tensor`` drawing a fresh binarization of them (call
      it each epoch); plus ``"train_labels"``, ``"valid_labels"``, ``"test_labels"``.
    - anything else is taken as a path and loaded like ``"binarized-mnist"``.

    :param name_or_path: one of :data:`DATASET_NAMES`, or a binarized-MNIST path.
    :param path: the data file or folder for ``"binarized-mnist"`` and ``"mnist-dynamic"``.
    :param labels_path: plain MNIST ``.npz`` giving the binarized-MNIST test labels.
    :param download: allow downloading binarized MNIST into the cache.
    :param generator: random generator for ``"bars"`` and ``"mnist-dynamic"``.
    :param num_train: number of bars training images.
    :param num_test: number of bars test images.
    :raises DatasetError: a file is missing or malformed, or the name is unknown.
    :raises ValueError: ``"mnist-dynamic"`` was given no ``path``.
    """
    name = str(name_or_path)
    if name == "digits":
        return dict(load_digits())
    if name == "bars":
        bars = Bars()
        return {
            "train": bars.sample(num_train, generator),
            "test": bars.sample(num_test, generator),
        }
    if name == "mnist-dynamic":
        if path is None:
            raise ValueError("load_dataset('mnist-dynamic') needs path= to an mnist.npz")
        mnist = load_mnist(path)
        probs = mnist["x_train"].reshape(-1, _NUM_PIXELS).float() / 255.0
        test_probs = mnist["x_test"].reshape(-1, _NUM_PIXELS).float() / 255.0
        train_probs = probs[:50_000]

        def dynamic(generator: torch.Generator | None = None) -> torch.Tensor:
            """
            A fresh binarization of the 50,000 training images.

            :param generator: random generator for reproducible draws.
            """
            return dynamic_binarization(train_probs, generator)

        return {
            "train": dynamic(generator),
            "valid": dynamic_binarization(probs[50_000:], generator),
            "test": dynamic_binarization(test_probs, generator),
            "train_probs": train_probs,
            "dynamic": dynamic,
            "train_labels": mnist["y_train"][:50_000],
            "valid_labels": mnist["y_train"][50_000:],
            "test_labels": mnist["y_test"],
        }
    if name != "binarized-mnist":
        if path is not None or not Path(name).expanduser().exists():
            raise _error(
                name,
                "is neither a dataset name nor an existing file or folder",
                f"use one of {', '.join(DATASET_NAMES)} or a binarized-MNIST path",
            )
        path = name_or_path
    out: dict[str, Any] = dict(load_binarized_mnist(path, download=download))
    if labels_path is not None and "test" in out:
        out["test_labels"] = binarized_mnist_test_labels(labels_path)
    return out
