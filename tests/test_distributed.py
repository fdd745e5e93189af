"""
Data-parallel training over torch.distributed with two processes on this machine (gloo):
WakeSleep(distributed=True) and DistributedDataParallel around WakeSleepModule, run through
examples/distributed.py.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed as dist

from pyro_wakesleep import NonFiniteLossError, WakeSleep

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed.py"


def _example():
    spec = importlib.util.spec_from_file_location("distributed_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spawn(tmp_path, *options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    dump = tmp_path / "params"
    command = [sys.executable, str(EXAMPLE), "--spawn", "2", "--dump", str(dump), *options]
    subprocess.run(command, check=True, timeout=300, cwd=tmp_path)
    return [torch.load(f"{dump}.rank{r}", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("engine", ["wakesleep", "ddp"])
def test_two_processes_on_two_halves_take_the_one_process_step(tmp_path, engine):
    """One SGD step (lr 1, so the update is minus the gradient) of 2 processes on the two
    halves of a batch equals the step of one process on the whole batch computed with the
    same per-process random draws: the mean of the two shards' gradients, each shard's loss
    scaled by the number of processes. Both processes end with identical parameters."""
    options = ["--engine", engine, "--steps", "1", "--optimizer", "sgd", "--lr", "1.0"]
    options += ["--layers", "784,20", "--batch-size", "16", "--num-particles", "3"]
    ranks = _spawn(tmp_path, *options)
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name

    example = _example()
    args = example.parse(options)
    x = example.batches(args, 0)
    grads = []
    for rank in range(2):
        pyro.clear_param_store()
        net, model, guide = example.build(args, world=2)
        initial = {n: p.detach().clone() for n, p in net.named_parameters()}
        torch.manual_seed(args.seed + 1 + rank)
        ws = WakeSleep(
            model, guide, None, num_particles=3, phi_objective="wake", max_plate_nesting=1
        )
        ws.differentiable_loss(example.shard(x, rank, 2)).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for name, value in initial.items():
        expected = value - (grads[0][name] + grads[1][name]) / 2
        # float32 sums in another order: agreement to a few ulps of the update's scale
        scale = expected.abs().max().item() + 1.0
        assert torch.allclose(ranks[0][name], expected, rtol=0, atol=1e-5 * scale), name


def test_ranks_stay_identical_over_many_adam_steps(tmp_path):
    options = ["--steps", "15", "--layers", "784,30", "--batch-size", "20"]
    ranks = _spawn(tmp_path / "eager", *options)
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # Recorded and replayed steps (jit) train exactly as the eager ones, on every rank.
    replayed = _spawn(tmp_path / "jit", *options, "--jit")
    for rank in (0, 1):
        for name in ranks[rank]:
            assert torch.equal(ranks[rank][name], replayed[rank][name]), (rank, name)


# ---------------------------------------------------------------- a failure on one process


def _failing_worker(rank, world, port, out):
    import pyro.distributions as pdist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)

        def model(x):
            loc = pyro.param("loc", torch.randn(3))
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", pdist.Normal(0.0, 1.0))
                pyro.sample("x", pdist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)

        def guide(x):
            w = pyro.param("w", torch.randn(3))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", pdist.Normal(x @ w, 1.0))

        torch.manual_seed(10 + rank)  # different init per rank: the first step broadcasts
        ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.1}), distributed=True)
        x = torch.randn(4, 3)
        for _ in range(3):
            ws.step(x)
        before = {n: pyro.param(n).detach().clone() for n in ("loc", "w")}
        bad = x.clone()
        if rank == 1:
            bad[0, 0] = float("nan")
        try:
            ws.step(bad)
            raised = None
        except NonFiniteLossError as error:
            raised = str(error)
        unchanged = all(torch.equal(pyro.param(n), before[n]) for n in before)
        ws.step(x)  # the processes are still in step with each other
        torch.save(
            {
                "raised": raised,
                "unchanged": unchanged,
                "params": {n: pyro.param(n).detach().clone() for n in ("loc", "w")},
                "num_steps": ws.num_steps,
            },
            f"{out}.rank{rank}",
        )
    finally:
        _example().shut_down()


def test_a_failure_on_one_process_raises_on_every_process(tmp_path):
    out = tmp_path / "result"
    torch.multiprocessing.spawn(
        _failing_worker, args=(2, _example().free_port(), str(out)), nprocs=2, join=True
    )
    results = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    assert "'x'" in results[1]["raised"]  # the process with the NaN names the site
    assert "another process failed" in results[0]["raised"]
    for result in results:
        assert result["unchanged"]
        assert result["num_steps"] == 4
    for name in ("loc", "w"):
        assert torch.equal(results[0]["params"][name], results[1]["params"][name])


def test_distributed_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        WakeSleep(lambda: None, lambda: None, pyro.optim.Adam({"lr": 0.1}), distributed=True)
