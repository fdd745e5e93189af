"""
Multi-digit canvases for Attend-Infer-Repeat (Eslami et al. 2016): binary canvases holding a
random number of digits at random positions, composed from the digits shipped with the package
(:func:`~pyro_wakesleep.datasets.load_digits`), with the true number of digits of each canvas.

The default is small enough to train on a CPU: each 28x28 digit is shrunk to 14x14 (2x2
average pooling, then a pixel is on where at least half of its four source pixels are), and 0,
1 or 2 such digits (equally likely) are placed at uniformly drawn integer offsets on a 28x28
canvas. Digits may overlap; they are composed by pixelwise maximum, so the canvas stays
binary. Eslami et al. used 28x28 digits on 50x50 canvases (``digit_size=28, canvas_size=50``
here), which costs about four times as much per image.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.nn import functional

from .digits import load_digits


class MultiDigits(NamedTuple):
    """
    Canvases and their ground truth, as returned by :func:`multi_digit_canvases`.

    :ivar images: float32 ``(num, canvas_size ** 2)`` of zeros and ones, rows flattened
        row-major.
    :ivar counts: int64 ``(num,)``, the number of digits on each canvas.
    :ivar offsets: int64 ``(num, max_digits, 2)``, the (row, column) of each digit's top-left
        pixel; rows past ``counts`` are -1.
    :ivar sources: int64 ``(num, max_digits)``, the row of ``digits`` each digit was taken
        from; -1 past ``counts``.
    """

    images: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    sources: torch.Tensor


def shrink_digits(digits: torch.Tensor, digit_size: int = 14) -> torch.Tensor:
    """
    Binary 28x28 digits, rows of 784, shrunk to ``digit_size`` x ``digit_size``: average
    pooling (area interpolation), then a pixel is on where the average is at least 1/2.

    :returns: float32 ``(num, digit_size, digit_size)`` of zeros and ones.
    """
    side = int(round(digits.shape[-1] ** 0.5))
    images = digits.reshape(-1, 1, side, side).float()
    if digit_size != side:
        images = functional.interpolate(images, size=(digit_size, digit_size), mode="area")
    return (images[:, 0] >= 0.5).float()


def multi_digit_canvases(
    num: int,
    digits: torch.Tensor,
    *,
    canvas_size: int = 28,
    digit_size: int = 14,
    max_digits: int = 2,
    generator: Optional[torch.Generator] = None,
) -> MultiDigits:
    """
    Draw ``num`` canvases. For each, the number of digits is uniform on ``0 .. max_digits``;
    each digit is a uniformly drawn row of ``digits`` (shrunk by :func:`shrink_digits`) placed
    with its top-left pixel at a uniform integer offset in ``0 .. canvas_size - digit_size`` in
    both directions, and the canvas is the pixelwise maximum of its digits.

    :param num: the number of canvases.
    :param digits: binary square digits, float ``(M, side ** 2)`` (the rows of
        :func:`load_digits`).
    :param canvas_size: the side of the square canvas.
    :param digit_size: the side each digit is shrunk (or kept) to.
    :param max_digits: the largest number of digits on a canvas.
    :param generator: the random generator (the same generator state gives the same canvases).
    :returns: :class:`MultiDigits`.
    """
    if num < 0 or max_digits < 0:
        raise ValueError(f"num and max_digits must be non-negative, got {num}, {max_digits}")
    if not 1 <= digit_size <= canvas_size:
        raise ValueError(f"need 1 <= digit_size <= canvas_size, got {digit_size}, {canvas_size}")
    glyphs = shrink_digits(digits, digit_size)
    counts = torch.randint(max_digits + 1, (num,), generator=generator)
    sources = torch.randint(len(glyphs), (num, max_digits), generator=generator)
    offsets = torch.randint(canvas_size - digit_size + 1, (num, max_digits, 2), generator=generator)
    present = torch.arange(max_digits) < counts[:, None]  # (num, max_digits)
    canvas = torch.zeros(num, canvas_size, canvas_size)
    for slot in range(max_digits):
        rows = present[:, slot].nonzero().squeeze(-1)
        for i in rows.tolist():
            r, c = offsets[i, slot].tolist()
            window = canvas[i, r : r + digit_size, c : c + digit_size]
            torch.maximum(window, glyphs[sources[i, slot]], out=window)
    return MultiDigits(
        canvas.reshape(num, canvas_size * canvas_size),
        counts,
        torch.where(present[..., None], offsets, torch.full_like(offsets, -1)),
        torch.where(present, sources, torch.full_like(sources, -1)),
    )


def load_multi_digits(
    num_train: int = 10_000,
    num_test: int = 1_000,
    *,
    canvas_size: int = 28,
    digit_size: int = 14,
    max_digits: int = 2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """
    Training and test canvases from :func:`multi_digit_canvases`: the training canvases are
    composed from the 3,000 training digits of :func:`load_digits`, the test canvases from its
    1,000 test digits (so no test canvas shares a digit with a training canvas), both drawn
    from one ``torch.Generator`` seeded with ``seed``.

    :returns: ``{"train", "test"}`` float32 ``(N, canvas_size ** 2)``, ``{"train_counts",
        "test_counts"}`` int64 ``(N,)``, and ``"test_labels"`` int64 ``(num_test,
        max_digits)``, the digit classes on each test canvas (-1 past its count).
    """
    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    options = dict(canvas_size=canvas_size, digit_size=digit_size, max_digits=max_digits)
    train = multi_digit_canvases(num_train, digits["train"], generator=generator, **options)
    test = multi_digit_canvases(num_test, digits["test"], generator=generator, **options)
    labels = digits["test_labels"][test.sources.clamp(min=0)]
    return {
        "train": train.images,
        "train_counts": train.counts,
        "test": test.images,
        "test_counts": test.counts,
        "test_labels": torch.where(test.sources >= 0, labels, torch.full_like(labels, -1)),
    }
