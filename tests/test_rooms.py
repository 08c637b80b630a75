"""Each room of a run on its own, built from only what it uses (no Trainer, no token shards): the file names, the
run state, when outputs are due, the written lines and rows, a checkpoint round trip, the stop decisions, the passes
and the gradients."""
import csv
import math
import os
import signal

import numpy as np
import pytest
import torch

from lmafs.run import flagChecks
from lmafs.run import runPlan
from lmafs.run import runSetup
from lmafs.run import stopping
from lmafs.run.checkpoints import CHECKPOINT_FORMAT, Checkpointer
from lmafs.run.distributed import Distributed
from lmafs.run.forwardPasses import Passes, fallbackProblemHere
from lmafs.run.gradients import averageGradients, clipGlobalNorm
from lmafs.run.runFiles import RunFiles
from lmafs.run.runOutputs import Outputs, afTiles
from lmafs.run.runState import RunState
from lmafs.network.stackedAdam import StackedAdam
from trainLmAf import Hyperparameters

CPU = torch.device("cpu")


def tinyHp(tmp_path, **overrides):
    values = dict(runName="r", dirResults=str(tmp_path), nLayers=2, nHeads=2, dimEmb=16, seqLength=16,
                  contextSize=8, nSteps=8, nStepsWarmup=2, nStepsCooldown=3, plotEvery=4, valEvery=4, nTokensVa=64,
                  plottingLevel=0, device="cpu", afType="spline;att-spline", afLayerSpecific=0, afNAnchors=9,
                  afRange=4, nModels=2, staggeredStarts=0, filesTokensTr="unused")
    values.update(overrides)
    return flagChecks.checkFlags(Hyperparameters(**values))[0]


# ----------------------------------------------------------------------------------------------
# The run's files and state


def testRunFilesNameEveryOutput(tmp_path):
    files = RunFiles(str(tmp_path), "run-a")
    assert files.log == str(tmp_path / "log-run-a.txt") and files.metrics == str(tmp_path / "metrics-run-a.csv")
    assert files.checkpoint(5) == str(tmp_path / "pt-run-a-step0005.pt")
    assert files.afStem(12345) == str(tmp_path / "ptAf-run-a-step12345") and files.afFile(7).endswith("step0007.pt")
    assert files.plot("tr", 9, "-lossVa3.2100") == str(tmp_path / "tr-run-a-step000009-lossVa3.2100.png")
    for name in ("tr-run-a-step000001.png", "tr-run-a-step000005-lossVa3.1.png", "af-run-a-step000005.png",
                 "tr-run-ab-step000001.png", "act-run-a-step000001.png"):
        (tmp_path / name).write_text("")
    older = files.olderPlots({"tr", "af"}, {files.plot("af", 5), str(tmp_path / "tr-run-a-step000005-lossVa3.1.png")})
    assert older == [str(tmp_path / "tr-run-a-step000001.png")]  # not another run's, not another kind's


def testRunStateCountsStepsAndTimeAndRoundTrips():
    state = RunState(3, CPU)
    state.recordStep(2, torch.tensor([1.0, 2.0], device="cpu"), torch.tensor([0.5, 0.25], device="cpu"))
    state.addTrainingTime(1.5)
    state.recordStep(3, torch.tensor([3.0, 4.0, 5.0], device="cpu"), torch.tensor([0.5, 0.5, 1.0], device="cpu"))
    state.addTrainingTime(0.5)
    assert state.step == 2 and state.trainSeconds == 2.0 and state.secondsPerStep() == 1.0
    assert state.window["loss"].tolist() == [4.0, 6.0, 5.0] and state.window["count"].tolist() == [2.0, 2.0, 1.0]
    state.history["val"].append((2, 3.5, 0.1))
    saved = state.state_dict()
    restored = RunState(2, CPU)
    restored.load_state_dict(saved, models=slice(1, 3))  # a process holding models 1 and 2
    assert (restored.step, restored.trainSeconds, restored.history) == (2, 2.0, {**saved["history"]})
    assert restored.window["loss"].tolist() == [6.0, 5.0] and restored.window["steps"] == 2
    state.resetWindow()
    assert state.window["loss"].tolist() == [0.0, 0.0, 0.0] and state.secondsPerStep() == 0.0 and state.step == 2


# ----------------------------------------------------------------------------------------------
# When things are due (runPlan.py)


