"""The CUDA paths a review found wrong (issue 27), proven on a CPU by construction: a benchmark builds the kernel a
training run builds, the step clock waits for the device, a resume on fewer GPUs, the out-of-memory advice measured
after the failed pass is gone, the refused compile backend and FlexAttention's fallback."""
import os
import sys
import types
import weakref
from unittest import mock

import pytest
import torch

from conftest import REPO, tinyFlags
from test_attention import gpuProperties

sys.path.insert(0, os.path.join(REPO, "bench"))


def testBenchScoresBuildsTheCompiledKernelATrainingRunBuildsOnCuda(monkeypatch):
    import benchScores
    from torch.nn.attention.flex_attention import flex_attention
    from model import GPT
    capability, sharedMemory = (9, 0), 227 * 1024  # an H100
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpuProperties(capability,
                                                                                               sharedMemory))
    kernels = benchScores.buildKernels(torch.device("cuda"), 1024, 64)
    model = GPT(vocabSize=64, nLayers=1, nHeads=2, dimEmb=128, contextSize=1024, tokenDocSep=0, attention="flex",
                flexBlockSize=32, device="cuda")
    assert [score for score, _ in kernels] == ["softmax", "softplus", "sigmoid", "spline"]
    for _, kernel in kernels:
        assert kernel.implementation == "flex"
        # torch.compile's wrapper, as the model's, not the eager flex_attention (its dense [T, T] reference)
        assert kernel.flexAttention is not flex_attention
        assert getattr(kernel.flexAttention, "_torchdynamo_orig_callable", None) is flex_attention
        assert kernel.kernelOptions == model.kernel.kernelOptions


def testTheStepClockStopsWhenTheDevicesWorkIsDone(tinyData, tmp_path, monkeypatch):
    """A stand-in for an asynchronous device: each step queues 1 s of work that completes only on synchronize."""
    import time
    import trainLmAf
    clock = {"now": 0.0, "queued": 0.0}

    def synchronize(device=None):
        clock["now"] += clock["queued"]
        clock["queued"] = 0.0

    trainStep = trainLmAf.Trainer.trainStep

    def queuesASecond(self):
        result = trainStep(self)
        clock["queued"] += 1.0
        return result

    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(torch.cpu, "synchronize", synchronize)
    monkeypatch.setattr(trainLmAf.Trainer, "trainStep", queuesASecond)
    hp, given = trainLmAf.parseArgs(tinyFlags(tinyData, tmp_path, runName="clock"))
    trainer = trainLmAf.Trainer(hp, given).setup()
    assert trainer.train() == 0
    assert trainer.state.trainSeconds == 8.0  # 8 steps, each step's work counted once
    assert "Step 8/8   lossTr" in (tmp_path / "log-clock.txt").read_text()


