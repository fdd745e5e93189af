"""
How the data files are read and written: ``.npz`` archives read eagerly and without pickle
(:func:`read_npz`), ``.npz`` bytes that depend only on the arrays (:func:`npz_bytes`), atomic
writes (:func:`write_atomic`), and the checksum of bit-packed rows (:func:`packed_sha256`).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from pathlib import Path
from typing import Mapping, Union

import numpy as np

from ..files import atomic_write
from .errors import DatasetError, dataset_error

#: What the loaders accept as a file or folder name.
PathLike = Union[str, Path]


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
    Write ``data`` to ``path`` atomically (:func:`pyro_wakesleep.files.atomic_write`): ``path``
    is either absent, the old file or the complete new one, never a partial file.

    :param path: the destination; missing parent folders are created.
    :param data: the bytes to write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


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
                raise dataset_error(
                    name, "is a single .npy array, not an .npz archive", "pass an .npz file"
                )
            return {key: npz[key] for key in npz.files}
    except DatasetError:
        raise
    except FileNotFoundError as err:
        raise dataset_error(name, "file not found", "check the path") from err
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise dataset_error(
            name,
            f"cannot be read as an .npz archive ({type(err).__name__}: {err})",
            "the file is truncated or corrupt; delete it and download or regenerate it",
        ) from err
