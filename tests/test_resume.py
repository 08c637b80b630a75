"""Long runs: exact resume from a checkpoint, SIGINT then resume, and a non-finite loss stopping the run."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, runTrainer, tinyFlags
from lmafs.run.runPlan import lrFactor


def phase1Flags(tinyData, results, **overrides):
    flags = dict(seed=1234, nModels=3, staggeredStarts=1, afLayerSpecific=0, afType="spline;att-spline", afLr=0.1,
                 runName="long", nSteps=40, nStepsWarmup=4, nStepsCooldown=10, valEvery=10, plotEvery=10,
                 plottingLevel=1, shuffleTrData=2)
    flags.update(overrides)
    return tinyFlags(tinyData, results, **flags)


def finalLines(logPath, nSteps):
    lines = open(logPath).read().splitlines()
    return [line for line in lines if line.startswith(f"Step {nSteps}/{nSteps} ") and "s/step" not in line]


def testResumeEndsOnTheSameLines(tinyData, tmp_path):
    full = runTrainer(phase1Flags(tinyData, tmp_path / "full", saveModelEvery=20))
    assert full.returncode == 0, full.stderr
    checkpoint = tmp_path / "full" / "pt-long-step0020.pt"
    data = torch.load(checkpoint, weights_only=True)
    assert data["step"] == 20 and len(data["dataPositions"]) == 3 and data["history"]["val"]
    resumed = runTrainer(["--resumeFrom", str(checkpoint), "--dirResults", str(tmp_path / "resumed")])
    assert resumed.returncode == 0, resumed.stderr
    expected = finalLines(tmp_path / "full" / "log-long.txt", 40)
    assert expected and finalLines(tmp_path / "resumed" / "log-long.txt", 40) == expected
    trainLines = [line for line in open(tmp_path / "resumed" / "log-long.txt") if line.startswith("Step 40/40   lossTr")]
    fullTrain = [line for line in open(tmp_path / "full" / "log-long.txt") if line.startswith("Step 40/40   lossTr")]
    assert trainLines[0].split("   ")[:3] == fullTrain[0].split("   ")[:3]
    # Resuming in the run's own folder, whose log holds the final line, does nothing, as starting it again does.
    before = (tmp_path / "full" / "log-long.txt").read_text()
    again = runTrainer(["--resumeFrom", str(checkpoint)])
    assert again.returncode == 0 and "already complete" in again.stdout
    assert (tmp_path / "full" / "log-long.txt").read_text() == before


def metricRows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def testMetricsCsvHasARowPerReportAndSurvivesAResume(tinyData, tmp_path):
    full = runTrainer(phase1Flags(tinyData, tmp_path / "full", saveModelEvery=20))
    assert full.returncode == 0, full.stderr
    rows = metricRows(tmp_path / "full" / "metrics-long.csv")
    assert list(rows[0]) == ["step", "model", "split", "loss", "accuracy", "lr", "trainSeconds", "tokens", "bpb"]
    val = [r for r in rows if r["split"] == "val"]
    assert [int(r["step"]) for r in val] == [1, 11, 21, 31, 40] and {r["model"] for r in val} == {"0"}
    # validated after the update, as the original: Step k is the model after k steps (k x 32 tokens), whose last
    # update used the LR of 0-based step k - 1
    assert [int(r["tokens"]) for r in val] == [32, 352, 672, 992, 1280]
    assert [float(r["lr"]) for r in val] == pytest.approx([6e-4 * lrFactor(k - 1, 40, 4, 10, "trap")
                                                           for k in (1, 11, 21, 31, 40)])
    train = [r for r in rows if r["split"] == "train"]
    assert {(int(r["step"]), int(r["model"])) for r in train} == {
        (step, m) for step in (1, 6, 11, 21, 31, 40) for m, start in enumerate((0, 13, 27)) if step > start}
    last = [r for r in train if r["step"] == "40"]
    assert [int(r["tokens"]) for r in last] == [40 * 32, 27 * 32, 13 * 32]
    assert float(last[0]["lr"]) == pytest.approx(6e-4 * (40 - 39) / 10)  # the last cooldown step and float(last[0]["trainSeconds"]) > 0
    logLine = next(line for line in open(tmp_path / "full" / "log-long.txt") if line.startswith("Step 40/40   lossVa"))
    assert f"lossVa {float(val[-1]['loss']):.4f}" in logLine

    # a run that crashed after step 30 with a checkpoint at 20: its rows after 20 are dropped, then written again
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(tmp_path / "full" / "pt-long-step0020.pt", crashed)
    with open(crashed / "metrics-long.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= 30)
    resumed = runTrainer(["--resumeFrom", str(crashed / "pt-long-step0020.pt"), "--dirResults", str(crashed)])
    assert resumed.returncode == 0, resumed.stderr

    def comparable(table):
        return [{k: v for k, v in r.items() if k != "trainSeconds"} for r in table]

    assert comparable(metricRows(crashed / "metrics-long.csv")) == comparable(rows)


def testInterruptThenResume(tinyData, tmp_path):
    argv = phase1Flags(tinyData, tmp_path / "run", nSteps=400, nStepsCooldown=100, valEvery=100, plotEvery=1)
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "trainLmAf.py")] + argv, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log-long.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "Step 3/400   lossTr" in log.read_text()):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err
    resumeLine = [line for line in out.splitlines() if line.startswith("Resume with: ")]
    assert resumeLine, out[-2000:]
    checkpoint = resumeLine[0].split("--resumeFrom ")[1]
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 3 <= step < 400
    assert any(name.startswith(f"ptAf-long-step{step:04d}") for name in os.listdir(tmp_path / "run"))
    resumed = runTrainer(["--resumeFrom", checkpoint, "--nSteps", str(step + 2), "--nStepsWarmup", "0",
                          "--nStepsCooldown", "1"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"Step {step + 2}/{step + 2}   lossTr" in log.read_text()


def testNonFiniteLossStopsWithOneLine(tinyData, tmp_path):
    result = runTrainer(tinyFlags(tinyData, tmp_path, afType="spline;att-spline", afLr=1e30, lr=1e30, nSteps=8,
                                  runName="nan"))
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite training loss at step" in lines[0] and "in model 0" in lines[0]
    saved = lines[0].split("saved in ")[1]
    values = torch.load(saved, weights_only=True)["mlpValues"][0]
    assert torch.isfinite(values).all()


def testOutOfMemoryStopsWithOneLineAndAResumableCheckpoint(tinyData, tmp_path, monkeypatch, capsys):
    import trainLmAf
    from lmafs.run import forwardPasses
    forward, trainingPasses = forwardPasses.Passes.forward, []

    def runsOutAtStepFive(self, tokens, first):  # one training pass per step: 4 models in a pass of 4
        if torch.is_grad_enabled():
            trainingPasses.append(first)
            if len(trainingPasses) == 5:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(self, tokens, first)

    monkeypatch.setattr(forwardPasses.Passes, "forward", runsOutAtStepFive)
    flags = tinyFlags(tinyData, tmp_path, runName="oom", nModels=4, staggeredStarts=0, afType="spline",
                      modelsPerPass=4)
    assert trainLmAf.main(flags) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: out of memory in a pass of 4 model(s) (cpu): estimated peak ")
    assert "try --modelsPerPass 2; resume from " in err and err.rstrip().endswith("pt-oom-step0004.pt with --resumeFrom")
    assert (tmp_path / "ptAf-oom-step0004.pt").exists()
    monkeypatch.setattr(forwardPasses.Passes, "forward", forward)
    assert trainLmAf.main(["--resumeFrom", str(tmp_path / "pt-oom-step0004.pt"), "--modelsPerPass", "2"]) == 0
    assert "Step 8/8   lossVa" in (tmp_path / "log-oom.txt").read_text()


def testOutOfMemoryBeforeStepOneIsNotAFlexAttentionFailure(tinyData, tmp_path, monkeypatch, capsys):
    from lmafs.run import forwardPasses
    from lmafs.run import runSetup
    import trainLmAf
    arguments = runSetup.modelArguments
    monkeypatch.setattr(runSetup, "modelArguments", lambda *a, **k: {**arguments(*a, **k), "attention": "flex"})

    def outOfMemory(self, variants):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(forwardPasses.Passes, "runVariants", outOfMemory)
    assert trainLmAf.main(tinyFlags(tinyData, tmp_path, runName="oom1", nModels=2, modelsPerPass=1)) == 4
    out, err = capsys.readouterr()
    assert "FlexAttention failed" not in out + err and err.count("\n") == 1
    assert "out of memory in a pass of 1 model(s)" in err and "one model per pass does not fit" in err
    assert not (tmp_path / "log-oom1.txt").exists()
