"""Tests for plotting.py: every writer yields a readable PNG atomically, parseLog round-trips, import stays pyplot-free."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plotting  # noqa: E402

pngSignature = b"\x89PNG\r\n\x1a\n"


def fakeHistory(nModels, nSteps=2000, withVal=True, nSites=8):
    rng = np.random.default_rng(nModels)
    train = []
    for model in range(nModels):
        # Staggered starts as in phase I: model i only reports after step i*nSteps/nModels.
        start = model * nSteps // nModels
        for step in range(start + 100, nSteps + 1, 100):
            t = step - start
            train.append((step, model, 5 + 5 * np.exp(-t / 500) + 0.1 * rng.standard_normal(),
                          0.3 * (1 - np.exp(-t / 600))))
    val = [(step, 5 + 5 * np.exp(-step / 500), 0.3 * (1 - np.exp(-step / 600)))
           for step in range(500, nSteps + 1, 500)] if withVal else []
    actMean = [(step, list(1 + 0.1 * np.arange(nSites) + step / nSteps)) for step in range(200, nSteps + 1, 200)]
    actMax = [(step, [10 * v for v in values]) for step, values in actMean]
    return {"train": train, "val": val, "actMean": actMean, "actMax": actMax}


def fakeAfs(nMlp, nAtt, channels=None):
    knots = np.linspace(-15, 15, 64)
    afs = []
    for i in range(nMlp + nAtt):
        curve = np.maximum(knots, 0) + np.sin(knots * (0.5 + 0.1 * i))
        values = curve if channels is None else curve[None, :] + 0.2 * np.arange(channels)[:, None]
        afs.append({"name": f"MLP layer {i}" if i < nMlp else f"att layer {i - nMlp}", "knots": knots,
                    "values": values})
    return afs


def checkPng(path, minWidth=300, minHeight=200):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == pngSignature
    image = imread(path)
    assert image.shape[0] >= minHeight and image.shape[1] >= minWidth
    # Something was drawn: a blank canvas would be a single colour.
    assert image.std() > 0.01
    # Atomic save leaves only the final file behind.
    assert not [name for name in os.listdir(os.path.dirname(path)) if name.endswith(".tmp")]


@pytest.mark.parametrize("nModels", [1, 20])
@pytest.mark.parametrize("withVal", [True, False])
def testPlotTraining(tmp_path, nModels, withVal):
    path = tmp_path / "tr.png"
    plotting.plotTraining(str(path), fakeHistory(nModels, withVal=withVal), title="run x")
    checkPng(path, minWidth=800)
    assert os.listdir(tmp_path) == ["tr.png"]


def testPlotTrainingEmpty(tmp_path):
    path = tmp_path / "tr.png"
    plotting.plotTraining(str(path), {"train": [], "val": []})
    checkPng(path)


def testPlotTrainingOverwrites(tmp_path):
    path = tmp_path / "tr.png"
    plotting.plotTraining(str(path), fakeHistory(1))
    plotting.plotTraining(str(path), fakeHistory(20), title="second")
    checkPng(path)
    assert os.listdir(tmp_path) == ["tr.png"]


@pytest.mark.parametrize("nMlp,nAtt,channels,shape", [(4, 4, None, (2, 4)), (1, 1, None, (1, 2)),
                                                      (4, 4, 16, (2, 4)), (1, 0, 8, (1, 1))])
def testPlotAfs(tmp_path, nMlp, nAtt, channels, shape):
    path = tmp_path / "afs.png"
    afs = fakeAfs(nMlp, nAtt, channels)
    ncols = plotting._afGridColumns(afs)
    assert (-(-len(afs) // ncols), ncols) == shape
    plotting.plotAfs(str(path), afs, title="AFs")
    checkPng(path, minWidth=250 * shape[1], minHeight=200 * shape[0])
    assert os.listdir(tmp_path) == ["afs.png"]


def testPlotActivations(tmp_path):
    path = tmp_path / "act.png"
    names = [f"MLP {i}" for i in range(4)] + [f"att {i}" for i in range(4)]
    plotting.plotActivations(str(path), fakeHistory(1), names)
    checkPng(path, minWidth=800)
    assert os.listdir(tmp_path) == ["act.png"]


def testPlotActivationsMeanOnlyAndEmpty(tmp_path):
    history = fakeHistory(1, nSites=2)
    history["actMax"] = []
    plotting.plotActivations(str(tmp_path / "mean.png"), history, ["MLP 0", "att 0"])
    plotting.plotActivations(str(tmp_path / "empty.png"), {"actMean": [], "actMax": []}, [])
    checkPng(tmp_path / "mean.png")
    checkPng(tmp_path / "empty.png")
    assert sorted(os.listdir(tmp_path)) == ["empty.png", "mean.png"]


def writeLog(path, history, nSteps):
    """Write progress lines in the trainer's exact format, with unrelated lines mixed in."""
    lines = ["Config: nModels=3 afRange=15", "Phase I"]
    trainByStep = {}
    for step, model, loss, acc in history["train"]:
        trainByStep.setdefault(step, []).append((model, loss, acc))
    val = {step: (loss, acc) for step, loss, acc in history["val"]}
    for step in sorted(set(trainByStep) | set(val)):
        if step in val:
            loss, acc = val[step]
            lines.append(f"Step {step}/{nSteps}   lossVa {loss:.4f}   accVa {100 * acc:.1f}")
        for model, loss, acc in sorted(trainByStep.get(step, [])):
            if model == 0:
                lines.append(f"Step {step}/{nSteps}   lossTr {loss:.4f}   accTr {100 * acc:.1f}   47s = 0.03s/step")
            lines.append(f"Step {step}/{nSteps}   model {model}   lossTr {loss:.4f}   accTr {100 * acc:.1f}")
    for key, kind in (("actMean", 2), ("actMax", 3)):
        for step, values in history[key]:
            lines.append(f"Step {step}/{nSteps}   Activation magnitudes ({kind}): " + " ".join(f"{v:.2f}" for v in values))
    lines.append("Done.")
    path.write_text("\n".join(lines) + "\n")


