"""Training on PyTorch's distributed engine, on CPU with gloo: DistributedDataParallel processes train as one
process with the same global batch, a rank that dies fails the run, and a run resumes on another number of
processes; scripts/train.py runs under torchrun."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, CrashingVolumes, free_port, tiny_trainable as trainable
from lib.model import build_sam3d
from lib.training.fit import fit
from lib.transforms.presets import PRESETS

pytestmark = pytest.mark.slow

STEPS, BATCH, SEED = 6, 2, 11
RATE = 4e-4  # the rate the tolerances below were measured at
# Measured (CPU, one thread per process): two processes against one with the same global batch of 2, over 6 steps
# of the tiny configuration, give the same losses and tensors bit for bit; the tolerances leave room for other
# kernels' summation orders (GPUs). Another global batch's first loss differs by about 4e-2, its weights after 6
# steps move by about 1.4e-3.
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-4


def train_rank(rank, world, port, volumes, folder, state_path, dying_rank, limit):
    """One process of a DDP run (spawned by the tests below): its losses and trained tensors go to ``folder``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = CrashingVolumes(volumes, limit if rank == dying_rank else 10**9)
        model = trainable()
        losses, resumed_at = fit(model, data, STEPS, PRESETS["kits"], RATE, seed=SEED, state_path=state_path,
                                 save_every=3, batch_size=BATCH)
        torch.save({"losses": losses, "resumed_at": resumed_at, "weights": model.state_dict()},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(volumes, folder, state_path=None, dying_rank=-1, limit=0):
    torch.multiprocessing.spawn(
        train_rank, args=(2, free_port(), volumes, str(folder), state_path, dying_rank, limit), nprocs=2
    )
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


def one_process(volumes, state_path=None):
    torch.set_num_threads(1)  # as each spawned process: the same kernels, so the same sums
    try:
        model = trainable()
        losses, resumed_at = fit(model, volumes, STEPS, PRESETS["kits"], RATE, seed=SEED, state_path=state_path,
                                 save_every=3, batch_size=BATCH)
    finally:
        torch.set_num_threads(os.cpu_count())
    return losses, resumed_at, model.state_dict()


def largest_difference(first, second):
    return max(float((first[name] - second[name]).abs().max()) for name in first)


def test_two_ddp_processes_train_as_one_process_with_the_same_global_batch(training_studies, tmp_path):
    ranks = spawn(training_studies[:4], tmp_path)
    losses, _, weights = one_process(training_studies[:4])

    assert largest_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0  # DDP keeps the replicas equal
    assert ranks[0]["losses"] == ranks[1]["losses"]  # each logs the global batch's mean
    assert np.abs(np.subtract(ranks[0]["losses"], losses)).max() < LOSS_TOLERANCE, (ranks[0]["losses"], losses)
    assert largest_difference(ranks[0]["weights"], weights) < WEIGHT_TOLERANCE
    assert largest_difference(weights, trainable().state_dict()) > 10 * WEIGHT_TOLERANCE  # and they trained
    # Another global batch draws other crops: the tolerance tells the right run from a wrong one.
    other = fit(trainable(), training_studies[:4], 2, PRESETS["kits"], RATE, seed=SEED, batch_size=1)[0]
    assert abs(other[0] - losses[0]) > 100 * LOSS_TOLERANCE


def test_a_rank_that_dies_fails_the_run_and_the_run_resumes_on_one_process(training_studies, tmp_path):
    state = str(tmp_path / "state.pt")
    # Rank 1 dies reading its crop of step 5 (each step reads once per crop unless a crop misses the lesion):
    # the run fails with the error of rank 1, or of rank 0 that lost it ("a remote worker crashing"), whichever
    # torch.multiprocessing saw first.
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="the disk went away|remote worker crash"):
        spawn(training_studies[:4], tmp_path, state_path=state, dying_rank=1, limit=4)
    saved = torch.load(state, weights_only=True)
    assert len(saved["losses"]) == 3 and saved["run"]["batch"] == BATCH

    losses, resumed_at, weights = one_process(training_studies[:4], state_path=state)
    unbroken, _, unbroken_weights = one_process(training_studies[:4])
    assert resumed_at == 3
    assert np.abs(np.subtract(losses, unbroken)).max() < LOSS_TOLERANCE
    assert largest_difference(weights, unbroken_weights) < WEIGHT_TOLERANCE


def torchrun(*args, nodes=2):
    return [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc-per-node={nodes}",
            os.path.join(ROOT, "scripts", "train.py"), *args]


def test_train_script_under_torchrun_publishes_once_and_a_killed_rank_fails_it(demo_studies, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sam3d.pt"
    common = [str(demo_studies), "--backbone", "tiny", "--preset", "ct", "--batch-size", "2", "--out", str(out)]
    done = subprocess.run(torchrun(*common, "--steps", "3"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert build_sam3d(checkpoint=str(out)).weights_info["meta"]["processes"] == 2
    assert not os.path.exists(f"{out}.state")

    # A long run: once it has saved its state, one rank is killed; torchrun stops the other and fails.
    os.remove(out)
    run = subprocess.Popen(torchrun(*common, "--steps", "1000", "--save-every", "2"), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not os.path.exists(f"{out}.state"):
            assert run.poll() is None and time.time() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.5)
        workers = [p for p in psutil.Process(run.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[1].send_signal(signal.SIGKILL)
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    assert "ChildFailedError" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    assert not os.path.exists(out)  # nothing published
    saved = len(torch.load(f"{out}.state", weights_only=True)["losses"])

    # The same run on one process (the same global batch) goes on from the saved step; stopped once it says so.
    resumed = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *common, "--steps", "1000",
                                "--save-every", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in resumed.stdout:
            lines.append(line)
            if "sam3d training" in line or "resuming" in line:
                break
    finally:
        resumed.kill()
        resumed.wait()
    assert f"at step {saved}/1000" in "".join(lines), "".join(lines)[-3000:]


def test_a_batch_the_processes_cannot_share_is_refused():
    from lib.training.fit import batch_share

    assert batch_share(None, 2) == batch_share(0, 2) == (2, 1)  # one crop per process
    assert batch_share(4, 2) == (4, 2)
    for batch, world in ((3, 2), (-2, 1), (-2, 2)):
        with pytest.raises(ValueError, match="cannot be shared evenly"):
            batch_share(batch, world)
