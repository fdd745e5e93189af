"""
Fantasies: samples :math:`(z, x) \\sim p_\\theta` drawn from the model for the sleep phase, and
the arguments that hand the fantasy :math:`x` to the guide.

A fantasy is a trace of the model run with the same arguments as the real batch under
:func:`pyro.poutine.uncondition`, so that each observed site is sampled instead of observed
and every plate keeps the size it has on real data. The guide takes its data through its
arguments, so the sleep phase has to call it with the fantasy where the real observation was.
:func:`guide_arguments` does that in one of three ways, tried in this order:

1. a guide with an ``observations`` keyword (the convention of Pyro's
   ``ReweightedWakeSleep`` and ``CSIS``) is given ``observations={site: fantasy value}``;
2. otherwise each observed value must be one of the model's arguments, positional or keyword,
   or a contiguous view or reshape of one (``obs=x``, ``obs=x.reshape(-1, 784)``); that
   argument is replaced by the fantasy, reshaped like the argument. ``obs=x[i]`` in a loop over
   a sequential plate (a view inside ``x``) is recognized too: the guide gets an array shaped
   like ``x`` with each fantasy where its observation was and zeros elsewhere. So is Pyro's
   mini-batch idiom, ``with pyro.plate("data", len(x), subsample_size=B) as i: ...
   obs=x[i]``, on a mini-batch or on the full batch (the match is by value: an observation
   equal, row for row, to ``x[i]`` for the plate's indices ``i``, with the same dtype): the
   guide then gets an array shaped like ``x`` holding the fantasy in rows ``i`` and zeros
   elsewhere (for very large data, pass the mini-batch itself and use
   ``pyro.plate("data", N, subsample=indices)``, which costs nothing per step);
3. a user-supplied ``fantasy_args(observations, *args, **kwargs) -> (args, kwargs)``.

When none applies, :class:`FantasyError` names the site and says how to fix it: a sleep phase
never runs a guide that would read the real data.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from pyro import poutine
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample

from .objectives import sample_sites

FantasyArgsFn = Callable[..., Tuple[tuple, dict]]


class FantasyError(ValueError):
    """The sleep phase cannot hand the model's fantasies to the guide."""


class UnrecordableMatch(RuntimeError):
    """The fantasy's place among the arguments is found by comparing values (``obs=data[i]``
    with subsample indices), which a recorded step (``jit=True``) cannot do."""


def _equal(rows: torch.Tensor, obs: torch.Tensor, site: str) -> bool:
    try:
        return torch.equal(rows, obs)
    except RuntimeError as error:
        if "tracing tensor" not in str(error):
            raise
        raise UnrecordableMatch(
            f"the sleep phase finds the argument that site '{site}' observes as data[i] by "
            "comparing values, which a recorded step cannot do"
        ) from error


def draw_fantasy(model: Callable, *args: Any, **kwargs: Any) -> Trace:
    """
    Trace the model with every observed site sampled instead of observed.

    The trace is drawn without gradients: fantasies are data for the guide, and no gradient
    flows from the sleep objective into the model's parameters.

    :param model: the Pyro model.
    :returns: the trace; observed sites are marked ``site["infer"]["was_observed"]``.
    """
    with torch.no_grad():
        return poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)


def fantasy_observations(trace: Trace) -> Dict[str, torch.Tensor]:
    """The fantasy values of the model's observed sites, ``{site name: value}``."""
    observations = {}
    for site in sample_sites(trace):
        if site["infer"].get("_deterministic"):
            continue  # pyro.deterministic: a function of the latents, not data
        if site["infer"].get("was_observed"):
            if site["infer"].get("is_auxiliary"):
                raise FantasyError(
                    f"Site '{site['name']}' is a pyro.factor: a model with factors has no "
                    "fantasies to draw, so the sleep phase cannot run. Use "
                    "phi_objective='wake', or write the factor as a normalized distribution."
                )
            observations[site["name"]] = site["value"]
    return observations


