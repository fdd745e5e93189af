"""
``BernoulliUnits``: its fast sampler draws the Bernoulli distribution (frequencies against the
probabilities, within their standard errors), in the shapes torch's distributions promise, without
gradients; and the fast support check of binary observations says exactly what Pyro's
``constraints.boolean`` says, for every float (hypothesis, with the awkward values forced in).
"""

import math

import numpy as np
import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.distributions import constraints

from pyro_wakesleep.checks import observed_support
from pyro_wakesleep.models import BernoulliUnits


def test_sample_frequencies_match_the_probabilities():
    """200,000 draws per unit: each frequency's standard error is sqrt(p(1-p)/n) <= 0.0012; a
    deviation over 5 standard errors on any of the 7 units has probability below 4e-6."""
    logits = torch.tensor([-6.0, -2.0, -0.5, 0.0, 0.5, 2.0, 6.0])
    n = 200_000
    torch.manual_seed(0)
    draws = BernoulliUnits(logits).sample(torch.Size([n]))
    p = torch.sigmoid(logits)
    se = (p * (1 - p) / n).sqrt()
    assert torch.all((draws.mean(0) - p).abs() < 5 * se)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}


def test_sample_units_are_independent():
    """Two units with p = 0.5: the frequency of (1, 1) is 1/4 within 5 standard errors
    (sqrt(3/16 / n))."""
    n = 200_000
    torch.manual_seed(1)
    draws = BernoulliUnits(torch.zeros(2)).sample(torch.Size([n]))
    both = (draws[:, 0] * draws[:, 1]).mean()
    assert abs(float(both) - 0.25) < 5 * math.sqrt(3 / 16 / n)


@pytest.mark.parametrize("validate", [True, False])
def test_it_is_bernoulli_to_event_1(validate):
    """The same distribution as Pyro's ``Bernoulli(logits=logits).to_event(1)`` (made without
    torch's broadcast_all): the same shapes, parameters, log-densities and validation; expanded
    to its own batch shape it is itself, to another an expanded copy."""
    logits = torch.randn(3, 4, requires_grad=True)
    value = (torch.rand(3, 4) < 0.5).float()
    with pyro.validation_enabled(validate):
        ours = BernoulliUnits(logits)
        pyros = pyro.distributions.Bernoulli(logits=logits).to_event(1)
        assert type(ours.base_dist) is type(pyros.base_dist)
        assert (ours.batch_shape, ours.event_shape) == (pyros.batch_shape, pyros.event_shape)
        assert ours.base_dist._validate_args == pyros.base_dist._validate_args == validate
        assert torch.equal(ours.base_dist.probs, pyros.base_dist.probs)
        assert torch.allclose(ours.log_prob(value), pyros.log_prob(value))
        if validate:
            with pytest.raises(ValueError, match="logits"):
                BernoulliUnits(torch.tensor([[float("nan")]]))
    assert ours.expand(torch.Size([3])) is ours
    wider = ours.expand(torch.Size([2, 3]))
    assert wider.batch_shape == (2, 3) and torch.equal(wider.base_dist.logits[1], logits)


@pytest.mark.parametrize(
    "logits_shape, batch_shape, sample_shape",
    [((5,), (), ()), ((5,), (3,), (2,)), ((1, 5), (4, 6), ()), ((7, 1, 5), (3, 7, 4), (2,))],
)
def test_sample_shapes_and_expanded_logits(logits_shape, batch_shape, sample_shape):
    """An expanded distribution (a prior broadcast over a batch) samples every row
    independently, in the shape sample_shape + batch_shape + event_shape."""
    logits = torch.randn(logits_shape, requires_grad=True)
    d = BernoulliUnits(logits)
    if batch_shape:
        d = d.expand(torch.Size(batch_shape))
    value = d.sample(torch.Size(sample_shape))
    assert value.shape == torch.Size(sample_shape) + d.batch_shape + d.event_shape
    assert value.dtype == logits.dtype and not value.requires_grad
    if batch_shape:
        flat = value.reshape(-1, value.shape[-1])
        assert len({tuple(row.tolist()) for row in flat}) > 1  # rows are not copies


def test_sample_is_what_pyro_samples_at_a_site():
    def model():
        with pyro.plate("data", 3):
            return pyro.sample("z", BernoulliUnits(torch.zeros(4)))

    trace = pyro.poutine.trace(model).get_trace()
    assert trace.nodes["z"]["value"].shape == (3, 4)


# The values that can fool a check of {0, 1}: near 0 and 1, tiny, huge, special.
_AWKWARD = [
    0.0, -0.0, 1.0, 0.5, -1.0, 2.0,
    float(np.nextafter(np.float32(1), np.float32(2))),
    float(np.nextafter(np.float32(1), np.float32(0))),
    float(np.nextafter(np.float32(0), np.float32(1))),
    1e-30, 1e30, -1e30, float("inf"), float("-inf"), float("nan"),
]  # fmt: skip


def _observed_ok(value: torch.Tensor) -> bool:
    def model():
        with pyro.plate("data", value.shape[0]):
            pyro.sample("x", BernoulliUnits(torch.zeros(value.shape[-1])), obs=value)

    trace = pyro.poutine.trace(model).get_trace()
    (check,) = observed_support(trace)
    return bool(check.ok)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([0.0, 1.0]),
            st.sampled_from(_AWKWARD),
            st.floats(width=32, allow_nan=True, allow_infinity=True),
        ),
        min_size=1,
        max_size=40,  # past a vector register's lanes: the vectorized kernels and their tails
    ),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_support_check_of_binary_data_is_pyros(values, dtype):
    value = torch.tensor(values, dtype=dtype).reshape(1, -1)
    with pyro.validation_enabled(False):  # the check itself, not Pyro's refusal at log_prob
        assert _observed_ok(value) == bool(constraints.boolean.check(value).all())


def test_support_check_refuses_each_awkward_value_alone():
    for bad in _AWKWARD[3:]:
        value = torch.tensor([[0.0, 1.0, bad]])
        with pyro.validation_enabled(False):
            assert _observed_ok(value) is False, bad
        # In a long row too, in the vectorized part of the kernels and in their tail.
        for position in (5, 20, 36):
            value = (torch.arange(37.0) % 3 == 0).float().reshape(1, -1)
            value[0, position] = bad
            with pyro.validation_enabled(False):
                assert _observed_ok(value) is False, (bad, position)
    assert _observed_ok(torch.tensor([[0.0, 1.0, -0.0]])) is True


@pytest.mark.parametrize("used, ok", [(True, False), (False, True)])
def test_support_check_with_a_mask_exempts_masked_points(used, ok):
    """A mask goes through the general check: an out-of-support row counts only when used."""
    value = torch.tensor([[0.0, 1.0, 0.5]])

    def model():
        with pyro.plate("data", 1), pyro.poutine.mask(mask=torch.tensor([used])):
            pyro.sample("x", BernoulliUnits(torch.zeros(3)), obs=value)

    with pyro.validation_enabled(False):
        trace = pyro.poutine.trace(model).get_trace()
    (check,) = observed_support(trace)
    assert bool(check.ok) is ok
