r"""
Attend-Infer-Repeat (Eslami et al. 2016) on multi-digit canvases
(:func:`~pyro_wakesleep.datasets.multi_digit_canvases`): a model with stochastic control
flow, since the number of objects it draws is itself random, the main experiment of Le et al.
(2019) on reweighted wake-sleep.

**Model.** For steps :math:`t = 1, \dots, T` (``max_objects``), with :math:`z^{pres}_0 = 1`,

.. math::

    z^{pres}_t &\sim \mathrm{Bernoulli}(\rho_t\, z^{pres}_{t-1}),
        \qquad \rho_t = \sigma(\beta_t) \text{ (learned)}, \\
    z^{where}_t = (a_t, u_t, v_t) &\sim \mathcal{N}((\log s_0, 0, 0),
        \mathrm{diag}(\sigma_a^2, \sigma_u^2, \sigma_u^2)), \\
    z^{what}_t &\sim \mathcal{N}(0, I), \\
    x \mid z &\sim \prod_{\text{pixels } j} \mathrm{Bernoulli}\big(\epsilon + (1 - 2\epsilon)
        (1 - \textstyle\prod_{t:\, z^{pres}_t = 1}
        (1 - \mathrm{ST}(\sigma(f_\theta(z^{what}_t)), z^{where}_t)_j))\big).

Once an object is off all later ones are off, so the number of objects is
:math:`\sum_t z^{pres}_t`. The decoder :math:`f_\theta` draws a glimpse (a ``window`` x
``window`` window of pixel probabilities); the spatial transformer :math:`\mathrm{ST}`
(:func:`torch.nn.functional.affine_grid` / :func:`~torch.nn.functional.grid_sample`) places
it on the canvas at scale :math:`e^{a_t}` (the window's side over the canvas's) and centre
:math:`(u_t, v_t)` (in the canvas's coordinates, :math:`[-1, 1]`, ``u`` across); objects are
combined by a noisy-or, which matches the data's composition by maximum, and every pixel has a
floor :math:`\epsilon` (``pixel_floor``).

**Guide.** At each step an LSTM reads an embedding of the canvas with the windows attended
so far erased, and the previous step's latents; from its state come :math:`q(z^{pres}_t)`
(again :math:`0` once an object is off) and :math:`q(z^{where}_t)`; the glimpse the guide's
:math:`z^{where}_t` cuts from the canvas is encoded to :math:`q(z^{what}_t)`.

**Masking.** Sites of objects that are off are masked (:func:`pyro.poutine.mask`): their
latents do not touch the image and contribute nothing to :math:`\log p` or :math:`\log q`,
which is as if they were never drawn. So every image keeps its own number of objects while
the batch (and any particle plate) runs vectorized.

References

- [1] S. M. A. Eslami, N. Heess, T. Weber, Y. Tassa, D. Szepesvari, K. Kavukcuoglu,
  G. E. Hinton, "Attend, Infer, Repeat: Fast Scene Understanding with Generative Models",
  NeurIPS 2016.
- [2] T. A. Le, A. R. Kosiorek, N. Siddharth, Y. W. Teh, F. Wood, "Revisiting Reweighted
  Wake-Sleep for Models with Stochastic Control Flow", UAI 2019.
- [3] M. Jaderberg, K. Simonyan, A. Zisserman, K. Kavukcuoglu, "Spatial Transformer
  Networks", NeurIPS 2015.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Tuple, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional

from .base import BernoulliUnits, ModelGuidePair, mlp

__all__ = ["AIRLatents", "MultiDigitAIR", "canvas_to_window", "window_to_canvas"]


def _flat(t: torch.Tensor, event: int) -> Tuple[torch.Tensor, torch.Size]:
    """``t`` with its batch dimensions (all but the last ``event``) flattened into one."""
    batch = t.shape[: t.dim() - event]
    return t.reshape((-1,) + t.shape[t.dim() - event :]), batch


def _batch_like(*tensors: torch.Tensor, events: Tuple[int, ...]) -> list:
    """Broadcast the batch dimensions (all but the last ``events[i]``) of the tensors."""
    batch = torch.broadcast_shapes(*(t.shape[: t.dim() - e] for t, e in zip(tensors, events)))
    return [t.expand(batch + t.shape[t.dim() - e :]) for t, e in zip(tensors, events)]


def _on(pres: torch.Tensor) -> Any:
    """:func:`pyro.poutine.mask` keeping the sites where ``pres`` is 1."""
    return poutine.mask(mask=cast(torch.BoolTensor, pres.bool()))


def _theta(z_where: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The affine maps ``(B, 2, 3)``: window to canvas coordinates, or back (``inverse``)."""
    s = z_where[:, 0].clamp(-4.0, 2.0).exp()
    u, v = z_where[:, 1], z_where[:, 2]
    zero = torch.zeros_like(s)
    if inverse:  # canvas point of each window point: s * w + (u, v)
        rows = [s, zero, u, zero, s, v]
    else:  # window point of each canvas point: (c - (u, v)) / s
        rows = [1 / s, zero, -u / s, zero, 1 / s, -v / s]
    return torch.stack(rows, -1).reshape(-1, 2, 3)