def testParseLogRoundTrip(tmp_path):
    history = {
        "train": [(100, 0, 9.8765, 0.021), (100, 1, 10.1234, 0.013), (200, 0, 8.5, 0.103), (200, 2, 9.25, 0.05)],
        "val": [(200, 7.1282, 0.106)],
        "actMean": [(200, [1.66, 1.25, 0.51, 1.69])],
        "actMax": [(200, [12.5, 9.75, 3.0, 20.25])],
    }
    logPath = tmp_path / "log-myRun.txt"
    writeLog(logPath, history, 20000)
    parsed = plotting.parseLog(str(logPath))
    assert set(parsed) == {"train", "val", "actMean", "actMax", "secondsPerStep", "peakMemory", "hyperparameters",
                           "parameters", "parametersTotal", "vocabSize", "modelsPerPass", "kernels", "fallbacks"}
    assert sorted(parsed["train"]) == [pytest.approx(row) for row in sorted(history["train"])]
    assert parsed["val"] == [pytest.approx(row) for row in history["val"]]
    for key in ("actMean", "actMax"):
        assert [s for s, _ in parsed[key]] == [s for s, _ in history[key]]
        assert [v for _, v in parsed[key]] == [pytest.approx(v) for _, v in history[key]]


def testParseLogExactSpecLines(tmp_path):
    logPath = tmp_path / "log-x.txt"
    logPath.write_text("Step 501/20000   lossVa 7.1282   accVa 10.6\n"
                       "Step 601/20000   lossTr 7.1430   accTr 10.3   47s = 0.03s/step\n"
                       "Step 601/20000   model 3   lossTr 7.2000   accTr 9.8\n"
                       "Step 20000/20000   Activation magnitudes (2): 1.66 1.25 0.51 1.69\n"
                       "something else entirely\n")
    parsed = plotting.parseLog(str(logPath))
    assert parsed["val"] == [(501, pytest.approx(7.1282), pytest.approx(0.106))]
    assert sorted(parsed["train"]) == [(601, 0, pytest.approx(7.143), pytest.approx(0.103)),
                                       (601, 3, pytest.approx(7.2), pytest.approx(0.098))]
    assert parsed["actMean"] == [(20000, pytest.approx([1.66, 1.25, 0.51, 1.69]))]
    assert parsed["actMax"] == []


