"""
Reading the fixed binarized MNIST: :func:`load_binarized_mnist` from a compact ``.npz``, a
folder of ``.amat`` files, a single ``.amat`` file or the cache (downloading it if asked), and
:func:`binarized_mnist_test_labels`, the labels of its label-sorted ``test`` rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .amat import amat_split, parse_amat
from .download import download_binarized_mnist, resolve_cache_dir
from .errors import dataset_error
from .layout import COMPACT_NAME, SPLITS, check_rows, unpack_split
from .mnist import load_mnist
from .storage import PathLike, read_npz


def _load_compact(path: Path, check_sizes: bool) -> dict[str, np.ndarray]:
    """
    The three splits of a compact binarized-MNIST ``.npz``, as uint8 0/1 arrays (N, 784).

    :param path: the file.
    :param check_sizes: require 50,000 / 10,000 / 10,000 rows.
    """
    arrays = read_npz(path, path)
    missing = [split for split in SPLITS if split not in arrays]
    if missing:
        raise dataset_error(
            path,
            f"has no array {', '.join(repr(m) for m in missing)} (found: "
            f"{', '.join(sorted(arrays)) or 'nothing'})",
            "expected arrays train, valid and test as in binarized_mnist.npz",
        )
    if "shape" in arrays and arrays["shape"].tolist() != [28, 28]:
        raise dataset_error(
            path, f"'shape' is {arrays['shape'].tolist()}, expected [28, 28]", "use 28x28 images"
        )
    out = {}
    for split in SPLITS:
        out[split] = unpack_split(arrays[split], split, path)
        if check_sizes:
            check_rows(len(out[split]), split, path)
    return out


def _load_amat_dir(folder: Path, check_sizes: bool) -> dict[str, np.ndarray]:
    """
    :param folder: holds ``binarized_mnist_{train,valid,test}.amat``.
    :param check_sizes: require 50,000 / 10,000 / 10,000 rows.
    """
    out = {}
    for split in SPLITS:
        file = folder / f"binarized_mnist_{split}.amat"
        out[split] = parse_amat(file)
        if check_sizes:
            check_rows(len(out[split]), split, file)
    return out


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
        cache = resolve_cache_dir(cache_dir)
        compact = cache / COMPACT_NAME
        if not compact.exists():
            if not download:
                raise dataset_error(
                    compact,
                    "no path given and binarized MNIST is not in the cache",
                    "pass path= to your copy, or download=True to fetch it",
                )
            compact = download_binarized_mnist(cache)
        return _to_float(_load_compact(compact, check_sizes))
    path = Path(path).expanduser()
    if path.is_dir():
        amat = [path / f"binarized_mnist_{split}.amat" for split in SPLITS]
        if any(file.exists() for file in amat) or not (path / COMPACT_NAME).exists():
            missing = [file.name for file in amat if not file.exists()]
            if missing:
                raise dataset_error(
                    path,
                    f"folder lacks {', '.join(missing)}",
                    f"put the three binarized_mnist_*.amat files or a {COMPACT_NAME} there",
                )
            return _to_float(_load_amat_dir(path, check_sizes))
        return _to_float(_load_compact(path / COMPACT_NAME, check_sizes))
    if not path.exists():
        raise dataset_error(
            path, "file not found", "check the path, or call with download=True and no path"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _to_float(_load_compact(path, check_sizes))
    if suffix == ".amat":
        split = amat_split(path)
        rows = parse_amat(path)
        if check_sizes and split is not None:
            check_rows(len(rows), split, path)
        return _to_float({split or "data": rows})
    raise dataset_error(
        path,
        f"unsupported file type '{path.suffix}'",
        "pass a .npz, a .amat file or a folder with the binarized_mnist_*.amat files",
    )


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
