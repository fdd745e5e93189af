"""
Regenerate ``pyro_wakesleep/data/digits.npz``, the small binarized-MNIST subset shipped with
the package and read by :func:`pyro_wakesleep.datasets.load_digits`.

Where the rows come from:

- ``train`` (3000 rows): rows 0..2999 of ``train`` in the fixed binarized MNIST (Salakhutdinov
  & Murray 2008; Larochelle & Murray 2011), i.e. the first 3000 lines of
  ``binarized_mnist_train.amat``. Those rows are a shuffle of the MNIST training images and
  have no labels.
- ``test`` (1000 rows): rows 0, 10, 20, ..., 9990 of the binarized ``test`` split. That split is
  the MNIST test set sorted by label (stable sort), so taking every 10th row keeps the class
  proportions (90 to 114 images per digit).
- ``test_labels``: ``np.sort(y_test)[::10]``, with ``y_test`` the official MNIST test labels.

The file also holds ``train_index`` and ``test_index`` (the row numbers above, uint16) and
``shape`` = [28, 28]; ``train``/``test`` are ``np.packbits(rows, axis=1)``. The zip members
carry a fixed timestamp, so the same inputs give the same bytes (with the same zlib).

Usage::

    python -m pyro_wakesleep.data.make_digits BINARIZED_MNIST_NPZ MNIST_NPZ [OUT]

where ``BINARIZED_MNIST_NPZ`` is anything :func:`~pyro_wakesleep.datasets.load_binarized_mnist`
reads (a compact ``.npz`` or the folder of ``.amat`` files) and ``MNIST_NPZ`` is plain MNIST
(see :func:`~pyro_wakesleep.datasets.load_mnist`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Union

import numpy as np

from pyro_wakesleep.datasets import (
    binarized_mnist_test_labels,
    load_binarized_mnist,
    npz_bytes,
    write_atomic,
)

NUM_TRAIN = 3000
TEST_STRIDE = 10
DEFAULT_OUT = Path(__file__).with_name("digits.npz")


def digits_arrays(
    binarized_mnist: Union[str, Path], mnist: Union[str, Path]
) -> dict[str, np.ndarray]:
    """
    The arrays of ``digits.npz``, as described in the module docstring.

    :param binarized_mnist: the fixed binarized MNIST (compact ``.npz`` or ``.amat`` folder).
    :param mnist: plain MNIST ``.npz``, for the test labels.
    """
    data = load_binarized_mnist(binarized_mnist)
    labels = binarized_mnist_test_labels(mnist).numpy()
    train_index = np.arange(NUM_TRAIN)
    test_index = np.arange(0, len(data["test"]), TEST_STRIDE)
    train = data["train"].numpy()[train_index].astype(np.uint8)
    test = data["test"].numpy()[test_index].astype(np.uint8)
    return {
        "train": np.packbits(train, axis=1),
        "test": np.packbits(test, axis=1),
        "test_labels": labels[test_index].astype(np.uint8),
        "train_index": train_index.astype(np.uint16),
        "test_index": test_index.astype(np.uint16),
        "shape": np.array([28, 28], dtype=np.int64),
    }


def make_digits(
    binarized_mnist: Union[str, Path],
    mnist: Union[str, Path],
    out: Union[str, Path, None] = None,
) -> Path:
    """
    Write ``digits.npz`` (atomically) and return its path.

    :param binarized_mnist: the fixed binarized MNIST (compact ``.npz`` or ``.amat`` folder).
    :param mnist: plain MNIST ``.npz``, for the test labels.
    :param out: where to write (default: next to this script, the shipped file).
    """
    out = DEFAULT_OUT if out is None else Path(out)
    write_atomic(out, npz_bytes(digits_arrays(binarized_mnist, mnist), compresslevel=9))
    return out


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Regenerate pyro_wakesleep/data/digits.npz.")
    parser.add_argument("binarized_mnist", help="binarized_mnist.npz or folder of .amat files")
    parser.add_argument("mnist", help="plain MNIST .npz (x_train, y_train, x_test, y_test)")
    parser.add_argument("out", nargs="?", default=None, help=f"output (default {DEFAULT_OUT})")
    args = parser.parse_args()
    path = make_digits(args.binarized_mnist, args.mnist, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
