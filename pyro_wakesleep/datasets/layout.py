"""
How the fixed binarized MNIST is laid out: three splits (:data:`SPLITS`) of
:data:`BINARIZED_MNIST_SIZES` rows, each row 28 x 28 = 784 pixels stored either as 0/1 bytes or
bit-packed into 98 bytes; :func:`unpack_split` turns either into 0/1 rows and
:func:`check_rows` checks a split's size.
"""

from __future__ import annotations

import numpy as np

from .errors import dataset_error

#: Rows in each split of the fixed binarized MNIST.
BINARIZED_MNIST_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}

#: The splits, in file order.
SPLITS = ("train", "valid", "test")

#: Pixels in a row (28 x 28).
NUM_PIXELS = 784

#: Bytes in a bit-packed row.
PACKED_WIDTH = (NUM_PIXELS + 7) // 8  # 98 bytes per bit-packed row

#: Name of the compact file, in a data folder or in the cache.
COMPACT_NAME = "binarized_mnist.npz"


def unpack_split(array: np.ndarray, split: str, path: object) -> np.ndarray:
    """
    Rows of one split as uint8 0/1 (N, 784), from bit-packed uint8 (N, 98) (as written by
    ``np.packbits(x, axis=1)``) or from unpacked 0/1 values (N, 784).

    :param array: the stored array.
    :param split: its name, for error messages.
    :param path: the file, for error messages.
    """
    fix = "write each split as np.packbits(x, axis=1) of the uint8 0/1 rows x (N, 784)"
    if array.ndim != 2 or array.shape[1] not in (PACKED_WIDTH, NUM_PIXELS):
        raise dataset_error(
            path, f"array '{split}' has shape {array.shape}, expected (N, 98) or (N, 784)", fix
        )
    if array.shape[1] == PACKED_WIDTH:
        if array.dtype != np.uint8:
            raise dataset_error(
                path, f"packed array '{split}' has dtype {array.dtype}, not uint8", fix
            )
        return np.unpackbits(array, axis=1)  # 98 bytes are exactly 784 bits: no padding
    if array.dtype.kind not in "biuf":
        raise dataset_error(path, f"array '{split}' has non-numeric dtype {array.dtype}", fix)
    bad = (array != 0) & (array != 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        value = array[row, col].item()
        raise dataset_error(
            path, f"array '{split}' row {row} pixel {col} is {value!r}, not 0 or 1", fix
        )
    return array.astype(np.uint8)


def check_rows(rows: int, split: str, path: object) -> None:
    """
    Raise :class:`DatasetError` if a standard split does not have its standard number of rows
    (:data:`BINARIZED_MNIST_SIZES`).

    :param rows: number of rows found.
    :param split: the split name; only train/valid/test are checked.
    :param path: the file, for error messages.
    """
    expected = BINARIZED_MNIST_SIZES.get(split)
    if expected is not None and rows != expected:
        raise dataset_error(
            path,
            f"split '{split}' has {rows} rows, expected {expected}",
            "the file is incomplete or not the standard binarized MNIST; "
            "pass check_sizes=False to load it anyway",
        )
