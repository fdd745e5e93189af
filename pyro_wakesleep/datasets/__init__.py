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
- :func:`multi_digit_canvases` composes canvases holding a random number of those digits at
  random positions (:func:`load_multi_digits`: training and test canvases with their counts),
  the data of Attend-Infer-Repeat (:class:`~pyro_wakesleep.models.MultiDigitAIR`).
- :class:`Bars` is the bars problem of Hinton, Dayan, Frey & Neal (1995), with its exact data
  distribution, entropy and KL divergence to a model.
- :func:`load_dataset` picks one of these by name.
- :func:`read_npz`, :func:`npz_bytes`, :func:`write_atomic` and :func:`packed_sha256` are the
  file helpers these use: ``.npz`` archives read without pickle, ``.npz`` bytes that depend only
  on the arrays, atomic writes, and the checksum of bit-packed rows.

Every missing or malformed file raises :class:`DatasetError`, whose one-line message names the
file, what is wrong and how to fix it.

Everything above is importable from here; the modules, one concept each:

- :mod:`.errors`: :class:`DatasetError` and its one-line messages.
- :mod:`.storage`: ``.npz`` reading and writing, atomic writes, checksums of packed rows.
- :mod:`.layout`: the splits, sizes and row format (0/1 or bit-packed) of binarized MNIST.
- :mod:`.amat`: the original ``.amat`` text files.
- :mod:`.download`: the download, its URL and checksums, and the cache folder.
- :mod:`.binarized_mnist`: :func:`load_binarized_mnist` and the ``test`` labels.
- :mod:`.mnist`: plain MNIST and dynamic binarization.
- :mod:`.digits`: the shipped subset.
- :mod:`.multi_digits`: multi-digit canvases.
- :mod:`.bars`: the bars problem.
- :mod:`.by_name`: :func:`load_dataset`.
"""

from __future__ import annotations

from .bars import Bars
from .binarized_mnist import binarized_mnist_test_labels, load_binarized_mnist
from .by_name import DATASET_NAMES, load_dataset
from .digits import load_digits
from .download import (
    BINARIZED_MNIST_SHA256,
    BINARIZED_MNIST_URL,
    CACHE_ENV_VAR,
    default_cache_dir,
    download_binarized_mnist,
)
from .errors import DatasetError
from .layout import BINARIZED_MNIST_SIZES
from .mnist import dynamic_binarization, load_mnist
from .multi_digits import MultiDigits, load_multi_digits, multi_digit_canvases, shrink_digits
from .storage import PathLike as PathLike  # the loaders' path type, importable as before
from .storage import npz_bytes, packed_sha256, read_npz, write_atomic

__all__ = [
    "BINARIZED_MNIST_SHA256",
    "BINARIZED_MNIST_SIZES",
    "BINARIZED_MNIST_URL",
    "CACHE_ENV_VAR",
    "DATASET_NAMES",
    "Bars",
    "DatasetError",
    "MultiDigits",
    "binarized_mnist_test_labels",
    "default_cache_dir",
    "download_binarized_mnist",
    "dynamic_binarization",
    "load_binarized_mnist",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_multi_digits",
    "multi_digit_canvases",
    "npz_bytes",
    "packed_sha256",
    "read_npz",
    "shrink_digits",
    "write_atomic",
]
