"""
The checks of a wake-sleep step and their messages: the pairing of model and guide sites,
the support of observed values, parameters shared by model and guide, and the finiteness of
every loss and gradient (:class:`NonFiniteLossError`). Each message names the site, argument
or parameter and says what to do.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Dict, List, NamedTuple, Optional

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine import Trace
from pyro.util import check_model_guide_match, check_site_shape
from torch.distributions import constraints

from .objectives import sample_sites, site_log_prob
from .traces import plate_nesting, tensors_reached


class NonFiniteLossError(RuntimeError):
    """A loss or gradient of a step is NaN or infinite; nothing was updated."""


class SupportCheck(NamedTuple):
    """Whether one observed site's value lies in its distribution's support: ``ok`` is a
    scalar bool tensor, read by :func:`check_support` after the step's computation."""

    site: str
    description: str
    ok: torch.Tensor


def check_sites(model_trace: Trace, guide_trace: Trace, phase: str) -> None:
    """Every model latent is sampled by the guide and the guide samples nothing else.

    :param phase: the phase to name in a message (``"wake"``, ``"sleep"``, ...).
    :raises ValueError: naming the site and the fix.
    """
    model_sites = {
        site["name"]: site
        for site in sample_sites(model_trace)
        if not site["infer"].get("_deterministic")  # pyro.deterministic: neither data nor latent
    }
    observed = {
        name
        for name, site in model_sites.items()
        if site["is_observed"] or site["infer"].get("was_observed")
    }
    if not observed:
        raise ValueError(
            "The model has no observed site: wake-sleep fits a model to data, so at least one "
            "pyro.sample(..., obs=data) statement is needed."
        )
    # The guide's own auxiliary sites (an autoguide's unconstrained draws, a pyro.factor) are
    # part of its density, not latents of the model.
    guide_names = {
        site["name"]
        for site in sample_sites(guide_trace)
        if not site["infer"].get("is_auxiliary") and not site["is_observed"]
    }
    for name in guide_names:
        if name in observed:
            raise ValueError(
                f"The guide samples site '{name}', which the model observes. The guide should "
                f"sample only latent sites; remove '{name}' from the guide."
            )
        if name not in model_sites:
            raise ValueError(
                f"The guide samples site '{name}', which the model does not have (in the "
                f"{phase} phase). Rename it to match a model latent, or remove it."
            )
    for name in model_sites:
        if name not in observed and name not in guide_names:
            raise ValueError(
                f"The model's latent site '{name}' is not sampled by the guide (in the {phase} "
                f"phase). Add pyro.sample('{name}', ...) to the guide: wake-sleep needs a "
                "proposal for every latent."
            )


