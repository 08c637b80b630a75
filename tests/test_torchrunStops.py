"""Under torchrun every process stops together: a stop signal is never lost, the loop stops only on what all processes
agreed at the same point, and a failure of one process alone (out of memory, FlexAttention's fallback) stops all of
them, each with one line, none left waiting in a collective. Two CPU processes (gloo), the fault injected into one by
tests/faultyProcess.py."""
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from conftest import REPO, runTrainer, tinyFlags
from lmafs.run.distributed import Distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

FAULTY_PROCESS = os.path.join(REPO, "tests", "faultyProcess.py")
SIGTERM_STATUS = 128 + signal.SIGTERM


class SignalledWhileAgreeing(Distributed):
    """One process on the torchrun path, whose agreements (maxInPlace: the all_reduce each process waits in for the
    others) receive SIGTERM while they wait, at the calls numbered in signalAt (1: the first)."""

    def __init__(self, signalAt):
        super().__init__()
        self.enabled, self.signalAt, self.calls = True, signalAt, 0

    def maxInPlace(self, tensor):
        self.calls += 1
        if self.calls in self.signalAt:
            os.kill(os.getpid(), signal.SIGTERM)
        return tensor

    def sumInPlace(self, tensors):
        pass

    def gatherToMain(self, obj):
        return [obj]


@pytest.mark.parametrize("signalAt", [(1, 2), (2, 3)])
def testASignalDuringAnAgreementIsKeptAndASecondOneStillStopsAtOnce(tinyData, tmp_path, monkeypatch, signalAt):
    import trainLmAf
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)  # the second signal's stop at once, recorded instead
    hp, given = trainLmAf.parseArgs(tinyFlags(tinyData, tmp_path, runName="sig", nModels=2, afType="spline"))
    trainer = trainLmAf.Trainer(hp, given).setup()
    trainer.dist = SignalledWhileAgreeing(signalAt)
    assert trainer.train() == SIGTERM_STATUS
    assert exits == [SIGTERM_STATUS]
    saved = [path.name for path in tmp_path.glob("pt-sig-step*.pt")]
    assert len(saved) == 1, saved
    step = int(saved[0][len("pt-sig-step"):-len(".pt")])
    assert step <= 2  # at the agreement after the signal at the latest
    assert f"Stopped at step {step}/8" in (tmp_path / "log-sig.txt").read_text()


@dataclass
class Stopped:
    stdout: str  # torchrun's: rank 0's lines
    stderr: dict  # rank: what that process wrote to stderr
    exits: dict  # rank: trainLmAf.main's return value (absent: the process did not get there)


def torchrunWithFault(fault, faultyRank, step, out, argv, timeout):
    """tests/faultyProcess.py under torchrun with two processes; a run past timeout fails the test, after its
    processes are ended."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", FAULTY_PROCESS,
               fault, str(faultyRank), str(step), str(out)] + argv
    torchrun = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, _ = torchrun.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout = None
    if stdout is None:
        for pidFile in out.glob("pid-*.txt"):  # torchrun starts each process in a session of its own
            try:
                os.kill(int(pidFile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        torchrun.kill()
        torchrun.communicate()
        pytest.fail(f"{fault}: the processes did not all stop within {timeout} s")
    stderr = {rank: out / f"stderr-{rank}.txt" for rank in (0, 1)}
    exits = {rank: out / f"exit-{rank}.txt" for rank in (0, 1)}
    return Stopped(stdout, {rank: path.read_text() for rank, path in stderr.items() if path.exists()},
                   {rank: int(path.read_text()) for rank, path in exits.items() if path.exists()})


def finalValidationLine(path, nSteps):
    return [line for line in open(path) if line.startswith(f"Step {nSteps}/{nSteps}   lossVa")]


@pytest.mark.parametrize("nModels", [4, 2])  # two models per process, and one (each process its own data position)
def testASignalToOneProcessWhileItReportsStopsBothAtTheNextStep(tinyData, tmp_path, nModels):
    flags = dict(seed=1234, nModels=nModels, afType="spline;att-spline", afLayerSpecific=0, lr=0.01, runName="sig",
                 nSteps=12, valEvery=6, plotEvery=1)
    full = runTrainer(tinyFlags(tinyData, tmp_path / "full", **flags), timeout=120)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "run"
    stopped = torchrunWithFault("signalWhileReporting", 0, 4, tmp_path / "interrupted",
                                tinyFlags(tinyData, run, **flags), timeout=50)
    assert stopped.exits == {0: SIGTERM_STATUS, 1: SIGTERM_STATUS}, stopped.stderr
    assert all("Traceback" not in text for text in stopped.stderr.values()), stopped.stderr
    # rank 0 had the signal after step 4's agreement: both processes carry it into step 5's and stop after step 5
    assert [path.name for path in run.glob("pt-sig-step*.pt")] == ["pt-sig-step0005.pt"]
    checkpoint = run / "pt-sig-step0005.pt"
    assert [line for line in stopped.stdout.splitlines() if line.startswith("Stopped at step")] == [
        f"Stopped at step 5/12; checkpoint {checkpoint}"]
    resumed = torchrunWithFault("none", 0, 0, tmp_path / "resumed", ["--resumeFrom", str(checkpoint)], timeout=60)
    assert resumed.exits == {0: 0, 1: 0}, resumed.stderr
    expected = finalValidationLine(tmp_path / "full" / "log-sig.txt", 12)
    assert expected and finalValidationLine(run / "log-sig.txt", 12) == expected


OUT_OF_MEMORY_LINE = "error: out of memory in a pass of 1 model(s) (cpu): estimated peak "
ELSEWHERE_LINE = "error: another process failed (exit status "


@pytest.mark.parametrize("fault, status, failedLine", [
    ("outOfMemoryInForward", 4, OUT_OF_MEMORY_LINE),
    ("outOfMemoryBeforeStepOne", 4, OUT_OF_MEMORY_LINE),
    ("fallbackTooBig", 2, "error: FlexAttention failed on this GPU (RuntimeError: no FlexAttention kernel fits this "
                          "GPU); the SDPA fallback needs an estimated 64.0 GiB per pass")])
def testAFailureOfOneProcessStopsEveryProcessWithOneLine(tinyData, tmp_path, fault, status, failedLine):
    run = tmp_path / "run"
    flags = tinyFlags(tinyData, run, runName="fail", nModels=2, staggeredStarts=0, afType="spline")
    stopped = torchrunWithFault(fault, 1, 3, tmp_path / "faults", flags, timeout=45)
    assert stopped.exits == {0: status, 1: status}, stopped.stderr
    failed, other = stopped.stderr[1], stopped.stderr[0]
    assert failed.count("\n") == 1 and failed.startswith(failedLine), failed
    assert other.count("\n") == 1 and other.startswith(ELSEWHERE_LINE), other
    if fault == "outOfMemoryInForward":  # the weights after step 2 on both processes: one checkpoint, saved by both
        checkpoint = run / "pt-fail-step0002.pt"
        assert [path.name for path in run.glob("pt-fail-step*.pt")] == [checkpoint.name]
        assert all(text.rstrip().endswith(f"resume from {checkpoint} with --resumeFrom") for text in (failed, other))
    else:
        assert not list(run.glob("pt-fail-*"))
