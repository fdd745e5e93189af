"""The command's data sources by ``--dataset`` name (:data:`TASKS`), and :func:`load_task`."""

from __future__ import annotations

from typing import Any, Dict, Type

import torch

from .multi_digits import MultiDigitsTask
from .tasks import BarsTask, BinarizedMnistTask, DigitsTask, DynamicMnistTask, Task

#: The tasks by ``--dataset`` name.
TASKS: Dict[str, Type[Task]] = {
    task.name: task
    for task in (DigitsTask, BarsTask, BinarizedMnistTask, DynamicMnistTask, MultiDigitsTask)
}


def load_task(config: Dict[str, Any], device: torch.device) -> Task:
    """
    The task of ``config["dataset"]``, its data loaded.

    :param config: the run's configuration.
    :param device: where the data go.
    :raises CommandError: ``--data-path`` names nothing.
    :raises DatasetError: the data file is malformed.
    """
    return TASKS[config["dataset"]](config, device)