def testCliWritesNamedPngs(tmp_path):
    logPath = tmp_path / "log-myRun.txt"
    writeLog(logPath, fakeHistory(3, nSites=4), 2000)
    outDir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plotting.py")
    result = subprocess.run([sys.executable, script, str(logPath), "--outDir", str(outDir), "--show"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(outDir)) == ["act-myRun.png", "tr-myRun.png"]
    checkPng(outDir / "tr-myRun.png")
    checkPng(outDir / "act-myRun.png")
    if sys.platform not in ("darwin", "win32"):
        assert "no display" in result.stdout


def testImportDoesNotLoadPyplot():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, plotting; assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def testWritersDoNotLoadPyplot(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, numpy as np, plotting\n"
            f"plotting.plotTraining({str(tmp_path / 'a.png')!r}, {{'train': [(1, 0, 9.0, 0.1)], 'val': []}})\n"
            f"plotting.plotAfs({str(tmp_path / 'b.png')!r}, [{{'name': 'MLP 0', 'knots': np.linspace(-1, 1, 5), "
            "'values': np.zeros(5)}])\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


ORIGINAL_EXCERPT = """Hyperparameters:
  runName = "baseline-gelu"
  staggeredStarts = 2
====================================================================================================
Number of model parameters (trainable): 16,026,134
  _orig_mod.skipWeights                              2
====================================================================================================
Step 1/20000   lossVa 15.2586   accVa 0.0
Step 1/20000   lossTr 15.3035   accTr 0.0   17s = 16.84s/step
Step 1/20000   Activation magnitudes (2): 0.80 0.25 0.80 0.26 0.80 0.25 0.80 0.26
Step 1/20000   Activation magnitudes (3): 4.77 1.64 4.77 1.65 4.77 1.59 4.77 1.69
Step 6/20000   Peak CUDA memory usage: 1.360 GB
Step 6/20000   lossTr 15.2699   accTr 0.0   28s = 2.17s/step
Step 501/20000   lossVa 7.1282   accVa 10.6
Step 10001/20000   lossVa 5.2132   accVa 23.7
Step 20000/20000   lossVa 4.9334   accVa 26.3
Step 20000/20000   Peak CUDA memory usage: 1.302 GB
Step 20000/20000   lossTr 4.9519   accTr 26.3   977s = 0.04s/step
Saving plot (loss/acc): ./results-fineweb10B\\tr-baseline-gelu-step020000-00001616-00004616.png
"""


def testParseLogReadsTheHeaderAndTheLinesGpuCheckUses(tmp_path):
    logPath = tmp_path / "log-x.txt"
    logPath.write_text("==== trainLmAf.py  2026-01-01 00:00:00  run 'x'\n"
                       "Hyperparameters:\n  nLayers = 4\n  afType = 'spline;att-spline'\n"
                       "Parameters per model (AF parameters are shared by all models):\n"
                       "  embed                                    (50304, 256)           12,877,824 trainable\n"
                       "  blocks.0.attn.qkv                        (768, 256)                196,608 trainable\n"
                       "Parameters per model: 13,074,432 trainable, 0 frozen, 13,074,432 total\n"
                       "Vocabulary size: 50,304 (max token id + 1, rounded up to a multiple of 128)\n"
                       "Spline kernels: forward triton-tl, backward triton-tl\n"
                       "Attention: FlexAttention, mask block 128\n"
                       "FlexAttention failed (X); attention now runs in SDPA\n"
                       "Phase I: 20 models, start steps [0, 2, 3]; 20 models per pass (chosen from the free GPU memory)\n"
                       "Step 6/30   Peak CUDA memory usage: 1.360 GB\n"
                       "Step 501/20000   lossVa 7.1282   accVa 10.6\n"
                       "Step 601/20000   lossTr 7.1430   accTr 10.3   47s = 0.03s/step\n"
                       "Step 602/20000   lossTr nan   accTr 0.0   48s = 1.25s/step\n"
                       "Step 602/20000   model 3   lossTr inf   accTr 0.0\n"
                       "Step 602/20000   Activation magnitudes (3): 4.06 0.86\n")
    parsed = plotting.parseLog(str(logPath))
    assert parsed["peakMemory"] == [(6, 1.36)] and parsed["secondsPerStep"] == [(601, 0.03), (602, 1.25)]
    assert parsed["val"] == [(501, pytest.approx(7.1282), pytest.approx(0.106))]
    lossAt602 = {model: loss for step, model, loss, _ in parsed["train"] if step == 602}
    assert math.isnan(lossAt602[0]) and lossAt602[3] == float("inf")
    assert parsed["actMax"] == [(602, [4.06, 0.86])] and parsed["actMean"] == []
    assert parsed["hyperparameters"] == {"nLayers": "4", "afType": "spline;att-spline"}
    assert parsed["parameters"] == {"embed": 12877824, "blocks.0.attn.qkv": 196608}
    assert parsed["parametersTotal"] == 13074432 and parsed["vocabSize"] == 50304 and parsed["modelsPerPass"] == 20
    assert parsed["kernels"] == ["Spline kernels: forward triton-tl, backward triton-tl",
                                 "Attention: FlexAttention, mask block 128"]
    assert parsed["fallbacks"] == ["FlexAttention failed (X); attention now runs in SDPA"]


def testParseLogReadsTheOriginalsFormat(tmp_path):
    logPath = tmp_path / "log-baseline-gelu.txt"
    logPath.write_text(ORIGINAL_EXCERPT)
    parsed = plotting.parseLog(str(logPath))
    assert parsed["val"] == [(1, pytest.approx(15.2586), 0.0), (501, pytest.approx(7.1282), pytest.approx(0.106)),
                             (10001, pytest.approx(5.2132), pytest.approx(0.237)),
                             (20000, pytest.approx(4.9334), pytest.approx(0.263))]
    assert sorted(parsed["train"])[-1] == (20000, 0, pytest.approx(4.9519), pytest.approx(0.263))
    assert parsed["actMax"] == [(1, pytest.approx([4.77, 1.64, 4.77, 1.65, 4.77, 1.59, 4.77, 1.69]))]


def testParseLogOfARestartedRunKeepsTheLastValues(tmp_path):
    logPath = tmp_path / "log-r.txt"
    logPath.write_text("Step 1/9   lossVa 11.0000   accVa 0.0\nStep 5/9   lossVa 9.0000   accVa 1.0\n"
                       "Hyperparameters:\nStep 1/9   lossVa 10.5000   accVa 0.0\n")
    assert plotting.parseLog(str(logPath))["val"] == [(1, 10.5, 0.0), (5, 9.0, 0.01)]


def testOverlayOfOursAndTheOriginalsLog(tmp_path):
    theirs = tmp_path / "theirs" / "log-baseline-gelu.txt"
    theirs.parent.mkdir()
    theirs.write_text(ORIGINAL_EXCERPT)
    ours = tmp_path / "log-baseline-gelu.txt"
    ours.write_text("Step 1/20000   lossVa 15.0701   accVa 0.0\nStep 501/20000   lossVa 7.1000   accVa 10.7\n"
                    "Step 10001/20000   lossVa 5.2000   accVa 23.8\nStep 20000/20000   lossVa 4.9200   accVa 26.4\n")
    noVal = tmp_path / "log-trainOnly.txt"
    noVal.write_text("Step 1/20000   lossTr 15.1000   accTr 0.0   1s = 1.00s/step\n"
                     "Step 20000/20000   lossTr 5.0000   accTr 25.0   9s = 0.01s/step\n")
    out = tmp_path / "compare.png"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plotting.py")
    result = subprocess.run([sys.executable, script, str(ours), str(theirs), str(noVal), "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 runs: baseline-gelu, theirs/baseline-gelu, trainOnly" in result.stdout
    checkPng(out, minWidth=1000, minHeight=700)
    runs = list(zip(plotting.runLabels([str(ours), str(theirs), str(noVal)]),
                    map(plotting.parseLog, [str(ours), str(theirs), str(noVal)])))
    fig = plotting._overlayFigure(runs, "", plotting._makeFigure)
    lossAxes = fig.axes[0]
    assert [line.get_label() for line in lossAxes.lines] == ["baseline-gelu", "theirs/baseline-gelu",
                                                             "trainOnly (train, no validation)"]
    assert list(lossAxes.lines[1].get_ydata()) == pytest.approx([15.2586, 7.1282, 5.2132, 4.9334])
    # the second-half panel starts at half the longest run
    assert min(fig.axes[2].lines[0].get_xdata()) == 10001


def testOverlayOfAMissingLogIsOneErrorLine(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plotting.py")
    result = subprocess.run([sys.executable, script, str(tmp_path / "nope.txt"), "--out", str(tmp_path / "c.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: log file") and "Traceback" not in result.stderr


def testInputRangeReadsPercentilesOffTheHistogram():
    uniform = {"edges": np.linspace(0, 10, 11), "histogram": np.ones(10)}
    assert plotting.inputRange(uniform) == pytest.approx((0.01, 9.99))
    # empty bins around the data: inputs spread evenly within bins [2, 3) and [3, 4)
    gaps = {"edges": np.arange(6.0), "histogram": np.array([0, 0, 5, 5, 0.0])}
    assert plotting.inputRange(gaps) == pytest.approx((2.002, 3.998))
    assert plotting.inputRange(gaps, 0.25, 0.75) == pytest.approx((2.5, 3.5))
    assert plotting.inputRange({"edges": np.arange(3.0), "histogram": np.zeros(2)}) is None


def relu2SplineTile():
    """A ReLU²-shaped spline on the default knots (225 at the far end) whose inputs lie within ±6."""
    knots = np.linspace(-15, 15, 64)
    edges = np.linspace(-22.5, 22.5, 91)  # the span and bins of AfInputStatistics for afRange 15
    centres = (edges[:-1] + edges[1:]) / 2
    histogram = np.where(np.abs(centres) < 6, np.exp(-centres ** 2 / (2 * 1.8 ** 2)) * 1e5, 0.0)
    inputs = {"edges": edges, "histogram": histogram, "outside": 0.0, "range": 15.0, "step": 600}
    return {"name": "MLP (all layers)", "knots": knots, "values": np.maximum(knots, 0) ** 2,
            "start": np.maximum(knots, 0) ** 2, "inputs": inputs}


def testZoomedAfTileSpansTheInputsOfAReluSquaredSpline(tmp_path):
    af = relu2SplineTile()
    low, high = plotting.inputRange(af["inputs"])
    assert -6 < low < -4.5 and 4.5 < high < 6  # the 0.1% and 99.9% points of the inputs
    window = plotting.zoomWindow(af)
    assert window == pytest.approx(((low + high) / 2 - 0.55 * (high - low), (low + high) / 2 + 0.55 * (high - low)))
    fig = plotting._afsFigure([af], "", plotting._makeFigure, zoom=True)
    tile, strip = fig.axes[0], fig.axes[1]
    assert tile.get_xlim() == pytest.approx(window) and strip.get_xlim() == pytest.approx(window)
    # y: the spline's own range within the window (0 up to its value at the window's right end), padded by 8%
    top = np.interp(window[1], af["knots"], af["values"])
    assert 25 < top < 45
    assert tile.get_ylim() == pytest.approx((-0.08 * top, 1.08 * top))
    inset, = tile.child_axes  # the whole curve, the far knots' 225 included
    assert inset.get_xlim() == pytest.approx((-18, 18)) and inset.get_ylim()[1] > 225
    assert "0.1–99.9%" in tile.get_title()
    # the legend keeps clear of the inset (their boxes in the tile's axes fractions do not meet)
    legendBox = tile.get_legend().get_window_extent().transformed(tile.transAxes.inverted())
    insetBox = inset.get_window_extent().transformed(tile.transAxes.inverted())
    assert not legendBox.overlaps(insetBox)
    # the inputs' strip has no tick labels a strip this low cannot hold (the log scale brings one a decade)
    assert len(strip.get_yticks()) == 0 and len(strip.get_yticks(minor=True)) == 0
    # without zoom: the whole knot range, scaled to 225 as before
    full = plotting._afsFigure([af], "", plotting._makeFigure).axes[0]
    assert full.get_xlim() == pytest.approx((-18, 18)) and full.get_ylim()[1] > 225 and not full.child_axes
    plotting.plotAfs(str(tmp_path / "af.png"), [af], title="relu2", zoom=True)
    checkPng(tmp_path / "af.png")


def testNoZoomWithoutInputsOrWhenTheyFillTheRange():
    af = relu2SplineTile()
    edges = af["inputs"]["edges"]
    wide = dict(af, inputs=dict(af["inputs"], histogram=np.ones(len(edges) - 1)))
    assert plotting.zoomWindow(wide) is None and plotting.zoomWindow(dict(af, inputs=None)) is None
    for tile in (wide, dict(af, inputs=None)):
        ax = plotting._afsFigure([tile], "", plotting._makeFigure, zoom=True).axes[0]
        assert ax.get_xlim() == pytest.approx((-18, 18)) and not ax.child_axes
    # inputs all in one bin, [0, 0.5): the window is still two bins wide (1.0, padded by 10%), around the bin
    spike = dict(af, inputs=dict(af["inputs"], histogram=np.eye(len(edges) - 1)[45]))
    assert plotting.zoomWindow(spike) == pytest.approx((0.25 - 0.55, 0.25 + 0.55))