def testReportsAndOutputsAreDueAsInTheOriginal():
    def due(predicate):
        return [step for step in range(1, 14) if predicate(step)]

    assert due(lambda s: runPlan.reportDue(s, 13, 4)) == [1, 5, 6, 9, 13]
    assert due(lambda s: runPlan.validationDue(s, 13, 6)) == [1, 7, 13]
    assert due(lambda s: runPlan.validationDue(s, 13, 0)) == [13]
    assert due(lambda s: runPlan.validationDue(s, 13, -1)) == []
    assert due(lambda s: runPlan.peakMemoryDue(s, 13)) == [6, 11, 13]
    assert due(lambda s: runPlan.plotDue(s, 13, 4)) == [1, 5, 9, 13]
    assert due(lambda s: runPlan.everyDue(5, s, 13)) == [5, 10, 13]
    assert due(lambda s: runPlan.everyDue(0, s, 13)) == [13] and due(lambda s: runPlan.everyDue(-1, s, 13)) == []


def testLearningRateAndTokensSeenPerModel(tmp_path):
    hp = tinyHp(tmp_path, nModels=4, staggeredStarts=2, lr=0.01, nSteps=8, nStepsWarmup=2, batchSize=3)
    starts = runPlan.modelStartSteps(hp)
    assert starts == [0, 2, 4, 6]
    assert runPlan.learningRate(hp, 0, 0, starts) == pytest.approx(0.005)  # warmup step 1 of 2
    assert runPlan.learningRate(hp, 2, 4, starts) == pytest.approx(0.005)  # model 2's own first step
    assert [runPlan.tokensSeen(hp, m, 5, starts) for m in range(4)] == [5 * 48, 3 * 48, 1 * 48, 0]
    assert runPlan.tokensSeen(hp, 0, 5, starts, processesSharingData=2) == 10 * 48
    assert [runPlan.localActiveModels(n, False, 2, 4) for n in (1, 3, 4)] == [0, 1, 2]
    assert runPlan.localActiveModels(0, True, 0, 1) == 1


# ----------------------------------------------------------------------------------------------
# Outputs: the numbers given, written in the original's formats


def readLog(hp):
    with open(RunFiles(hp.dirResults, hp.runName).log) as f:
        return f.read().splitlines()


def testOutputsWriteTheReportLinesAndRowsTheyAreGiven(tmp_path):
    hp = tinyHp(tmp_path, plottingLevel=2)
    outputs = Outputs(hp, RunFiles(hp.dirResults, hp.runName), isMain=True, resumeStep=0)
    outputs.trainingReport(5, [3.25, 4.5], [0.125, 0.25], [True, True], 12.4, 0.5, [1e-3, 2e-3], [80, 64])
    outputs.validationReport(5, 3.5, 0.1, 1.25, 1e-3, 12.4, 80)
    stats = {"mean": [0.5, 1.25], "max": [2.0, 3.0], "outside": [0.0, 0.02]}
    outputs.afInputReport(5, stats, ["MLP 0", "att 0"], 4.0)
    outputs.afInputReport(6, stats, ["MLP 0", "att 0"], 4.0)  # the same sites: no second warning
    outputs.peakMemory(6, 1.5 * 2**30)
    outputs.savedAfs("a.pt", "a.csv")
    outputs.stopped(6, "pt-r-step0006.pt")
    outputs.close()
    assert readLog(hp) == [
        "Step 5/8   lossTr 3.2500   accTr 12.5   12s = 0.50s/step",
        "Step 5/8   model 1   lossTr 4.5000   accTr 25.0",
        "Step 5/8   lossVa 3.5000   accVa 10.0",
        "Step 5/8   bpbVa 1.2500",
        "Step 5/8   Activation magnitudes (2): 0.50 1.25",
        "Step 5/8   Activation magnitudes (3): 2.00 3.00",
        "Step 5/8   AF inputs out of range: 0.00% 2.00%",
        "Step 5/8   Warning: more than 1% of the AF inputs lie outside [-4, 4] at att 0 (2.0%); a spline is "
        "constant there: consider a larger --afRange",
        "Step 6/8   Activation magnitudes (2): 0.50 1.25",
        "Step 6/8   Activation magnitudes (3): 2.00 3.00",
        "Step 6/8   AF inputs out of range: 0.00% 2.00%",
        "Step 6/8   Peak CUDA memory usage: 1.500 GB",
        "Saving AF: a.pt", "Saving AF (CSV): a.csv",
        "Stopped at step 6/8; checkpoint pt-r-step0006.pt",
        "Resume with: python trainLmAf.py --resumeFrom pt-r-step0006.pt"]
    with open(tmp_path / "metrics-r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["model"], r["split"], r["loss"], r["lr"], r["tokens"], r["bpb"]) for r in rows] == [
        ("5", "0", "train", "3.250000", "0.001", "80", ""), ("5", "1", "train", "4.500000", "0.002", "64", ""),
        ("5", "0", "val", "3.500000", "0.001", "80", "1.250000")]


