"""
The memory of memoised wake-sleep (:mod:`pyro_wakesleep.memoised`): for each of :math:`N` data
points, the :math:`M` best distinct latent values found so far and their scores, best first.

A latent value is a dict of tensors by site: the memory holds ``values[site]``, of shape
``(N, M, ...)``, and ``scores``, of shape ``(N, M)``, ``-inf`` at empty slots. A step works on
the rows of its batch (``B`` data points): :meth:`Memory.candidates` puts the rows' entries
before the step's ``K`` proposals, with a mask of the distinct ones; :meth:`Memory.select`
keeps the ``M`` best; :meth:`Memory.write` stores the new rows once the step has succeeded.
The rows are the indices of the data plate, checked as the plate is entered
(:class:`IndexCheck`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

Values = Dict[str, torch.Tensor]


class Rows(NamedTuple):
    """New memory rows: values by site ``(B, M, ...)`` and scores ``(B, M)`` of the data
    points ``indices``, out of ``num_data``."""

    indices: torch.Tensor
    values: Values
    scores: torch.Tensor
    num_data: int


def check_indices(indices: Any, size: int, plate: str, num_data: Optional[int] = None) -> None:
    """
    Refuse data-point ids that cannot index a memory of ``size`` rows.

    :raises ValueError: naming the plate's ``subsample`` argument (or ``num_data``).
    """
    where = f"The indices of pyro.plate('{plate}') (its subsample argument)"
    if num_data is not None and size != num_data:
        raise ValueError(f"pyro.plate('{plate}') has size {size}, but num_data={num_data}.")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
        shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices)
        raise ValueError(f"{where} must be a 1-D tensor of data-point ids, got shape {shape}.")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"{where} must be integers, got dtype {indices.dtype}.")
    outside = indices[(indices < 0) | (indices >= size)]
    if outside.numel():
        raise ValueError(f"{where} must lie in [0, {size}), got {outside[:4].tolist()}.")
    if indices.unique().numel() != indices.numel():
        raise ValueError(f"{where} must be distinct: each data point has one memory.")


class IndexCheck(Messenger):
    """Check the data plate's indices (:func:`check_indices`) as the plate is entered,
    before the program uses them."""

    def __init__(self, plate: str, num_data: Optional[int]) -> None:
        super().__init__()
        self.plate, self.num_data = plate, num_data

    def _pyro_post_sample(self, msg: Any) -> None:
        if msg["name"] == self.plate and site_is_subsample(msg):
            check_indices(msg["value"], msg["fn"].size, self.plate, self.num_data)


def along(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(B, P)`` tensor shaped to broadcast against ``like``, of shape ``(B, P, ...)``."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - 2))


def distinct(candidates: Values, valid: torch.Tensor) -> torch.Tensor:
    """
    The valid candidates that equal no earlier valid candidate of their data point.

    :param candidates: values by site, each ``(B, C, ...)``.
    :param valid: ``(B, C)``.
    :returns: ``(B, C)``.
    """
    B, C = valid.shape
    keys = torch.cat([v.reshape(B, C, -1).to(torch.float64) for v in candidates.values()], -1)
    same = (keys.unsqueeze(2) == keys.unsqueeze(1)).all(-1)  # [b, c, c']
    earlier = torch.ones(C, C, dtype=torch.bool, device=valid.device).tril(-1)  # c' < c
    return valid & ~(same & earlier & valid.unsqueeze(1)).any(-1)


class Memory:
    """
    The :math:`M` best distinct latent values of each data point, best first.

    :param int size: :math:`M`.
    :param num_data: :math:`N`, if known; else taken from the first rows written.
    :param str plate: the data plate's name, for messages.
    """

    def __init__(self, size: int, num_data: Optional[int] = None, plate: str = "data") -> None:
        self.size, self.num_data, self.plate = size, num_data, plate
        #: The values by site, ``(N, M, ...)``; ``None`` before the first write.
        self.values: Optional[Values] = None
        #: The scores, ``(N, M)``, ``-inf`` at empty slots; ``None`` before the first write.
        self.scores: Optional[torch.Tensor] = None

    def state_dict(self) -> Dict[str, Any]:
        """A copy: ``{"scores": (N, M), "values": {site: (N, M, ...)}}``; ``{}`` if empty."""
        if self.scores is None or self.values is None:
            return {}
        values = {name: v.clone() for name, v in self.values.items()}
        return {"scores": self.scores.clone(), "values": values}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """
        Hold a copy of ``state`` (from :meth:`state_dict`; ``{}`` empties the memory).

        :raises ValueError: when ``state`` is not a memory of these sizes; nothing changes.
        """
        if not state:
            self.values = self.scores = None
            return
        scores, values = state.get("scores"), state.get("values")
        if set(state) != {"scores", "values"} or not isinstance(scores, torch.Tensor):
            raise ValueError(f"a memory holds 'scores' and 'values', got {sorted(state)}")
        if scores.dim() != 2 or not scores.is_floating_point():
            raise ValueError(f"memory scores must be an (N, M) float tensor: {scores.shape}")
        N, M = scores.shape
        if M != self.size or self.num_data not in (None, N):
            raise ValueError(
                f"a memory of {N} data points x {M} entries, for memory_size={self.size}, "
                f"num_data={self.num_data}"
            )
        if not isinstance(values, dict) or not values:
            raise ValueError("memory values must be a non-empty dict of tensors by site")
        for name, v in values.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape[:2]) != (N, M):
                raise ValueError(f"memory values of site {name!r} must be of shape ({N}, {M}, ...)")
        self.scores = scores.detach().clone()
        self.values = {name: v.detach().clone() for name, v in values.items()}

    def rows(self, indices: torch.Tensor, num_data: int, like: Values) -> Tuple[Values, Any]:
        """The rows of ``indices``: values ``(B, M, ...)`` and scores ``(B, M)``.

        :param like: the step's proposals by site, ``(B, K, ...)``, which must fit."""
        B, M = indices.shape[0], self.size
        if self.scores is None or self.values is None:
            empty = {n: p.new_zeros((B, M) + p.shape[2:]) for n, p in like.items()}
            return empty, torch.full((B, M), -math.inf, device=indices.device)
        if self.scores.shape[0] != num_data:
            raise ValueError(
                f"pyro.plate('{self.plate}') has size {num_data}, the memory holds "
                f"{self.scores.shape[0]} data points"
            )
        found = {n: (tuple(p.shape[2:]), p.dtype) for n, p in like.items()}
        held = {n: (tuple(v.shape[2:]), v.dtype) for n, v in self.values.items()}
        if found != held:
            raise ValueError(f"The guide's latent sites {found} do not fit the memory's {held}")
        if self.scores.device != indices.device:
            self.scores = self.scores.to(indices.device)
            self.values = {n: v.to(indices.device) for n, v in self.values.items()}
        return {n: v[indices] for n, v in self.values.items()}, self.scores[indices]

    def candidates(
        self, indices: torch.Tensor, num_data: int, proposals: Values
    ) -> Tuple[Values, torch.Tensor]:
        """
        The rows' entries, then the proposals: values by site ``(B, M + K, ...)`` and the
        mask of the distinct ones (empty slots hold a copy of a proposal, masked out, so that
        every candidate can be scored).
        """
        memory, scores = self.rows(indices, num_data, proposals)
        empty = scores == -math.inf
        candidates = {
            n: torch.cat([torch.where(along(empty, v), proposals[n][:, :1], v), proposals[n]], 1)
            for n, v in memory.items()
        }
        K = next(iter(proposals.values())).shape[1]
        valid = torch.cat([~empty, empty.new_ones(len(indices), K)], 1)
        return candidates, distinct(candidates, valid)

    def select(
        self, indices: torch.Tensor, num_data: int, candidates: Values, scores: torch.Tensor
    ) -> Tuple[Rows, torch.Tensor]:
        """
        The new rows: the ``M`` best candidates by ``scores`` (``(B, C)``, ``-inf`` for those
        to drop), best first (ties in candidate order).

        :returns: the rows and the candidates they hold, ``(B, M)``.
        """
        order = torch.sort(scores, stable=True, dim=1, descending=True).indices[:, : self.size]
        values = {n: torch.take_along_dim(c, along(order, c), 1) for n, c in candidates.items()}
        return Rows(indices, values, scores.gather(1, order), num_data), order

    def write(self, rows: Rows) -> None:
        """Store new rows."""
        if self.scores is None or self.values is None:
            N, M = rows.num_data, self.size
            self.scores = rows.scores.new_full((N, M), -math.inf)
            self.values = {n: v.new_zeros((N, M) + v.shape[2:]) for n, v in rows.values.items()}
        for name, v in rows.values.items():
            self.values[name][rows.indices] = v
        self.scores[rows.indices] = rows.scores
