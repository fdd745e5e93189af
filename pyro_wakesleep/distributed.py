"""
The data-parallel layer of ``WakeSleep(distributed=True)``: a process-group sync over
``torch.distributed``'s default group.

Each process steps on its own shard of the data and draws its own samples and fantasies. At
the first step :meth:`ProcessGroupSync.broadcast` copies rank 0's parameters to every process;
at every step :meth:`ProcessGroupSync.average` takes two collectives: a small one in which
each process says whether its step failed (then every process raises and nothing is updated
anywhere) and carries the losses, and one that sums the flattened gradients. The updates that
follow are then identical on every process.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .checks import NonFiniteLossError
from .loss import WakeSleepPhases


class ProcessGroupSync:
    """
    Broadcast and averaging over ``torch.distributed``'s default process group.

    :param loss: the loss of the steps it syncs; one with a state of its own (a
        ``state_dict``, as memoised wake-sleep's memory) is refused: each process would keep
        its own, and a checkpoint only one of them.
    :raises ValueError: for such a loss.
    :raises RuntimeError: when the default process group is not initialized.
    """

    def __init__(self, loss: Any = None) -> None:
        if hasattr(loss, "state_dict"):
            raise ValueError(
                f"distributed=True cannot train a {type(loss).__name__}: its state (its "
                "state_dict(), such as memoised wake-sleep's memory) lives in one process, so "
                "each process would keep its own and a checkpoint only one of them. Train it in "
                "one process (distributed=False)."
            )
        if not torch.distributed.is_initialized():
            raise RuntimeError(
                "WakeSleep(distributed=True) needs torch.distributed's default process group: "
                "call torch.distributed.init_process_group(...) first (torchrun sets up the "
                "environment it reads)."
            )
        #: Whether the parameters were broadcast from rank 0 (at the first step).
        self.broadcast_done = False

    def broadcast(self, params: Dict[str, torch.Tensor]) -> None:
        """Copy rank 0's values of ``params`` (by name, in sorted order) to every process."""
        for name in sorted(params):
            torch.distributed.broadcast(params[name].data, src=0)
        self.broadcast_done = True

    def tell_failure(self) -> None:
        """Take part in the step's first collective as a process whose step failed, so that
        the others raise too (errors in the collective itself are ignored)."""
        try:
            self._status(None)
        except Exception:
            pass

    def average(self, phases: WakeSleepPhases, step: int) -> WakeSleepPhases:
        """
        Average the losses and the gradients of a successful step over the processes.

        :param step: the step number, for the message when another process failed.
        :returns: ``phases`` with the averaged losses (the gradients are averaged in place).
        :raises NonFiniteLossError: when another process failed this step; nothing is
            updated anywhere.
        """
        world = torch.distributed.get_world_size()
        status = self._status(phases)
        if status[0] > 0:
            raise NonFiniteLossError(
                f"Step {step}: another process failed this step (see its error). "
                "No parameter or optimizer state was changed on any process."
            )
        grads = [
            p.grad
            for p in list(phases.theta.values()) + list(phases.phi_params.values())
            if p.grad is not None
        ]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n
        mean = status / world
        like = phases.wake_theta if phases.wake_theta is not None else phases.phi
        wake_theta = None if phases.wake_theta is None else mean[1].to(like)
        phi = None if phases.phi is None else mean[2].to(like)
        return phases._replace(wake_theta=wake_theta, phi=phi)

    def _status(self, phases: Optional[WakeSleepPhases]) -> torch.Tensor:
        """The first collective: failures counted, losses summed."""
        status = torch.zeros(3, dtype=torch.float64)
        if phases is None:
            status[0] = 1.0
        else:
            status[1] = 0.0 if phases.wake_theta is None else phases.wake_theta.detach().double()
            status[2] = 0.0 if phases.phi is None else phases.phi.detach().double()
        torch.distributed.all_reduce(status)
        return status
