"""Where the AF inputs lie: per site, the share outside the knot range and a histogram, logged at each report,
warned about above 1%, and drawn under each tile of the AF plot."""
import re

import numpy as np
import pytest
import torch

from conftest import runTrainer, tinyFlags
from model import AfInputStatistics


def testStatisticsOfKnownInputs():
    stats = AfInputStatistics(knotRange=2.0)
    stats.record(torch.tensor([-3.0, -1.0, 0.5, 1.5, 2.5, 4.0, 0.0, -2.0]))
    stats.record(torch.zeros(4, 3))
    result = AfInputStatistics.results(stats.table(), 2.0)
    assert result["outside"] == [pytest.approx(3 / 8), 0.0]  # -3, 2.5, 4 lie beyond +-2; -2 is on the knot
    assert result["mean"][0] == pytest.approx(14.5 / 8) and result["max"] == [4.0, 0.0] and result["counts"] == [8, 12]
    edges, histogram = result["edges"], result["histograms"][0]
    assert edges[0] == -3.0 and edges[-1] == 3.0 and histogram.sum() == 8  # 4.0 is clamped into the last bin
    assert histogram[-1] == 1 and histogram[0] == 1
    assert result["histograms"][1][len(edges) // 2 - 1:len(edges) // 2 + 1].sum() == 12


def testOutOfRangeInputsAreLoggedAndWarnedAbout(tinyData, tmp_path):
    # the attention AF reads the RMS-normalised stream: with knots on [-0.5, 0.5], most of its inputs lie outside
    result = runTrainer(tinyFlags(tinyData, tmp_path, runName="narrow", afType="spline;att-spline", afRange=0.5,
                                  afLayerSpecific=0, nSteps=6, plotEvery=3, plottingLevel=1))
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "log-narrow.txt").read_text()
    lines = re.findall(r"^Step (\d+)/6   AF inputs out of range: (.*)$", log, re.M)
    assert [int(step) for step, _ in lines] == [1, 4, 6]
    shares = [float(v.rstrip("%")) for v in lines[0][1].split()]
    assert len(shares) == 4 and all(s > 30 for s in shares[0::2])  # att 0, att 1
    # a unit-RMS Gaussian stream has ~62% of |x| > 0.5; the MLP's 0.02-scaled matmul of it far less
    assert all(s < shares[0] for s in shares[1::2])
    warnings = [line for line in log.splitlines() if "Warning: more than 1% of the AF inputs" in line]
    assert warnings and warnings[0].startswith("Step 1/6") and "outside [-0.5, 0.5] at att 0" in warnings[0]
    assert "Activation magnitudes" not in log  # plottingLevel 1: the original's magnitude lines need level 2


def testAfPlotDrawsTheInputsUnderEachTile(tmp_path):
    import plotting

    knots = np.linspace(-2, 2, 9)
    inputs = {"edges": np.linspace(-3, 3, 91), "histogram": np.arange(90.0), "outside": 0.2, "range": 2.0, "step": 7}
    afs = [{"name": "MLP (all layers)", "knots": knots, "values": np.tanh(knots), "inputs": inputs},
           {"name": "att (all layers)", "knots": knots, "values": knots, "inputs": None}]
    fig = plotting._afsFigure(afs, "", plotting._makeFigure)
    assert len(fig.axes) == 4  # each AF above its inputs strip
    strip = fig.axes[1]
    assert strip.get_shared_x_axes().joined(strip, fig.axes[0])
    assert any("20.00% outside ±2" in t.get_text() for t in strip.texts)
    assert any("inputs not measured yet" in t.get_text() for t in fig.axes[3].texts)
    plotting.plotAfs(str(tmp_path / "af.png"), afs, title="t")
    from test_plotting import checkPng
    checkPng(tmp_path / "af.png")
