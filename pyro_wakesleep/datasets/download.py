"""
Downloading the fixed binarized MNIST: where it was published (:data:`BINARIZED_MNIST_URL`),
the checksums its rows must match (:data:`BINARIZED_MNIST_SHA256`), the cache folder
(:func:`default_cache_dir`, :data:`CACHE_ENV_VAR`), and :func:`download_binarized_mnist`,
which fetches, verifies and caches it as a compact ``.npz``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np

from .amat import parse_amat
from .errors import DatasetError, dataset_error
from .layout import COMPACT_NAME, SPLITS
from .storage import PathLike, npz_bytes, packed_sha256, read_npz, write_atomic

#: Where the original text files ``binarized_mnist_{train,valid,test}.amat`` were published.
BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"

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


def default_cache_dir() -> Path:
    """
    The cache folder: ``$PYRO_WAKESLEEP_CACHE`` if set, else ``~/.cache/pyro_wakesleep``.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pyro_wakesleep"


def resolve_cache_dir(cache_dir: PathLike | None) -> Path:
    """
    :param cache_dir: an explicit folder, or None for :func:`default_cache_dir`.
    """
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


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
    cache = resolve_cache_dir(cache_dir)
    target = cache / COMPACT_NAME
    if target.exists():
        try:
            arrays = read_npz(target, target)
            if all(
                split in arrays and packed_sha256(arrays[split]) == checksums[split]
                for split in SPLITS
            ):
                return target
        except DatasetError:
            pass  # a corrupt cache entry is replaced below
    cache.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
    try:
        packed = {}
        for split in SPLITS:
            name = f"binarized_mnist_{split}.amat"
            url = base_url.rstrip("/") + "/" + name
            file = workdir / name
            try:
                with urlopen(url, timeout=timeout) as response, open(file, "wb") as out:
                    shutil.copyfileobj(response, out, length=1 << 20)
            except (URLError, OSError) as err:
                reason = getattr(err, "reason", None) or err
                raise dataset_error(
                    url,
                    f"download failed ({reason})",
                    "check the network, or fetch the .amat files yourself and pass path=",
                ) from err
            packed[split] = np.packbits(parse_amat(file, name=url), axis=1)
            digest = packed_sha256(packed[split])
            if digest != checksums[split]:
                raise dataset_error(
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