def testResumeOnFewerGpusRestoresTheStatesOfTheVisibleOnes(monkeypatch, capsys):
    from lmafs.run import checkpoints
    restored = []

    def setRngState(state, device="cuda"):  # as on a machine with one GPU
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= 1:
            raise IndexError(f"CUDA device {index} does not exist")
        restored.append((index, state[0].item()))

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", setRngState)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", setRngState)
    from lmafs.run.runState import RunState
    checkpointer = checkpoints.Checkpointer(None, None, None, mock.Mock(), None, [], RunState(1, "cpu"), None,
                                            False, (0, 1), 128, None, torch.device("cuda"))
    window = {"loss": mock.MagicMock(), "acc": mock.MagicMock(), "count": mock.MagicMock(), "steps": 0}
    ckpt = {"optimizer": {}, "afOptimizer": None, "dataPositions": [], "history": {}, "step": 4, "trainSeconds": 1.0,
            "window": window, "rng": {"torch": torch.get_rng_state(),
                                      "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]}}
    checkpointer.restore(ckpt)
    assert checkpointer.state.step == 4 and checkpointer.state.trainSeconds == 1.0
    assert restored == [(0, 0)]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "8 GPU(s), 1 visible" in out[0] and "GPUs 1-7 not restored" in out[0]


def testOutOfMemoryAdviceIsMeasuredAfterTheFailedPassIsFreed(tinyData, tmp_path, monkeypatch, capsys):
    from lmafs.run import forwardPasses
    from lmafs.run import stopping
    import trainLmAf
    made, alive = [], []

    def runsOut(self, tokens, first):  # Passes.forward
        activation = torch.ones(1000)  # what the failed pass saved for its backward
        made.append(weakref.ref(activation))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    advice = stopping.outOfMemoryAdvice

    def measuredAdvice(*args):
        alive.append(made[0]() is not None)
        return advice(*args)

    monkeypatch.setattr(forwardPasses.Passes, "forward", runsOut)
    monkeypatch.setattr(stopping, "outOfMemoryAdvice", measuredAdvice)
    assert trainLmAf.main(tinyFlags(tinyData, tmp_path, runName="oomFreed", nModels=2, modelsPerPass=2)) == 4
    assert alive == [False]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory in a pass of 2 model(s)")


def testAotEagerWithScoreSplineOnCudaIsRefusedBeforeAnythingIsWritten(tinyData, tmp_path, monkeypatch, capsys):
    import trainLmAf
    monkeypatch.setattr(trainLmAf, "pickDevice", lambda name: torch.device("cuda"))
    flags = tinyFlags(tinyData, tmp_path / "run", runName="aot", afType="spline;att-spline;score-spline",
                      compileBackend="aot_eager", device="auto")
    assert trainLmAf.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --compileBackend aot_eager cannot train score-spline on "
                                                   "CUDA")
    assert not (tmp_path / "run").exists()
    # the preflight of that run says so in its table
    assert trainLmAf.main(flags + ["--preflight", "1", "--preflightGpu", "h100:9.0:80"]) == 1
    out, err = capsys.readouterr()
    assert any(line.startswith("compiled graphs") and "FAIL" in line for line in out.splitlines())
    assert err.startswith("preflight: compiled graphs will not work: --compileBackend aot_eager")


def testAFlexAttentionFallbackIsStatedOnStderr(tinyData, tmp_path, monkeypatch, capsys):
    from lmafs.run import runSetup
    import trainLmAf
    torch._dynamo.reset()
    arguments = runSetup.modelArguments
    # FlexAttention on a CPU has no backward: the first backward before step 1 fails, as on a GPU it cannot serve
    monkeypatch.setattr(runSetup, "modelArguments", lambda *a, **k: {**arguments(*a, **k), "attention": "flex"})
    hp, given = trainLmAf.parseArgs(tinyFlags(tinyData, tmp_path, runName="fallback", compileBackend="none"))
    trainer = trainLmAf.Trainer(hp, given).setup()
    assert trainer.model.kernel.implementation == "sdpa"
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("FlexAttention failed on this GPU")]
    torch._dynamo.reset()


@pytest.mark.parametrize("gpuGiB, fits", [(80, True), (16, False)])
def testAFallbackThatWillNotFitStopsWithOneLine(monkeypatch, gpuGiB, fits):
    """The default phase I with spline scores: 14.0 GiB per pass of 20 models with FlexAttention, an estimated
    63.9 GiB with SDPA and explicit [T, T] scores."""
    import dataclasses

    from lmafs.run import flagChecks
    from lmafs.run import forwardPasses
    import trainLmAf
    hp, _ = trainLmAf.parseArgs(["--nModels", "20", "--afLayerSpecific", "0", "--afType",
                                 "spline;att-spline;score-spline"])
    hp, _ = flagChecks.checkFlags(hp)
    kernel = types.SimpleNamespace(flexFailure="NotImplementedError: no kernel fits", implementation="flex",
                                   fallBackToSdpa=lambda failure: "FlexAttention failed on this GPU (...)")
    model = types.SimpleNamespace(kernel=kernel, afInputTable=None)
    # eager: the one pass before step 1 fails; the passes' own device does not matter
    hp = dataclasses.replace(hp, compileBackend="none")
    passes = forwardPasses.Passes(model, hp, torch.device("cpu"), 15.0)
    monkeypatch.setattr(forwardPasses.Passes, "runVariants", lambda self, variants: 1 / 0)
    dist = types.SimpleNamespace(maxInPlace=lambda flags: flags)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpuGiB << 30, gpuGiB << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    problem = lambda: forwardPasses.fallbackProblemHere(hp, 50304, 20, 20 if fits else 10, torch.device("cuda"))  # noqa: E731
    if fits:
        passes.compileBeforeStepOne([("train", 0, 20, 1)], dist, problem)
        assert passes.attentionNotes == ["FlexAttention failed on this GPU (...)"]
        return
    with pytest.raises(trainLmAf.ConfigError) as stop:
        passes.compileBeforeStepOne([("train", 0, 20, 1)], dist, problem)
    line = str(stop.value)
    assert "\n" not in line and line.startswith("FlexAttention failed on this GPU (NotImplementedError: no kernel")
    assert "explicit [T, T] scores, needs an estimated" in line and "per pass of 10 model(s)" in line
    assert "try --modelsPerPass" in line
