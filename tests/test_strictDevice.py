"""Strict-device runs: the trainer is built on the CPU, then the default device becomes 'meta' and it trains. A
tensor made at run time without naming its device is then a meta tensor, and meeting a model tensor raises, as a
CPU tensor meeting CUDA ones does on a GPU (the crash at the first report of every default CUDA run). Together the
runs cover reports at plottingLevel 3, validation, AF-input statistics and histograms, staggered phase I in several
passes, the smoothness prior, every score type, gradient clipping, checkpoints and resume, AF files, phase II,
bfloat16 autocast, a run without validation, and plots."""
import pytest
import torch

from conftest import tinyFlags
from trainLmAf import Trainer, parseArgs


def torchOptimizersNameTheirDevices():
    """Whether torch.optim.Adam makes its state with explicit devices; before torch 2.13 its step counter is a
    deviceless torch.tensor(0.0), which is a CPU tensor by design on a GPU but a meta tensor here."""
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.ones(2)
    optimizer = torch.optim.Adam([weight])
    torch.set_default_device("meta")
    try:
        optimizer.step()
        return True
    except RuntimeError:
        return False
    finally:
        torch.set_default_device(None)


pytestmark = pytest.mark.skipif(not torchOptimizersNameTheirDevices(), reason="this torch's own Adam makes a tensor "
                                "without a device, so a strict-device run would test torch, not LM-AFs")


def strictRun(argv):
    """Set up on the CPU, then train with 'meta' as the default device; returns the trainer."""
    hp, given = parseArgs(argv)
    trainer = Trainer(hp, given).setup()
    torch.set_default_device("meta")
    try:
        code = trainer.train()
    finally:
        torch.set_default_device(None)
    assert code == 0
    return trainer


def phaseOneFlags(tinyData, results, score, **overrides):
    flags = dict(nModels=3, staggeredStarts=1, modelsPerPass=2, afType=f"spline;att-spline;score-{score}",
                 afLayerSpecific=0, plottingLevel=3, afSmoothness=0.001, gradientClipping=1.0, saveModelEvery=4,
                 runName="strict", valEvery=2, plotEvery=2)
    flags.update(overrides)
    return tinyFlags(tinyData, results, **flags)


@pytest.mark.parametrize("score", ["softmax", "softplus", "sigmoid", "spline"])
def testPhaseOneResumeAndPhaseTwoOnAStrictDevice(tinyData, tmp_path, score):
    strictRun(phaseOneFlags(tinyData, tmp_path / "one", score))
    names = {p.name for p in (tmp_path / "one").iterdir()}
    assert {"pt-strict-step0004.pt", "pt-strict-step0008.pt", "ptAf-strict-step0008.pt", "ptAf-strict-step0008.csv",
            "af-strict-step000008.png", "act-strict-step000008.png", "metrics-strict.csv"} <= names
    log = (tmp_path / "one" / "log-strict.txt").read_text()
    for line in ("Step 8/8   lossVa", "Step 8/8   Activation magnitudes (3):", "Step 8/8   AF inputs out of range:",
                 "AF smoothness S", "|embed| mean"):
        assert line in log

    strictRun(["--resumeFrom", str(tmp_path / "one" / "pt-strict-step0004.pt"), "--dirResults",
               str(tmp_path / "resumed")])
    resumed = (tmp_path / "resumed" / "log-strict.txt").read_text()
    final = [line for line in log.splitlines() if line.startswith("Step 8/8   lossVa")]
    assert final == [line for line in resumed.splitlines() if line.startswith("Step 8/8   lossVa")]

    strictRun(tinyFlags(tinyData, tmp_path / "two", afType=f"spline;att-spline;score-{score}", afLayerSpecific=0,
                        afLr=0, runName="phase2", plottingLevel=2, afFileToLoad=str(tmp_path / "one" /
                                                                                   "ptAf-strict-step0008.pt")))
    assert "Step 8/8   lossVa" in (tmp_path / "two" / "log-phase2.txt").read_text()


def testBfloat16WithoutValidationOnAStrictDevice(tinyData, tmp_path):
    # without validation files the AF-input statistics read a training sequence
    strictRun(tinyFlags(tinyData, tmp_path, runName="bf16", dtype="bfloat16", filesTokensVa="", plottingLevel=2,
                        afType="splinePerDim;att-relu2", nModels=2, staggeredStarts=0, batchSize=2))
    log = (tmp_path / "log-bf16.txt").read_text()
    assert "Step 8/8   Activation magnitudes (2):" in log and "lossVa" not in log
