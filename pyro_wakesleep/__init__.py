"""
pyro-wakesleep: wake-sleep and reweighted wake-sleep inference for any Pyro model and guide.

>>> from pyro_wakesleep import WakeSleep
>>> ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 1e-3}))  # doctest: +SKIP
>>> losses = ws.step(x)  # doctest: +SKIP
"""

from . import datasets, models
from .checkpoint import CheckpointError
from .checks import NonFiniteLossError
from .evaluate import (
    LogLikelihood,
    evaluate_dataset,
    exact_log_likelihood,
    importance_log_likelihood,
)
from .fantasies import FantasyError, draw_fantasy, fantasy_observations, guide_arguments
from .loss import WakeSleepLoss, WakeSleepPhases
from .memoised import MemoisedWakeSleepLoss
from .module import WakeSleepModule
from .objectives import PhiObjective
from .vimco import VIMCO
from .wake_sleep import WakeSleep, WakeSleepLosses

__version__ = "0.1.0"

__all__ = [
    "LogLikelihood",
    "datasets",
    "evaluate_dataset",
    "exact_log_likelihood",
    "importance_log_likelihood",
    "models",
    "CheckpointError",
    "FantasyError",
    "NonFiniteLossError",
    "MemoisedWakeSleepLoss",
    "PhiObjective",
    "VIMCO",
    "WakeSleep",
    "WakeSleepLoss",
    "WakeSleepLosses",
    "WakeSleepModule",
    "WakeSleepPhases",
    "draw_fantasy",
    "fantasy_observations",
    "guide_arguments",
]
