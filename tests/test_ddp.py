"""Two gloo DDP processes equal one process at the same global batch; every rank holds the same queue."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY

pytestmark = pytest.mark.slow  # every test here starts two torchrun processes


def run(out, nproc, bn, tmp_path):
    args = ["-m", "hnmix", "pretrain", "--data", "demo", "--output", str(out), *TINY, "--epochs", "1",
            "--max-steps", "5", "--bn", bn]
    prefix = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  f"--nproc_per_node={nproc}", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(prefix + args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.load(out / "last.pt", weights_only=True)["model"]


def test_two_process_shuffle_bn_equals_one_process_split_bn(tmp_path):
    # DDP shuffle BN normalises each rank's slice; split:2 normalises the same slices on one process
    single = run(tmp_path / "single", 1, "split:2", tmp_path)
    ddp = run(tmp_path / "ddp", 2, "shuffle", tmp_path)
    for key, value in single.items():
        if "running_" in key or "num_batches" in key:
            continue  # rank 0 saves its own BN statistics; split BN averages the sub-batches'
        torch.testing.assert_close(ddp[key].float(), value.float(), atol=2e-5, rtol=1e-4, msg=key)
    assert int(ddp["queue_ptr"]) == int(single["queue_ptr"]) == (5 * 8) % 32


def test_every_rank_holds_the_same_queue(tmp_path):
    # each rank checkpoints to its own directory via a rank-suffixed output is not supported, so compare
    # through the model: rank 1's queue is asserted equal to rank 0's inside a tiny torchrun script
    script = tmp_path / "check.py"
    script.write_text(
        "import torch, torch.distributed as dist, sys\n"
        "from hnmix.config import PretrainConfig\n"
        "from hnmix.core import dist as distributed\n"
        "from hnmix.train.loop import train\n"
        f"cfg = PretrainConfig(data='demo', arch='test_resnet', image_size=16, batch_size=8, queue_size=32, dim=16,"
        f" workers=0, epochs=1, max_steps=3, output=r'{tmp_path / 'q'}')\n"
        "info = distributed.setup('cpu')\n"
        "t = train(cfg, info)\n"
        "qs = [torch.empty_like(t.model.queue) for _ in range(2)]\n"
        "dist.all_gather(qs, t.model.queue)\n"
        "assert torch.equal(qs[0], qs[1]), 'queues differ across ranks'\n"
        "print('QUEUES-EQUAL')\n"
        "del t, qs\n"  # drop the DDP reducer, which holds the process group, before destroying the group
        "distributed.teardown()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "QUEUES-EQUAL" in done.stdout, done.stdout + done.stderr
