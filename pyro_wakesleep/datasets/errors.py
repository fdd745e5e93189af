"""
:class:`DatasetError`, raised for every missing or malformed data file, and
:func:`dataset_error`, which builds its one-line message: the file, what is wrong, how to fix it.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A data file is missing or malformed; the message names the file, the problem and a fix."""


def dataset_error(path: object, problem: str, fix: str) -> DatasetError:
    """
    Build a one-line :class:`DatasetError`.

    :param path: the file or folder concerned.
    :param problem: what is wrong with it.
    :param fix: how to fix it.
    """
    message = f"{path}: {problem}; {fix}"
    return DatasetError(" ".join(message.split()))