def takes_observations(guide: Callable) -> bool:
    """Whether the guide has an ``observations`` keyword (Pyro's RWS / CSIS convention); for
    an ``nn.Module`` guide, its ``forward``'s (the module's own signature hides it)."""
    if isinstance(guide, torch.nn.Module):
        guide = guide.forward
    try:
        parameters = inspect.signature(guide).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("observations")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _is_reshape_of(obs: torch.Tensor, arg: torch.Tensor) -> bool:
    """Whether ``obs`` holds the same elements as ``arg`` in the same order."""
    if obs is arg:
        return True
    if obs.numel() != arg.numel() or obs.device != arg.device:
        return False
    if not (obs.is_contiguous() and arg.is_contiguous()):
        return False
    if obs.numel() == 0:
        return False
    return (
        obs.untyped_storage().data_ptr() == arg.untyped_storage().data_ptr()
        and obs.storage_offset() == arg.storage_offset()
    )


def _find_argument(obs: Any, args: tuple, kwargs: dict) -> Optional[Tuple[str, Any]]:
    if not isinstance(obs, torch.Tensor):
        return None
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor) and _is_reshape_of(obs, arg):
            return "args", i
    for key, arg in kwargs.items():
        if isinstance(arg, torch.Tensor) and _is_reshape_of(obs, arg):
            return "kwargs", key
    return None


def _find_view(obs: Any, args: tuple, kwargs: dict) -> Optional[Tuple[str, Any]]:
    """An argument of which ``obs`` is a strict view (``obs=data[i]`` in a loop over a
    sequential plate): same storage, inside it."""
    if not isinstance(obs, torch.Tensor) or obs.numel() == 0:
        return None
    named = [("args", i, a) for i, a in enumerate(args)] + [
        ("kwargs", k, a) for k, a in kwargs.items()
    ]
    for where, key, arg in named:
        if (
            isinstance(arg, torch.Tensor)
            and arg.is_contiguous()
            and arg.numel() > obs.numel()
            and obs.device == arg.device
            and obs.untyped_storage().data_ptr() == arg.untyped_storage().data_ptr()
            and arg.storage_offset() <= obs.storage_offset() < arg.storage_offset() + arg.numel()
        ):
            return where, key
    return None


def _subsample_indices(trace: Trace, site: dict) -> list:
    """The subsample index tensors of the plates around a site, as (plate size, indices)."""
    found = []
    for frame in site["cond_indep_stack"]:
        node = trace.nodes.get(frame.name)
        if node is not None and site_is_subsample(node) and frame.full_size is not None:
            found.append((frame.full_size, node["value"]))
    return found


def _find_indexed_argument(
    trace: Trace, site: Any, args: tuple, kwargs: dict
) -> Optional[Tuple[str, Any, torch.Tensor]]:
    """
    Find an argument ``data`` with ``obs == data[indices]`` for the subsample indices of a plate
    around the site (Pyro's mini-batch idiom ``with pyro.plate(..., subsample_size=B) as i:``
    ``pyro.sample(..., obs=data[i])``).
    """
    obs = site["infer"]["obs"]
    if not isinstance(obs, torch.Tensor):
        return None
    candidates = [("args", i, a) for i, a in enumerate(args)]
    candidates += [("kwargs", k, a) for k, a in kwargs.items()]
    for size, indices in _subsample_indices(trace, site):
        for where, key, arg in candidates:
            if not isinstance(arg, torch.Tensor) or arg.dim() == 0 or arg.shape[0] != size:
                continue
            rows = arg.index_select(0, indices.to(arg.device))
            if (
                rows.dtype == obs.dtype
                and rows.numel() == obs.numel()
                and _equal(rows.reshape(obs.shape), obs, site["name"])
            ):
                return where, key, indices
    return None