def window_to_canvas(windows: torch.Tensor, z_where: torch.Tensor, canvas: int) -> torch.Tensor:
    """
    Place square windows (flattened, ``(..., window ** 2)``) on ``canvas`` x ``canvas``
    canvases at ``z_where = (log scale, u, v)`` (``(..., 3)``; batch shapes broadcast);
    zero outside each window.

    :returns: ``(..., canvas ** 2)``.
    """
    windows, z_where = _batch_like(windows, z_where, events=(1, 1))
    flat, batch = _flat(windows, 1)
    side = int(round(flat.shape[-1] ** 0.5))
    theta = _theta(_flat(z_where, 1)[0], inverse=False)
    grid = functional.affine_grid(theta, [len(flat), 1, canvas, canvas], align_corners=False)
    out = functional.grid_sample(
        flat.reshape(-1, 1, side, side), grid, align_corners=False, padding_mode="zeros"
    )
    return out.reshape(batch + (canvas * canvas,))


def canvas_to_window(images: torch.Tensor, z_where: torch.Tensor, window: int) -> torch.Tensor:
    """
    Cut the ``window`` x ``window`` glimpses at ``z_where`` out of square images (flattened,
    ``(..., canvas ** 2)``): the inverse of :func:`window_to_canvas`.

    :returns: ``(..., window ** 2)``.
    """
    images, z_where = _batch_like(images, z_where, events=(1, 1))
    flat, batch = _flat(images, 1)
    side = int(round(flat.shape[-1] ** 0.5))
    theta = _theta(_flat(z_where, 1)[0], inverse=True)
    grid = functional.affine_grid(theta, [len(flat), 1, window, window], align_corners=False)
    out = functional.grid_sample(flat.reshape(-1, 1, side, side), grid, align_corners=False)
    return out.reshape(batch + (window * window,))


class AIRLatents(NamedTuple):
    """
    One draw of the guide's latents for a batch (:meth:`MultiDigitAIR.infer`).

    :ivar counts: int64 ``(N,)``, the number of objects :math:`\\sum_t z^{pres}_t`.
    :ivar z_pres: ``(N, T)`` of zeros and ones.
    :ivar z_where: ``(N, T, 3)``: log scale and centre ``(u, v)`` of each object's window.
    """

    counts: torch.Tensor
    z_pres: torch.Tensor
    z_where: torch.Tensor


class _Generative(nn.Module):
    pres_logits: nn.Parameter
    decoder: nn.Module

    def __init__(self, max_objects: int, z_what_dim: int, window: int, hidden: int) -> None:
        super().__init__()
        self.pres_logits = nn.Parameter(torch.zeros(max_objects))
        self.decoder = mlp(z_what_dim, window * window, hidden)


