"""--afInit from a fixed AF's name (per site) and the --afSmoothness prior: values, gradients, and a run without it."""
import math
import os

import pytest
import torch

import dataclasses

from lmafs.run import flagChecks
from lmafs.run import runOutputs
from lmafs.run import runSetup
import trainLmAf
from activationFunctions import FIXED_TYPES, Spline, makeActivation, splineSmoothness
from lmafs.network.afFiles import readAfFile
from conftest import runTrainer, tinyFlags
from plotting import _afsFigure, _makeFigure


@pytest.mark.parametrize("name", FIXED_TYPES)
def testNamedInitIsThatAfAtTheKnots(name):
    spline = Spline(nKnots=33, knotRange=4.0, init=name)
    expected = makeActivation(name, None)(torch.linspace(-4.0, 4.0, 33))
    assert torch.equal(spline.values.detach(), expected)
    # between knots the spline interpolates it; outside the range it is constant, as for every init
    assert torch.allclose(spline(torch.tensor([-9.0, 9.0])), expected[[0, -1]])


def testNumericInitsKeepTheirMeaning():
    assert torch.equal(Spline(5, 2.0, init=0.3).values.detach(), torch.full((5,), 0.3))
    assert torch.equal(Spline(5, 2.0, init=-1).values.detach(), torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    perChannel = Spline(5, 2.0, init="relu", channels=3)
    assert torch.equal(perChannel.values.detach(), torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0]).expand(3, 5))
    with pytest.raises(ValueError, match="fixed AF's name"):
        Spline(5, 2.0, init="swiglu")


def testSplitAfInit():
    assert flagChecks.splitAfInit(0.01) == (0.01, 0.01)
    assert flagChecks.splitAfInit("relu2") == ("relu2", "relu2")
    assert flagChecks.splitAfInit("relu2;att-0.01") == ("relu2", 0.01)
    assert flagChecks.splitAfInit("-1;att-gelu") == (-1.0, "gelu")
    for bad in ("relu3", "relu2;0.01", "relu2;att-swiglu", "a;att-b;att-c"):
        with pytest.raises(flagChecks.ConfigError):
            flagChecks.splitAfInit(bad)


def testPerSiteInitInTheModel():
    hp, _ = trainLmAf.parseArgs(["--filesTokensTr", "x", "--afType", "spline;att-spline", "--afInit", "relu2;att-0.01",
                                 "--nLayers", "2", "--dimEmb", "32", "--nHeads", "2", "--afNAnchors", "9",
                                 "--afRange", "2"])
    model = runSetup.buildModel(hp, 128, "cpu")
    knots = torch.linspace(-2.0, 2.0, 9)
    for spline in model.mlpAfs:
        assert torch.equal(spline.values.detach(), torch.relu(knots) ** 2)
    for spline in model.attAfs:
        assert torch.equal(spline.values.detach(), torch.full((9,), 0.01))
    hp = dataclasses.replace(hp, afInit=flagChecks.parseAfInit("-1"))  # a number stays a number: the original's float flag
    assert hp.afInit == -1.0 and torch.equal(runSetup.buildModel(hp, 128, "cpu").attAfs[0].values.detach(), knots)


def testBadInitIsOneLineError(tinyData, tmp_path):
    proc = runTrainer(tinyFlags(tinyData, tmp_path, afType="spline", afInit="relu3"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--afInit: 'relu3' is neither a number nor a fixed AF" in proc.stderr


def testSmoothnessValueAndGradientByHand():
    # 5 knots on [-2, 2]: h = 1, so the scale 1/h^3 is 1
    spline = Spline(nKnots=5, knotRange=2.0)
    with torch.no_grad():
        spline.values.copy_(torch.tensor([0.0, 1.0, 0.0, 2.0, 2.0]))
    # second differences: 0 - 2 + 0 = -2; 1 - 0 + 2 = 3; 0 - 4 + 2 = -2  ->  4 + 9 + 4 = 17
    value = splineSmoothness(spline)
    assert value.item() == 17.0
    value.backward()
    # d/dv_j sum_k d_k^2 = 2 (d_{j-1} - 2 d_j + d_{j+1}), d_k = -2, 3, -2 at knots 1..3 and 0 at the ends
    expected = [2 * (-2.0), 2 * (0.0 - 2 * -2.0 + 3.0), 2 * (-2.0 - 2 * 3.0 - 2.0), 2 * (3.0 - 2 * -2.0 + 0.0), 2 * -2.0]
    assert spline.values.grad.tolist() == expected
    fine = Spline(nKnots=9, knotRange=2.0)  # h = 0.5: the same quadratic scores (about) the same integral
    for s in (spline, fine):
        with torch.no_grad():
            s.values.copy_(s.knots ** 2)  # f'' = 2: the integral of f''^2 over [-2, 2] is 16
    assert splineSmoothness(spline).item() == pytest.approx(4 * 3 / 1.0)  # (2 h^2)^2 / h^3 * 3 interior knots
    assert splineSmoothness(fine).item() == pytest.approx(4 * 0.25 ** 2 * 7 / 0.125)
    perChannel = Spline(nKnots=5, knotRange=2.0, channels=2)
    with torch.no_grad():
        perChannel.values.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0, 2.0], [0.0] * 5]))
    assert splineSmoothness(perChannel).item() == 17.0 / 2  # the mean over channels