def testOutputsOfAResumedRunAndOfOtherProcesses(tmp_path):
    hp = tinyHp(tmp_path, resumeFrom="pt-r-step0004.pt")
    files = RunFiles(hp.dirResults, hp.runName)
    Outputs(hp, files, isMain=True, resumeStep=4).close()
    assert readLog(hp) == ["==== resuming from pt-r-step0004.pt at step 4"]
    elsewhere = tinyHp(tmp_path / "rank1")
    other = Outputs(elsewhere, RunFiles(elsewhere.dirResults, "r"), isMain=False, resumeStep=0)
    other.trainingReport(1, [3.0], [0.5], [True], 1.0, 1.0, [1e-3], [16])
    other.close()
    assert not os.path.exists(tmp_path / "rank1")


def testPlotsAreDrawnFromTheGivenHistoryAndReplaceOlderOnes(tmp_path):
    hp = tinyHp(tmp_path, plottingLevel=2)
    files = RunFiles(hp.dirResults, hp.runName)
    model = runSetup.buildModel(hp, 128, "cpu")
    history = {"train": [(1, 0, 5.0, 0.1), (5, 0, 4.0, 0.2)], "val": [(1, 5.1, 0.1), (5, 4.25, 0.2)],
               "actMean": [(5, [0.5, 0.6, 0.7, 0.8])], "actMax": [(5, [1.0, 1.1, 1.2, 1.3])]}
    outputs = Outputs(hp, files, isMain=True, resumeStep=0)
    tiles = afTiles(model, {}, None, 4.0, 5)
    assert [tile["name"] for tile in tiles] == ["MLP (all layers)", "att (all layers)"]
    outputs.plots(1, history, tiles, model.afSiteNames())
    outputs.plots(5, history, tiles, model.afSiteNames(), announce=True)
    outputs.close()
    pngs = sorted(name for name in os.listdir(tmp_path) if name.endswith(".png"))
    assert pngs == ["act-r-step000005.png", "af-r-step000005.png", "tr-r-step000005-lossVa4.2500.png"]
    assert readLog(hp)[-3:] == [f"Saving plot ({label}): {tmp_path / name}" for label, name in
                                (("loss/acc", pngs[2]), ("AF", pngs[1]), ("act", pngs[0]))]


# ----------------------------------------------------------------------------------------------
# Checkpointer: a round trip from a tiny model


class CountingStream:
    def __init__(self, position):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def checkpointerOf(hp, seed, streams):
    torch.manual_seed(seed)
    model = runSetup.buildModel(hp, 128, "cpu")
    optimizer = StackedAdam(list(model.weightParameters()), hp.nModels, betas=(hp.adamB1, hp.adamB2))
    afOptimizer = torch.optim.Adam(model.afParameters(), lr=hp.afLr)
    state = RunState(hp.nModels, CPU)
    checkpointer = Checkpointer(hp, RunFiles(hp.dirResults, hp.runName), model, optimizer, afOptimizer, streams,
                                state, Distributed(), False, (0, hp.nModels), 128, None, CPU)
    return checkpointer


