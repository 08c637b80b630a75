"""A run's graphs are all compiled before step 1 (checked with the aot_eager backend on a CPU), and running the
active models in several passes (--modelsPerPass) gives the results of one pass."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import tinyFlags
from lmafs.run.runPlan import modelPasses, representativePasses
from trainLmAf import Trainer, parseArgs


@pytest.mark.parametrize("modelsPerPass, plottingLevel", [(2, 0), (2, 2)])
def testNoCompileAfterStartUpInAStaggeredPhaseOne(tinyData, tmp_path, monkeypatch, modelsPerPass, plottingLevel):
    # plottingLevel >= 1: the AF-input statistics of each report run a graph of their own, compiled before step 1
    torch._dynamo.reset()
    counters.clear()
    hp, given = parseArgs(tinyFlags(tinyData, tmp_path, runName="compiled", nModels=4, afType="spline;att-spline",
                                    afLayerSpecific=0, staggeredStarts=1, nSteps=8, nStepsWarmup=1, nStepsCooldown=2,
                                    valEvery=3, nTokensVa=224, compileBackend="aot_eager", modelsPerPass=modelsPerPass,
                                    plottingLevel=plottingLevel, plotEvery=3))
    trainer = Trainer(hp, given).setup()
    last = [("validation", 0, 1, 7)] + ([("statistics", 0, 1, 7)] if plottingLevel else [])
    assert trainer.passes.compiledVariants[-len(last):] == last
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # a recompile would raise
    assert trainer.train() == 0
    assert counters["stats"]["unique_graphs"] == graphs  # and no new graph either
    if plottingLevel:
        assert "Step 8/8   Activation magnitudes (2):" in (tmp_path / "log-compiled.txt").read_text()
    torch._dynamo.reset()


def testRepresentativePassesCoverEveryKindTwice():
    passes = {(0, 1), (0, 2), (0, 3), (3, 1), (3, 2), (6, 1), (6, 2), (9, 1)}
    assert representativePasses(passes, 10) == [(0, 1), (0, 2), (3, 1), (3, 2), (6, 1), (6, 2), (9, 1)]
    assert representativePasses({(0, n) for n in range(1, 21)}, 20) == [(0, 1), (0, 2), (0, 20)]


def stepTrainers(tinyData, tmp_path, modelsPerPass, nSteps=3):
    hp, given = parseArgs(tinyFlags(tinyData, tmp_path / str(modelsPerPass), nModels=5, afType="spline;att-spline",
                                    afLayerSpecific=0, staggeredStarts=0, batchSize=2, modelsPerPass=modelsPerPass))
    trainer = Trainer(hp, given).setup()
    losses = []
    for _ in range(nSteps):
        losses.append(trainer.trainStep()[1])
        trainer.state.step += 1
    return trainer, torch.stack(losses)


def testSeveralPassesGiveTheResultsOfOnePass(tinyData, tmp_path):
    one, lossesOne = stepTrainers(tinyData, tmp_path, 0)
    assert modelPasses(5, one.modelsPerPass) == [(0, 5)]
    several, lossesSeveral = stepTrainers(tinyData, tmp_path, 2)
    assert modelPasses(5, several.modelsPerPass) == [(0, 2), (2, 2), (4, 1)]
    torch.testing.assert_close(lossesSeveral, lossesOne, rtol=0, atol=1e-6)
    for (name, a), (_, b) in zip(one.model.named_parameters(), several.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("compileBackend", ["none", "aot_eager"])
def testAFailingFlexAttentionFallsBackToSdpaBeforeStepOne(tinyData, tmp_path, monkeypatch, compileBackend):
    from lmafs.run import runSetup

    torch._dynamo.reset()
    arguments = runSetup.modelArguments
    # FlexAttention on a CPU has no backward: it fails in the first backward, as a GPU without the shared
    # memory the kernel needs would fail at its first launch
    monkeypatch.setattr(runSetup, "modelArguments", lambda *a, **k: {**arguments(*a, **k), "attention": "flex"})
    hp, given = parseArgs(tinyFlags(tinyData, tmp_path, runName="fallback", nSteps=3, nStepsWarmup=1,
                                    nStepsCooldown=1, compileBackend=compileBackend))
    trainer = Trainer(hp, given).setup()
    assert trainer.model.kernel.implementation == "sdpa"
    assert all(p.grad is None for p in trainer.model.parameters())  # the failed pass left nothing behind
    assert trainer.train() == 0
    log = (tmp_path / "log-fallback.txt").read_text()
    assert "FlexAttention failed on this GPU (NotImplementedError: FlexAttention does not support backward" in log
    assert "continuing with SDPA and the same mask" in log and "Step 3/3   lossTr" in log
    torch._dynamo.reset()