def guide_arguments(
    trace: Trace,
    args: tuple,
    kwargs: dict,
    *,
    use_observations_keyword: bool,
    fantasy_args: Optional[FantasyArgsFn] = None,
) -> Tuple[tuple, dict]:
    """
    The guide's arguments for one fantasy: the real ``args``/``kwargs`` with every observation
    replaced by its fantasy value.

    :param trace: a fantasy trace from :func:`draw_fantasy`.
    :param args: the positional arguments the model was run with.
    :param kwargs: the keyword arguments the model was run with.
    :param use_observations_keyword: pass ``observations={site: value}`` (way 1).
    :param fantasy_args: the user's callable (way 3), used when way 2 does not apply.
    :raises FantasyError: when no way applies; the message names the site.
    """
    observations = fantasy_observations(trace)
    if use_observations_keyword:
        return args, {**kwargs, "observations": observations}

    new_args, new_kwargs = list(args), dict(kwargs)
    unmatched = []
    views: Dict[Tuple[str, Any], Tuple[list, torch.Tensor]] = {}
    for name, value in observations.items():
        site = trace.nodes[name]
        obs = (site["infer"] or {}).get("obs")
        if isinstance(obs, torch.Tensor) and value.numel() != obs.numel():
            raise FantasyError(
                f"The fantasy of observed site '{name}' has shape {tuple(value.shape)} but its "
                f"observation has shape {tuple(obs.shape)}: the distribution at '{name}' relies "
                "on broadcasting against the data. Give it the observation's full shape (for "
                "example with .expand(...) or .to_event(...)) so that it can generate data."
            )
        slot = _find_argument(obs, args, kwargs)
        if slot is not None:
            where, key = slot
            target = args[key] if where == "args" else kwargs[key]
            fantasy = value.reshape(target.shape).to(dtype=target.dtype)
        elif (view := _find_view(obs, args, kwargs)) is not None:
            # obs=data[i] in a loop: the fantasy goes where the observation was, in an array
            # shaped like data that is zero wherever no fantasy was written.
            where, key = view
            assert isinstance(obs, torch.Tensor)  # _find_view matches tensors only
            target = args[key] if where == "args" else kwargs[key]
            current = new_args[key] if where == "args" else new_kwargs[key]
            fantasy = current if current is not target else torch.zeros_like(target)
            offset = obs.storage_offset() - target.storage_offset()
            fantasy.as_strided(obs.shape, obs.stride(), offset).copy_(
                value.reshape(obs.shape).to(target)
            )
            seen = views.setdefault((where, key), ([], torch.zeros(target.shape, dtype=torch.bool)))
            seen[0].append(name)
            seen[1].as_strided(obs.shape, obs.stride(), offset).fill_(True)
            if any(not f.vectorized for f in site["cond_indep_stack"]):
                seen[0].append(None)  # in a sequential plate: the guide replays its iterations
        else:
            indexed = _find_indexed_argument(trace, site, args, kwargs)
            if indexed is None:
                unmatched.append(name)
                continue
            where, key, indices = indexed
            target = args[key] if where == "args" else kwargs[key]
            # Only the subsampled rows are read by the guide (it replays the same indices);
            # the others are zeros, so no real observation reaches it.
            fantasy = torch.zeros_like(target).index_copy_(
                0, indices.to(target.device), value.reshape((-1,) + target.shape[1:]).to(target)
            )
        if where == "args":
            new_args[key] = fantasy
        else:
            new_kwargs[key] = fantasy
    for names, covered in views.values():
        # A view that is not part of a loop over a sequential plate, and leaves part of its
        # argument unobserved (obs=x[..., :2]), would give the guide zeros where it read data.
        if None not in names and not bool(covered.all()):
            unmatched += names
    if not unmatched:
        return tuple(new_args), new_kwargs
    if fantasy_args is not None:
        result = fantasy_args(observations, *args, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise FantasyError(
                "fantasy_args must return a pair (args, kwargs) for the guide, "
                f"got {type(result).__name__}"
            )
        return tuple(result[0]), dict(result[1])
    name = unmatched[0]
    raise FantasyError(
        f"The sleep phase cannot give the guide the fantasy of observed site '{name}': its "
        "obs= value is not one of the model's arguments (nor a contiguous view or reshape of "
        "one), so the guide would read the real data. Fix it one of three ways: pass the data "
        "to the model as an argument and use it (or x.reshape/x.view of it) as obs=; give the "
        "guide an 'observations' keyword, which receives {site name: fantasy value}; or pass "
        "WakeSleep(..., fantasy_args=fn) with fn(observations, *args, **kwargs) returning the "
        "guide's (args, kwargs)."
    )
