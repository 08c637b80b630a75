"""torchrun with 2 CPU processes (gloo): phase I split across processes, and data parallelism, must match
one process on the same models and data."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, runTrainer, tinyFlags

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def torchrun(argv):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(REPO, "trainLmAf.py")] + argv
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)


def lastLines(path, nSteps):
    return [line for line in open(path) if line.startswith(f"Step {nSteps}/{nSteps} ") and "lossVa" in line]


@pytest.mark.parametrize("mode", ["phase1", "dataParallel"])
def testTwoProcessesMatchOne(tinyData, tmp_path, mode):
    common = dict(seed=1234, afType="spline;att-spline", afLr=0.1, lr=0.01, runName="d", nSteps=8, nStepsWarmup=2,
                  nStepsCooldown=3, saveModelEvery=0)
    if mode == "phase1":
        one = dict(common, nModels=4, staggeredStarts=1, afLayerSpecific=0)
        two = one
    else:  # two processes of one sequence each = one process accumulating two sequences
        one = dict(common, nModels=1, batchSize=2)
        two = dict(common, nModels=1, batchSize=1)
    single = runTrainer(tinyFlags(tinyData, tmp_path / "one", **one))
    assert single.returncode == 0, single.stderr
    double = torchrun(tinyFlags(tinyData, tmp_path / "two", **two))
    assert double.returncode == 0, double.stderr[-3000:]
    assert lastLines(tmp_path / "two" / "log-d.txt", 8) == lastLines(tmp_path / "one" / "log-d.txt", 8)
    a = torch.load(tmp_path / "one" / "pt-d-step0008.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "pt-d-step0008.pt", weights_only=True)
    for name, tensor in a["model"].items():
        # Adam turns the float32 rounding of near-zero gradients (AF sums reduced in another order) into ~1e-5
        torch.testing.assert_close(b["model"][name], tensor, atol=1e-4, rtol=1e-4, msg=name)
    assert a["dataPositions"] == b["dataPositions"]
    torch.testing.assert_close(a["optimizer"]["stepCounts"], b["optimizer"]["stepCounts"])
    assert not any(name.startswith("log-") for name in os.listdir(tmp_path / "two") if name != "log-d.txt")