def testACheckpointRestoresWeightsOptimizersStreamsAndRunState(tmp_path):
    hp = tinyHp(tmp_path)
    saving = checkpointerOf(hp, 0, [CountingStream(3), CountingStream(5)])
    tokens = torch.randint(0, 128, (2, 1, hp.seqLength + 1), device="cpu")
    losses, _ = saving.model(tokens[..., :-1], tokens[..., 1:])
    losses.sum().backward()
    saving.optimizer.step(2, [1e-3, 1e-3])
    saving.afOptimizer.step()
    saving.state.recordStep(2, losses.detach(), torch.tensor([0.25, 0.5], device="cpu"))
    saving.state.addTrainingTime(2.5)
    saving.state.history["val"].append((1, 4.0, 0.1))
    path = saving.save()
    assert path == str(tmp_path / "pt-r-step0001.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["step"] == 1 and ckpt["vocabSize"] == 128
    assert ckpt["dataPositions"] == [{"position": 3}, {"position": 5}] and ckpt["trainSeconds"] == 2.5
    restoring = checkpointerOf(hp, 1, [CountingStream(0), CountingStream(0)])
    restoring.model.load_state_dict(ckpt["model"])
    restoring.restore(ckpt)
    for (name, a), (_, b) in zip(saving.model.state_dict().items(), restoring.model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for a, b in zip(saving.optimizer.state_dict()["expAvgSq"], restoring.optimizer.state_dict()["expAvgSq"]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert restoring.afOptimizer.state_dict()["state"][0]["step"] == 1
    assert [s.position for s in restoring.streams] == [3, 5]
    assert (restoring.state.step, restoring.state.trainSeconds, restoring.state.history["val"]) == (1, 2.5,
                                                                                                   [(1, 4.0, 0.1)])
    torch.testing.assert_close(restoring.state.window["loss"], losses.detach())


# ----------------------------------------------------------------------------------------------
# Stopping: decisions


def testANonFiniteLossNamesItsStepAndModel():
    assert stopping.nonFiniteLoss(torch.tensor([1.0, 2.0], device="cpu"), 4, firstModel=2) is None
    failure = stopping.nonFiniteLoss(torch.tensor([1.0, math.nan, math.inf], device="cpu"), 4, firstModel=2)
    assert (failure.step, failure.modelIndex) == (5, 3) and "at step 5 in model 3" in str(failure)
    received, failure = stopping.agreeAcrossProcesses(Distributed(), torch.tensor([math.inf], device="cpu"), None, 0, 0)
    assert received is None and (failure.step, failure.modelIndex) == (1, 0)


def testASignalAsksTheLoopToStopAfterItsStep():
    said, state = [], RunState(1, CPU)
    state.step = 3
    signals = stopping.StopSignals(said.append, state)
    before = signal.getsignal(signal.SIGTERM)
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signals.restore()
    assert signals.received == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert said == ["Received SIGTERM: finishing step 4, then saving (send it again to stop at once)"]


def testOutOfMemoryAdviceFromGivenNumbers(tmp_path):
    hp = tinyHp(tmp_path, nModels=4)
    line = stopping.outOfMemoryAdvice(hp, CPU, 128, 4, 4, None)
    assert line.startswith("out of memory in a pass of 4 model(s) (cpu): estimated peak ")
    assert line.endswith("; try --modelsPerPass 2")
    assert stopping.outOfMemoryAdvice(hp, CPU, 128, 4, 1, None).endswith("one model per pass does not fit: try a "
                                                                          "smaller --seqLength or --dtype bfloat16")
    assert stopping.outOfMemoryAdvice(hp, CPU, None, None, None, None) == (
        "out of memory on cpu before training started: the model and its optimizer states do not fit")


# ----------------------------------------------------------------------------------------------
# Passes and gradients, from the model, the hyperparameters and the device


def testPassesValidateAndMeasureTheAfInputs(tmp_path):
    hp = tinyHp(tmp_path)
    torch.manual_seed(0)
    model = runSetup.buildModel(hp, 128, "cpu")
    passes = Passes(model, hp, CPU, 4.0)
    passes.compileBeforeStepOne([("train", 0, 2, 1)], Distributed(), lambda: None)
    assert passes.compiled is model and passes.compiledVariants == []  # eager SDPA: nothing to run first
    sequences = np.random.default_rng(0).integers(0, 128, (3, hp.seqLength + 1))
    loss, accuracy = passes.validation(sequences)
    tokens = torch.from_numpy(sequences)[None]
    with torch.no_grad():
        expected, expectedAccuracy = model(tokens[..., :-1], tokens[..., 1:], firstModel=0)
    assert loss == pytest.approx(float(expected[0]), rel=1e-5) and accuracy == pytest.approx(float(expectedAccuracy[0]))
    stats = passes.afInputStatistics(tokens)
    assert len(stats["outside"]) == len(model.afSiteNames()) and all(0 <= v <= 1 for v in stats["outside"])
    assert fallbackProblemHere(hp, 128, 2, 2, CPU) is None  # off CUDA the fallback has no memory to run out of


def testAfGradientsAreAveragedAndOneNormIsClipped():
    weights = [torch.nn.Parameter(torch.zeros(3, 2, device="cpu"))]
    afs = [torch.nn.Parameter(torch.zeros(4, device="cpu"))]
    weights[0].grad = torch.full((3, 2), 3.0, device="cpu")
    afs[0].grad = torch.full((4,), 6.0, device="cpu")
    averageGradients(afs, weights, 3, 3, Distributed(), False)
    assert afs[0].grad.tolist() == [2.0] * 4 and weights[0].grad.tolist() == [[3.0, 3.0]] * 3
    clipGlobalNorm(weights, afs, 2, 1.0, Distributed(), False, CPU)  # models 0 and 1 take part, model 2 does not
    norm = math.sqrt(4 * 9.0 + 4 * 4.0)
    assert weights[0].grad[:2].flatten().tolist() == pytest.approx([3.0 / (norm + 1e-6)] * 4)
    assert weights[0].grad[2].tolist() == [3.0, 3.0]
    assert afs[0].grad.tolist() == pytest.approx([2.0 / (norm + 1e-6)] * 4)
