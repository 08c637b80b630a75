"""The CUDA path end to end, for machines with a GPU (skipped elsewhere): inductor-compiled phase I with
FlexAttention and the Triton spline, resumed, in several passes, and the preflight of this GPU. Sums reordered by
atomics and by other kernels differ in the last bits, so results are compared with tolerances, not bit for bit."""
import pytest
import torch

from conftest import requiresCuda, runTrainer, tinyFlags
from trainLmAf import Trainer, main, parseArgs

pytestmark = requiresCuda


def cudaFlags(tinyData, results, **overrides):
    flags = dict(device="cuda", nModels=3, staggeredStarts=1, afType="spline;att-spline", afLayerSpecific=0,
                 runName="gpu", nSteps=12, nStepsWarmup=2, nStepsCooldown=4, valEvery=4, plotEvery=4,
                 seqLength=128, contextSize=64, dimEmb=64)
    flags.update(overrides)
    return tinyFlags(tinyData, results, **flags)


def lastLosses(logPath, nSteps):
    return [float(line.split("lossVa ")[1].split()[0]) for line in open(logPath)
            if line.startswith(f"Step {nSteps}/{nSteps}   lossVa")]


def testCompiledPhaseOneResumesToTheSameLosses(tinyData, tmp_path):
    full = runTrainer(cudaFlags(tinyData, tmp_path / "full", saveModelEvery=6))
    assert full.returncode == 0, full.stderr
    log = (tmp_path / "full" / "log-gpu.txt").read_text()
    assert "Peak CUDA memory usage" in log and "TF32" in log
    resumed = runTrainer(["--resumeFrom", str(tmp_path / "full" / "pt-gpu-step0006.pt"),
                          "--dirResults", str(tmp_path / "resumed")])
    assert resumed.returncode == 0, resumed.stderr
    expected = lastLosses(tmp_path / "full" / "log-gpu.txt", 12)
    assert lastLosses(tmp_path / "resumed" / "log-gpu.txt", 12) == pytest.approx(expected, abs=2e-3)


def testSeveralPassesMatchOnePassOnTheGpu(tinyData, tmp_path):
    losses = {}
    for perPass in (3, 1):
        hp, given = parseArgs(cudaFlags(tinyData, tmp_path / str(perPass), staggeredStarts=0, modelsPerPass=perPass,
                                        compileBackend="none"))
        trainer = Trainer(hp, given).setup()
        steps = []
        for _ in range(3):
            steps.append(trainer.trainStep()[1])
            trainer.state.step += 1
        losses[perPass] = torch.stack(steps)
    torch.testing.assert_close(losses[1], losses[3], atol=1e-4, rtol=1e-4)


def testPreflightOfThisGpu(tinyData, tmp_path, capsys):
    assert main(cudaFlags(tinyData, tmp_path, preflight=1)) == 0
    assert "the run will fit and compile" in capsys.readouterr().out
