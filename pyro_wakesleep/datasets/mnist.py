"""
Plain MNIST: :func:`load_mnist` reads the images (raw 0..255 pixels) and labels, and
:func:`dynamic_binarization` draws a fresh Bernoulli(pixel / 255) binarization each call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import dataset_error
from .storage import PathLike, read_npz

_MNIST_SIZES = {"train": 60_000, "test": 10_000}


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
        raise dataset_error(
            path, "is not an .npz file", "pass an mnist.npz with x_train/y_train/..."
        )
    arrays = read_npz(path, path)
    fix = "expected uint8 x_train (N, 28, 28), y_train (N,), x_test and y_test as in mnist.npz"
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise dataset_error(path, f"has no array {', '.join(repr(m) for m in missing)}", fix)
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise dataset_error(path, f"x_{split} is {x.dtype} {x.shape}", fix)
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise dataset_error(path, f"y_{split} is {y.dtype} {y.shape} for {len(x)} images", fix)
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise dataset_error(path, f"y_{split} holds labels outside 0..9", fix)
        if check_sizes and len(x) != _MNIST_SIZES[split]:
            raise dataset_error(
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