def afValuesAfterOneStep(tinyData, folder, **flags):
    argv = tinyFlags(tinyData, folder, afType="spline;att-spline", afLayerSpecific=0, afInit="relu2;att-linear",
                     afNAnchors=17, afRange=4, afLr=-0.05, nModels=2, staggeredStarts=0, nSteps=2, nStepsWarmup=0,
                     nStepsCooldown=1, saveAfEvery=1, valEvery=-1, runName="s", **flags)
    proc = runTrainer(argv)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, readAfFile(os.path.join(folder, "ptAf-s-step0001.pt"))


def testPenaltyJoinsTheAfGradient(tinyData, tmp_path):
    """With plain SGD on the AFs, the prior moves the values after step 1 by exactly -lr * lambda * dS/dv."""
    lam, lr = 0.002, 0.05
    _, plain = afValuesAfterOneStep(tinyData, tmp_path / "plain")
    out, smoothed = afValuesAfterOneStep(tinyData, tmp_path / "smooth", afSmoothness=lam)
    assert "AF smoothness S " in out and "penalty afSmoothness*S " in out
    for init, kind in (("relu2", "mlpValues"), ("linear", "attValues")):
        spline = Spline(nKnots=17, knotRange=4.0, init=init)
        splineSmoothness(spline).backward()
        shift = torch.as_tensor(smoothed[kind][0]) - torch.as_tensor(plain[kind][0])
        assert torch.allclose(shift, -lr * lam * spline.values.grad, atol=2e-6), kind
    assert torch.count_nonzero(torch.as_tensor(smoothed["mlpValues"][0]) - torch.as_tensor(plain["mlpValues"][0]))


def testNoPenaltyAtLambdaZero(tinyData, tmp_path, monkeypatch):
    """lambda = 0 (the default) never computes the prior: the run is the one without the flag, bit for bit."""
    def forbidden(spline):
        raise AssertionError("splineSmoothness called at afSmoothness 0")
    monkeypatch.setattr("model.splineSmoothness", forbidden)
    results = []
    for name, extra in (("default", {}), ("zero", {"afSmoothness": 0})):
        argv = tinyFlags(tinyData, tmp_path, afType="spline;att-spline", afLayerSpecific=0, nModels=2, runName=name,
                         **extra)
        assert trainLmAf.main(argv) == 0
        with open(tmp_path / f"metrics-{name}.csv") as f:
            results.append([line.split(",")[3:5] for line in f])
    assert results[0] == results[1] and len(results[0]) > 4
    hp = trainLmAf.parseArgs(tinyFlags(tinyData, tmp_path, afType="gelu", afSmoothness=0.1))[0]
    settledHp, forced = flagChecks.checkFlags(hp)
    assert "afSmoothness=0 (no spline is learned)" in " ".join(forced) and settledHp.afSmoothness == 0


def testAfPlotShowsTheStart(tinyData, tmp_path):
    argv = tinyFlags(tinyData, tmp_path, afType="spline;att-spline", afLayerSpecific=0, afInit="relu2;att-0.01",
                     afNAnchors=17, afRange=4, plottingLevel=1, nSteps=4, nStepsWarmup=0, nStepsCooldown=1,
                     runName="p")
    assert trainLmAf.main(argv) == 0
    assert len([name for name in os.listdir(tmp_path) if name.startswith("af-p-")]) == 1
    trainer = trainLmAf.Trainer(trainLmAf.parseArgs(argv[:-2] + ["--runName", "p2"])[0])
    trainer.setup()
    knots = torch.linspace(-4.0, 4.0, 17)

    def afTiles():
        return runOutputs.afTiles(trainer.model, trainer.startValues, None, trainer.afInputRange, 0)

    assert [tile["start"] is None for tile in afTiles()] == [True, True]  # before training, start and now coincide
    with torch.no_grad():
        for spline in trainer.model.splines():
            spline.values.add_(1.0)
    tiles = afTiles()
    assert [tile["start"].tolist() for tile in tiles] == [(torch.relu(knots) ** 2).tolist(),
                                                          torch.full((17,), 0.01).tolist()]
    fig = _afsFigure(tiles[:1], "t", _makeFigure)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "step 0" in labels and "now" in labels
    startLine = next(line for line in fig.axes[0].get_lines() if line.get_label() == "step 0")
    assert startLine.get_ydata()[1:-1].tolist() == pytest.approx((torch.relu(knots) ** 2).tolist())
    assert math.isclose(startLine.get_ydata()[0], 0.0) and math.isclose(startLine.get_ydata()[-1], 16.0)
