"""--tracker: TensorBoard event files read back with TensorBoard's own reader (metrics equal metrics-RUN.csv, AF-input
shares, smoothness, plots; a resume continues the same folder), a W&B offline run directory, and the one-line error
when a tracker's package is missing."""
import csv
import glob
import os

import pytest

from lmafs.run import trackers
import trainLmAf
from conftest import runTrainer, tinyFlags


def trackedFlags(tinyData, results, **overrides):
    flags = dict(runName="tracked", nModels=2, afType="spline;att-spline", afLayerSpecific=0, afLr=0.1,
                 afSmoothness=1e-3, plottingLevel=1, nSteps=8, valEvery=4, plotEvery=4, saveModelEvery=4)
    flags.update(overrides)
    return tinyFlags(tinyData, results, **flags)


def csvRows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def readEvents(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboardHoldsWhatTheCsvHoldsAndResumeContinuesIt(tinyData, tmp_path):
    pytest.importorskip("tensorboard")
    assert trainLmAf.main(trackedFlags(tinyData, tmp_path, tracker="tensorboard")) == 0
    folder = tmp_path / "tensorboard" / "tracked"
    events = readEvents(folder)
    tags = events.Tags()
    rows = csvRows(tmp_path / "metrics-tracked.csv")
    for split, tag, model in (("train", "train/loss", "0"), ("val", "val/loss", "0"),
                              ("train", "train/model1/accuracy", "1")):
        column = tag.split("/")[-1]
        expected = [(int(r["step"]), float(r[column])) for r in rows if r["split"] == split and r["model"] == model]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected] and len(got) >= 2
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=1e-6)
    assert {"lr", "tokens", "trainSeconds", "lr/model1", "afSmoothness/S", "afSmoothness/penalty"} <= set(tags["scalars"])
    sites = {"afInputsOutOfRange/att_0", "afInputsOutOfRange/MLP_0", "afInputsOutOfRange/att_1",
             "afInputsOutOfRange/MLP_1"}
    assert sites <= set(tags["scalars"])
    assert all(0.0 <= e.value <= 1.0 for site in sites for e in events.Scalars(site))
    assert [e.value for e in events.Scalars("afSmoothness/penalty")] == pytest.approx(
        [1e-3 * e.value for e in events.Scalars("afSmoothness/S")])
    assert {"plots/tr", "plots/af"} <= set(tags["images"])
    image = events.Images("plots/af")[-1]
    assert image.step == 8 and image.width > 100 and image.encoded_image_string[:4] == b"\x89PNG"

    # A crash after step 8 that kept no final log line: resuming from step 4 continues the same folder, where the
    # steps after 4 are trained again and each step is there once, as in the CSV.
    os.remove(tmp_path / "log-tracked.txt")
    assert trainLmAf.main(["--resumeFrom", str(tmp_path / "pt-tracked-step0004.pt")]) == 0
    assert len(glob.glob(str(folder / "events.out.tfevents.*"))) == 2
    resumed = readEvents(folder)
    rows = csvRows(tmp_path / "metrics-tracked.csv")
    expected = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == "train" and r["model"] == "0"]
    got = [(e.step, e.value) for e in resumed.Scalars("train/loss")]
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 5, 6, 8]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=1e-6)


def test_wandbOfflineWritesARunDirectoryAndResumesTheSameRun(tinyData, tmp_path, monkeypatch, offline):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    done = runTrainer(trackedFlags(tinyData, tmp_path, tracker="wandb"))
    assert done.returncode == 0, done.stderr
    runId = trackers.wandbRunId(str(tmp_path), "tracked")
    runs = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{runId}"))
    assert len(runs) == 1
    # the run's record log (binary, no reader ships with wandb) holds the tags; the plots are its media files
    records = open(os.path.join(runs[0], f"run-{runId}.wandb"), "rb").read()
    for tag in (b"train/loss", b"val/loss", b"train/model1/loss", b"lr/model1", b"afInputsOutOfRange/MLP_1",
                b"afSmoothness/S"):
        assert tag in records
    for kind in ("tr", "af"):
        assert glob.glob(os.path.join(runs[0], "files", "media", "images", "plots", f"{kind}_*.png"))
    os.remove(tmp_path / "log-tracked.txt")
    resumed = runTrainer(["--resumeFrom", str(tmp_path / "pt-tracked-step0004.pt")])
    assert resumed.returncode == 0, resumed.stderr
    assert len(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{runId}"))) == 2  # the same run id, continued
    assert trackers.wandbRunId(str(tmp_path / "other"), "tracked") != runId


def test_missingTrackerPackageIsOneErrorLine(tinyData, tmp_path, monkeypatch, capsys):
    realFindSpec = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else realFindSpec(name, *args))
    assert trainLmAf.main(trackedFlags(tinyData, tmp_path, tracker="wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --tracker wandb needs the wandb package: pip install wandb"
    assert not os.path.exists(tmp_path / "log-tracked.txt")  # stopped before anything was written


def test_wandbThatCannotStartIsOneErrorLine(tinyData, tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")

    def noLogin(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", noLogin)
    assert trainLmAf.main(trackedFlags(tinyData, tmp_path, tracker="wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tracker wandb could not start a run (api_key not configured") and "\n" not in err
    assert "WANDB_MODE=offline" in err