class _Recognition(nn.Module):
    embed: nn.Module
    rnn: nn.LSTMCell
    predict: nn.Linear
    encoder: nn.Module

    def __init__(self, x_dim: int, z_what_dim: int, window: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU())
        self.rnn = nn.LSTMCell(hidden + 3 + z_what_dim + 1, hidden)
        self.predict = nn.Linear(hidden, 1 + 3 + 3)
        self.encoder = mlp(window * window, 2 * z_what_dim, hidden)


class MultiDigitAIR(ModelGuidePair):
    """
    Attend-Infer-Repeat for binary canvases (see the module docs for the equations).

    Sites, all inside the plate ``"data"``: ``"z_pres_{t}"`` (Bernoulli), ``"z_where_{t}"``
    and ``"z_what_{t}"`` (``Normal(...).to_event(1)``) for ``t = 0 .. max_objects - 1``, and
    ``"x"`` (observed, ``canvas_size ** 2`` binary pixels)::

        air = MultiDigitAIR(canvas_size=28, max_objects=3)
        ws = WakeSleep(air.model, air.guide, pyro.optim.Adam({"lr": 1e-3}),
                       num_particles=5, phi_objective="wake",
                       max_plate_nesting=air.max_plate_nesting)

    :param canvas_size: the side of the square canvas.
    :param max_objects: :math:`T`, the largest number of objects.
    :param window: the side of the decoded glimpse (and of the guide's).
    :param z_what_dim: the dimension of :math:`z^{what}`.
    :param hidden: the width of the networks (decoder, encoder, embedding, LSTM).
    :param scale_prior: :math:`s_0`, the prior's typical window scale (window side over canvas
        side) and :math:`\\sigma_a`, the prior's spread of its logarithm.
    :param shift_prior_sd: :math:`\\sigma_u`, the prior's spread of the window's centre.
    :param pixel_floor: :math:`\\epsilon`, the least probability of a pixel's either value.
    :param baselines: add data-dependent baselines for :class:`~pyro.infer.TraceGraph_ELBO`
        (a network of their own, ``self.baseline``, registered as ``"{name}_baseline"``; the
        other estimators ignore the baselines and never touch its parameters).
    :param name: the prefix of the parameter names in Pyro's parameter store.
    """

    generative: _Generative
    recognition: _Recognition
    baseline: Optional[nn.Module]
    where_loc: torch.Tensor
    where_scale: torch.Tensor

    def __init__(
        self,
        canvas_size: int = 28,
        max_objects: int = 3,
        *,
        window: int = 14,
        z_what_dim: int = 10,
        hidden: int = 128,
        scale_prior: Tuple[float, float] = (0.5, 0.2),
        shift_prior_sd: float = 0.5,
        pixel_floor: float = 1e-3,
        baselines: bool = False,
        name: str = "air",
    ) -> None:
        if canvas_size < 1 or max_objects < 1 or window < 1 or z_what_dim < 1 or hidden < 1:
            raise ValueError("canvas_size, max_objects, window, z_what_dim, hidden must be >= 1")
        if not 0.0 < pixel_floor < 0.5:
            raise ValueError(f"pixel_floor must be in (0, 0.5), got {pixel_floor!r}")
        super().__init__(canvas_size * canvas_size, name)
        self.canvas_size, self.max_objects = int(canvas_size), int(max_objects)
        self.window, self.z_what_dim = int(window), int(z_what_dim)
        self.pixel_floor = float(pixel_floor)
        self.generative = _Generative(self.max_objects, self.z_what_dim, self.window, hidden)
        self.recognition = _Recognition(self.x_dim, self.z_what_dim, self.window, hidden)
        self.baseline = None
        if baselines:
            self.baseline = mlp(self.x_dim + self.max_objects + 1 + 3, 1, hidden)
        self.register_buffer(
            "where_loc", torch.tensor([math.log(scale_prior[0]), 0.0, 0.0]), persistent=False
        )
        self.register_buffer(
            "where_scale",
            torch.tensor([scale_prior[1], shift_prior_sd, shift_prior_sd]),
            persistent=False,
        )
        with torch.no_grad():  # start with faint glimpses: most pixels are off
            _last_linear(self.generative.decoder).bias.fill_(-2.0)

    # ------------------------------------------------------------------ the prior

    def count_prior(self) -> torch.Tensor:
        """The prior's distribution of the number of objects, ``(T + 1,)``: entry ``n`` is
        :math:`\\prod_{t \\le n} \\rho_t\\,(1 - \\rho_{n+1})` (no last factor for ``n = T``)."""
        rho = torch.sigmoid(self.generative.pres_logits.detach())
        on = torch.cat([rho.new_ones(1), torch.cumprod(rho, 0)])
        return on * torch.cat([1 - rho, rho.new_ones(1)])

    # ------------------------------------------------------------------ model and guide

    def model(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
    ) -> None:
        """
        The generative model :math:`p_\\theta(x, z)`.

        :param x: binary canvases of shape ``(N, canvas_size ** 2)`` (float).
        :param observations: ``{"x": data}``, used instead of ``x`` when given.
        """
        x = self._data(x, observations)
        self._register_generative()
        gen = self.generative
        where = dist.Normal(self.where_loc, self.where_scale).to_event(1)
        what = dist.Normal(x.new_zeros(self.z_what_dim), 1.0).to_event(1)
        log_off: torch.Tensor = x.new_zeros(())  # sum_t z_pres_t log(1 - p_t), per pixel
        pres = x.new_ones(())
        with pyro.plate("data", x.shape[-2], dim=-1):
            for t in range(self.max_objects):
                with _on(pres):
                    rho = torch.sigmoid(gen.pres_logits[t]) * pres
                    pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(rho))
                with _on(pres):
                    z_where = pyro.sample(f"z_where_{t}", where)
                    z_what = pyro.sample(f"z_what_{t}", what)
                # log(1 - sigmoid(l)) = -softplus(l); zero off the window.
                glimpse = -functional.softplus(gen.decoder(z_what))
                placed = window_to_canvas(glimpse, z_where, self.canvas_size)
                log_off = log_off + pres.unsqueeze(-1) * placed
            eps = self.pixel_floor
            probs = eps + (1 - 2 * eps) * -torch.expm1(log_off)
            pyro.sample("x", BernoulliUnits(probs.log() - (-probs).log1p()), obs=x)

    def guide(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
    ) -> None:
        """
        The recognition model :math:`q_\\phi(z \\mid x)`, one object after the other.

        :param x: binary canvases of shape ``(N, canvas_size ** 2)``.
        :param observations: ``{"x": fantasy}`` from a sleep phase, used instead of ``x``; it
            may carry leading particle dimensions.
        """
        x = self._data(x, observations)
        self._register_recognition()
        if self.baseline is not None:
            pyro.module(f"{self.name}_baseline", self.baseline)
        rec = self.recognition
        remaining = x  # the canvas with the windows attended so far erased
        h = c = x.new_zeros(x.shape[:-1] + (rec.rnn.hidden_size,))
        z_where = x.new_zeros(3)
        z_what = x.new_zeros(self.z_what_dim)
        pres = x.new_ones(())
        ones = x.new_ones(self.window * self.window)
        with pyro.plate("data", x.shape[-2], dim=-1):
            for t in range(self.max_objects):
                embedded = rec.embed(remaining)
                inputs = _batch_like(embedded, z_where, z_what, pres[..., None], h, c,
                                     events=(1, 1, 1, 1, 1, 1))  # fmt: skip
                flat, batch = _flat(torch.cat(inputs[:4], -1), 1)
                h, c = rec.rnn(flat, (_flat(inputs[4], 1)[0], _flat(inputs[5], 1)[0]))
                h, c = h.reshape(batch + h.shape[-1:]), c.reshape(batch + c.shape[-1:])
                out = rec.predict(h)
                infer = self._baseline(x, t, pres, z_where)
                with _on(pres):
                    rho = torch.sigmoid(out[..., 0]) * pres
                    pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(rho), infer=infer)
                with _on(pres):
                    loc = self.where_loc + out[..., 1:4]
                    scale = self.where_scale * torch.sigmoid(out[..., 4:7])
                    z_where = pyro.sample(f"z_where_{t}", dist.Normal(loc, scale).to_event(1))
                    code = rec.encoder(canvas_to_window(x, z_where, self.window))
                    what_loc, what_scale = code.split(self.z_what_dim, -1)
                    what_scale = functional.softplus(what_scale) + 1e-3
                    z_what = pyro.sample(
                        f"z_what_{t}", dist.Normal(what_loc, what_scale).to_event(1)
                    )
                erased = window_to_canvas(ones, z_where, self.canvas_size)
                remaining = remaining * (1 - pres.unsqueeze(-1) * erased)

    def _baseline(self, x: torch.Tensor, t: int, pres: torch.Tensor, z_where: torch.Tensor) -> Any:
        """The z_pres site's ``infer`` dict: a decaying average plus a network's correction,
        from the canvas, the step and the previous object (inputs detached)."""
        if self.baseline is None:
            return {}
        step = functional.one_hot(torch.tensor(t), self.max_objects).to(x)
        parts = _batch_like(x, step, pres[..., None], z_where, events=(1, 1, 1, 1))
        value = self.baseline(torch.cat([p.detach() for p in parts], -1)).squeeze(-1)
        return {"baseline": {"use_decaying_avg_baseline": True, "baseline_value": value}}

    # ------------------------------------------------------------------ inspection

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> AIRLatents:
        """
        One draw of the guide's latents for the canvases ``x`` (``(N, canvas_size ** 2)``),
        hidden from outer handlers.

        :returns: :class:`AIRLatents`: the number of objects, ``z_pres`` and ``z_where``.
        """
        with poutine.block():
            trace = poutine.trace(self.guide).get_trace(x)
        values = [cast(dict, trace.nodes[f"z_{s}_{t}"])["value"] for s in ("pres", "where")
                  for t in range(self.max_objects)]  # fmt: skip
        pres = torch.stack(values[: self.max_objects], -1)
        where = torch.stack(values[self.max_objects :], -2)
        return AIRLatents(pres.sum(-1).long(), pres, where)

    @torch.no_grad()
    def count_accuracy(
        self, x: torch.Tensor, counts: torch.Tensor, num_samples: int = 1
    ) -> torch.Tensor:
        """
        How often the guide's number of objects is the true one: for each canvas, the fraction
        of ``num_samples`` draws of :meth:`infer` whose count equals ``counts``.

        :param x: canvases ``(N, canvas_size ** 2)``.
        :param counts: the true numbers of objects, ``(N,)``.
        :returns: float ``(N,)``; its mean estimates the accuracy of one guide draw.
        """
        hits = torch.zeros(len(x))
        for _ in range(num_samples):
            hits += (self.infer(x).counts.cpu() == counts.cpu()).float()
        return hits / num_samples

    def boxes(self, z_where: torch.Tensor) -> torch.Tensor:
        """
        The pixel boxes of windows at ``z_where`` (``(..., 3)``): ``(..., 4)`` holding
        (left, top, width, height) in pixel units of the canvas, for drawing.
        """
        side = self.canvas_size
        s = z_where[..., 0].clamp(-4.0, 2.0).exp()
        width = s * side
        left = (z_where[..., 1] + 1) * side / 2 - width / 2
        top = (z_where[..., 2] + 1) * side / 2 - width / 2
        return torch.stack([left, top, width, width], -1)


def _last_linear(f: nn.Module) -> nn.Linear:
    return [m for m in f.modules() if isinstance(m, nn.Linear)][-1]
