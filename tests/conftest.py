import shutil

import pyro
import pytest
import torch
from pyro.poutine.messenger import Messenger


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Each test starts with an empty parameter store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def store_snapshot():
    """A deep copy of the parameter store: {name: unconstrained tensor}."""
    store = pyro.get_param_store()
    return {name: store._params[name].detach().clone() for name in store.keys()}


def assert_store_equal(before, after=None):
    after = store_snapshot() if after is None else after
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


class InjectSamples(Messenger):
    """Give each unobserved sample site that has no value yet the next value from a per-site
    queue (``{name: [value, ...]}``): particles and fantasies chosen by a test."""

    def __init__(self, queues):
        super().__init__()
        self.queues = queues

    def _pyro_sample(self, msg):
        queue = self.queues.get(msg["name"])
        if queue and msg["value"] is None and not msg["is_observed"]:
            msg["value"] = queue.pop(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tests on tiny tensors (``pytestmark =
    pytest.mark.usefixtures("one_thread")``); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- runs of the command

#: Options for a tiny run of the command: seconds, not minutes.
QUIET = ["--eval-samples", "4", "--final-samples", "8", "--test-size", "20", "--no-progress"]
TINY = ["--layers", "784,8", "--epochs", "2", "--eval-every", "1", *QUIET]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A finished two-epoch run of the command, copied by the tests that change it."""
    from pyro_wakesleep.cli import main

    folder = tmp_path_factory.mktemp("template") / "run"
    assert main(["train", "--output", str(folder), *TINY]) == 0
    return folder


def copy_run(template, tmp_path, name="run"):
    folder = tmp_path / name
    shutil.copytree(template, folder)
    return folder
