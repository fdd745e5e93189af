"""
The ``pyro-wakesleep`` command: train a Helmholtz machine by wake-sleep and evaluate it.

    pyro-wakesleep train                      # shipped digits, HelmholtzMachine [784, 200]
    pyro-wakesleep train --dataset bars       # the bars problem, 16-8-1, exact KL in bits
                                              # (its own recipe: RWS, 24 candidates, ...)
    pyro-wakesleep train --dataset binarized-mnist --data-path binarized_mnist.npz
    pyro-wakesleep train --resume runs/latest # continue the newest run
    pyro-wakesleep evaluate runs/latest --num-samples 5000

Each run has a folder of its own (:mod:`pyro_wakesleep.cli.runs`): ``runs/<date>_<time>``
unless ``--output`` names one, with ``runs/latest`` pointing at the newest. It holds
``checkpoint.pt`` (a :meth:`WakeSleep.save` checkpoint whose ``extra`` holds the run's state:
configuration, epoch, data-order generator, metrics), ``config.json`` and ``metrics.csv``
(copies of what the checkpoint holds, for reading), ``final.json`` (the final evaluation),
the figures ``learning_curves.png``, ``fantasies.png`` and ``reconstructions.png``, and the
``evaluation_<samples>.json`` that ``evaluate`` writes. Every failure is one line on stderr
and exit status 2.

The modules: :mod:`~pyro_wakesleep.cli.command` (the entry point),
:mod:`~pyro_wakesleep.cli.parser` (the options), :mod:`~pyro_wakesleep.cli.arguments` (their
types), :mod:`~pyro_wakesleep.cli.config` (their checks and defaults),
:mod:`~pyro_wakesleep.cli.tasks` (one task object per data source),
:mod:`~pyro_wakesleep.cli.build` (the model and its WakeSleep),
:mod:`~pyro_wakesleep.cli.optimizers` (the optimizers and the learning-rate schedule),
:mod:`~pyro_wakesleep.cli.training` (the training loop),
:mod:`~pyro_wakesleep.cli.selection` (candidate selection),
:mod:`~pyro_wakesleep.cli.evaluation` (the ``evaluate`` command),
:mod:`~pyro_wakesleep.cli.state` (the run state a checkpoint holds),
:mod:`~pyro_wakesleep.cli.figures` and :mod:`~pyro_wakesleep.cli.runs` (run folders).
"""

from .command import main
from .optimizers import lr_factor
from .parser import build_parser

__all__ = ["build_parser", "lr_factor", "main"]