def _is_point_mass(fn: Any) -> bool:
    while isinstance(fn, (dist.Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def check_guide_density(guide_trace: Trace, phase: str) -> None:
    r"""
    Refuse a guide that wake-sleep cannot train or score: it fits the guide through
    :math:`\log q_\phi(z \mid x)` at given values of :math:`z`. A point mass (``Delta``,
    ``AutoDelta``) has no log-density to follow; and in the sleep phase, where :math:`z` is the
    model's fantasy, a guide with auxiliary sites (an autoguide's unconstrained draws) cannot
    score it, since the auxiliary values behind a fantasy are unknown.

    :param phase: ``"sleep"``, or ``"wake"`` (wake-phi).
    :raises ValueError: naming the sites and what to use instead.
    """
    sites = sample_sites(guide_trace)
    auxiliary = [
        s["name"] for s in sites if s["infer"].get("is_auxiliary") and not s["is_observed"]
    ]
    latents = [s for s in sites if not s["infer"].get("is_auxiliary") and not s["is_observed"]]
    if phase == "sleep" and auxiliary:
        raise ValueError(
            f"The guide has auxiliary sites ({', '.join(repr(n) for n in auxiliary[:3])}), as "
            "an autoguide does: the sleep phase scores the model's fantasy z under the guide, "
            "which needs the auxiliary values behind z, unknown for a fantasy. Train such a "
            "guide by wake-phi: phi_objective='wake' with num_particles > 1."
        )
    points = [s["name"] for s in latents if _is_point_mass(s["fn"])]
    if points and not auxiliary:
        raise ValueError(
            f"The guide's site(s) {', '.join(repr(n) for n in points[:3])} are point masses "
            "(Delta, AutoDelta): wake-sleep fits the guide by its log-density at given values, "
            "which a point mass does not have (it is 0 where the mass is, -inf elsewhere), so "
            "the guide would not learn. Use a guide with a density, such as AutoNormal or a "
            "Normal of learned location and scale."
        )


def check_model_guide_shapes(
    model_trace: Trace,
    guide_trace: Trace,
    max_plate_nesting: Optional[int] = None,
    vectorized: bool = False,
) -> None:
    """
    Pyro's own checks that model and guide agree, as its ELBOs run them (on the first
    computation): each site's batch shape fits its plates, and the two programs agree on every
    shared site's shape and event dimensions. Enumeration is refused: wake-sleep samples every
    latent. Run on the wake traces, whose messages name the user's sites.

    :param max_plate_nesting: the user's, if given; else the traces' own depth.
    :param vectorized: the traces hold a particle plate, one more level of nesting.
    :raises ValueError: naming the site.
    """
    nesting = plate_nesting(model_trace, guide_trace)
    if max_plate_nesting is not None:
        nesting = max(nesting, max_plate_nesting + (1 if vectorized else 0))
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob()
        for site in sample_sites(trace):
            if site["infer"].get("enumerate"):
                raise ValueError(
                    f"Site '{site['name']}' is marked for enumeration "
                    f"(infer={{'enumerate': ...}}): wake-sleep samples every latent and does "
                    "not enumerate; remove the mark (or use Pyro's TraceEnum_ELBO)."
                )
            check_site_shape(site, nesting)
    with warnings.catch_warnings():
        # check_sites says more about sites missing on either side; Pyro's other warnings
        # (a plate in the guide but not the model, say) go through.
        warnings.filterwarnings("ignore", message="Found (non-auxiliary )?vars in")
        check_model_guide_match(model_trace, guide_trace, nesting)


def data_independent_sites(guide_trace: Trace, data: Dict[str, torch.Tensor]) -> List[str]:
    """The guide's latent sites whose log-density has no autograd path to any of ``data`` (the
    fantasy it was given, as leaves: latents by site name, data by argument) other than the
    site's own value: sites where the guide reads neither the data nor other latents."""
    names = []
    for site in sample_sites(guide_trace):
        if site["infer"].get("is_auxiliary") or site["is_observed"]:
            continue
        log_q = site_log_prob(site)
        others = {name: t for name, t in data.items() if name != site["name"]}
        if not isinstance(log_q, torch.Tensor) or not tensors_reached(log_q, others):
            names.append(site["name"])
    return names


def warn_if_data_independent(guide_trace: Trace, fantasy: Dict[str, torch.Tensor]) -> None:
    """Warn when the guide's density at a site does not depend on the fantasy it was given
    (:func:`data_independent_sites`): sleep-phi then fits that site to the prior, not to the
    posterior (a global guide, an autoguide)."""
    names = data_independent_sites(guide_trace, fantasy)
    if names:
        warnings.warn(
            f"The guide's site(s) {', '.join(repr(n) for n in names[:3])} do not depend on "
            "the data: sleep-phi fits them to the model's prior p(z), not to the posterior "
            "p(z | x). For a guide that does not read the data (a global guide, an "
            "autoguide), use wake-phi: phi_objective='wake' with num_particles > 1.",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def observed_support(model_trace: Trace) -> List[SupportCheck]:
    """
    Whether each observed value lies in its distribution's support (masked entries excepted),
    computed without reading any tensor's value; :func:`check_support` reads them. This is the
    one check of Pyro's distribution validation that a wake-sleep step cannot replace by its
    finiteness check: a Bernoulli observed at 2 has a finite log-density.
    """
    found = []
    for site in sample_sites(model_trace):
        if not site["is_observed"]:
            continue
        fn, value, mask = site["fn"], site["value"], site["mask"]
        if mask is False:
            continue
        with torch.no_grad():
            if not isinstance(mask, torch.Tensor) and _is_boolean(fn.support, value):
                ok = _all_binary(value)
            else:
                ok = fn.support.check(value)
                if isinstance(mask, torch.Tensor):
                    ok = ok | ~mask
                ok = ok.all()
            description = f"({fn.support}) of its distribution {type(fn).__name__}"
            found.append(SupportCheck(site["name"], description, ok))
    return found


def _is_boolean(support: constraints.Constraint, value: torch.Tensor) -> bool:
    """Whether ``support`` is {0, 1} elementwise (Bernoulli data) and ``value`` floating."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.boolean and value.is_floating_point()


def _all_binary(value: torch.Tensor) -> torch.Tensor:
    """
    Whether every entry of a floating ``value`` is 0 or 1, as ``boolean.check(value).all()``
    says, in one fused elementwise pass, its absolute value in place and a sum instead of
    three passes, two of them comparisons (several times faster on CPU; it matters at large
    batches).

    ``addcmul(v, v, v, value=-1)`` is ``v - v * v``, rounded once (a fused multiply-add) or
    twice; either way it is zero exactly when ``v`` is 0 or 1. Rounded once, it is zero only
    when ``v == v * v`` exactly. Rounded twice, only when ``fl(v * v) == v``: for ``v`` in
    {0, 1}, and for no other finite ``v`` (the square of a float next to 1 rounds to a float
    farther from 1; any other square is far from ``v``). ``inf`` and NaN give ``-inf`` or
    NaN, a sum that is not zero; the absolute values cannot cancel.
    """
    return torch.addcmul(value, value, value, value=-1).abs_().sum() == 0


def check_support(support: List[SupportCheck]) -> None:
    """Raise ``ValueError``, naming the site, if an observed value of
    :func:`observed_support` lies outside its support. Each check is read on its own: a
    model has few observed sites, and stacking them first costs more than it saves (every torch
    call counts on the hot path)."""
    for check in support:
        if not bool(check.ok):
            raise ValueError(
                f"The observed value of site '{check.site}' lies outside the support "
                f"{check.description}. Check the data passed as obs= at '{check.site}' (for "
                "example binary data for a Bernoulli)."
            )


def check_disjoint(theta: Dict[str, torch.Tensor], phi: Dict[str, torch.Tensor]) -> None:
    """Refuse parameters used by both the model (``theta``) and the guide (``phi``)."""
    shared = sorted(set(theta) & set(phi))
    if shared:
        raise ValueError(
            "Parameter(s) " + ", ".join(f"'{n}'" for n in shared) + " are used by both the "
            "model and the guide. Wake-sleep updates the model's parameters by the wake "
            "phase and the guide's by the sleep phase, so each parameter must belong to one "
            "of them: give the guide its own copy."
        )


def nonfinite_sites(traces: List[Trace]) -> List[str]:
    """The sample sites whose log-density is NaN or infinite somewhere, once each."""
    names = []
    for trace in traces:
        for site in sample_sites(trace):
            with torch.no_grad():
                lp = site_log_prob(site)
            if isinstance(lp, torch.Tensor) and not torch.isfinite(lp).all():
                names.append(site["name"])
    return list(dict.fromkeys(names))


def nonfinite_inputs(args: tuple, kwargs: dict) -> List[str]:
    """The floating-point tensor arguments holding NaN or infinity, named for a message."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [
        (f"keyword argument '{k}'", v) for k, v in kwargs.items()
    ]
    return [
        name
        for name, value in named
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not torch.isfinite(value).all()
    ]


def nonfinite_problems(
    losses: Dict[str, Optional[torch.Tensor]], params: Dict[str, torch.Tensor]
) -> List[str]:
    """
    The losses and parameter gradients that hold NaN or infinity, named for a message; empty
    when all are finite. One sum on the hot path: a sum is NaN or infinite when any of its
    terms is (a finite overflow would need entries near 1e38); the exact search runs only when
    it fails. On CPU the terms are added as Python floats: stacking them and reducing the stack
    is more torch calls, each slow on a step whose large tensors have just left the caches. On
    an accelerator they are stacked, so that the values are read back in one synchronization.
    """
    values = [x for x in losses.values() if x is not None]
    grads = [p.grad for p in params.values() if p.grad is not None]
    if all(t.device.type == "cpu" for t in values + grads):
        total = sum(x.item() for x in values) + sum(g.sum().item() for g in grads)
        finite = math.isfinite(total)
    else:
        terms = [x.detach().reshape(()) for x in values] + [g.sum() for g in grads]
        finite = bool(torch.isfinite(torch.stack(terms).sum()))
    if finite:
        return []
    problems = [
        f"{name} loss"
        for name, x in losses.items()
        if x is not None and not torch.isfinite(x).all()
    ]
    problems += [
        f"gradient of parameter '{name}'"
        for name, p in params.items()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    return problems


def nonfinite_message(step: int, problems: List[str], sites: List[str], inputs: List[str]) -> str:
    """The message of a :class:`NonFiniteLossError` at ``step``."""
    message = f"Step {step}: non-finite "
    message += ", ".join(problems) if problems else "values"
    message += "."
    if sites:
        message += " Non-finite log-density at site(s) " + ", ".join(f"'{s}'" for s in sites)
        message += "."
    if inputs:
        message += " NaN or infinity in " + ", ".join(inputs) + "."
    return (
        message + " No parameter or optimizer state was changed. Remove NaN/inf from the "
        "data, and check the model and guide for parameters that leave their support."
    )


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value``, if it is an integer (not a bool) of at least ``minimum``.

    :raises ValueError: naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def brief(error: BaseException) -> str:
    """An exception's type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package, for a warning that points
    at the user's call (``WakeSleep.step``, ``WakeSleep(...)``), wherever it is raised."""
    frame = inspect.currentframe()
    frame = None if frame is None else frame.f_back  # the caller of this function: level 1
    level = 1
    package = __name__.split(".")[0]
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == package:
        frame = frame.f_back
        level += 1
    return level
