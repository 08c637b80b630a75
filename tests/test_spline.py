"""The spline activation: values, gradients (gradcheck and a dense one-hot reference), loading, freezing."""
import subprocess
import sys

import pytest
import torch

from activationFunctions import Spline, SplinePerDim, makeActivation, splineActivation, splineReference
from conftest import REPO


def denseSpline(x, values, knots):
    """Reference: interpolation weights as a dense one-hot matrix [N, K] times the values."""
    K = knots.numel()
    h = float(knots[1] - knots[0])
    xc = x.reshape(-1).float().clamp(float(knots[0]), float(knots[-1]))
    u = (xc - knots[0]) / h
    i = u.floor().clamp(max=K - 2).long()
    w = u - i
    weights = torch.zeros(xc.numel(), K)
    weights[torch.arange(xc.numel()), i] = 1 - w
    weights[torch.arange(xc.numel()), i + 1] += w
    return (weights @ values).view(x.shape)


def testHandComputedValues():
    spline = Spline(nKnots=5, knotRange=2.0)  # knots -2, -1, 0, 1, 2
    with torch.no_grad():
        spline.values.copy_(torch.tensor([4.0, 1.0, 0.0, 1.0, 3.0]))
    x = torch.tensor([-10.0, -2.0, -1.5, -1.0, 0.25, 1.0, 1.5, 2.0, 7.0])
    expected = torch.tensor([4.0, 4.0, 2.5, 1.0, 0.25, 1.0, 2.0, 3.0, 3.0])
    torch.testing.assert_close(spline(x), expected)


def testIdentityInitAndConstantOutside():
    spline = Spline(nKnots=64, knotRange=15.0, init=-1)
    x = torch.linspace(-15, 15, 101)
    torch.testing.assert_close(spline(x), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(spline(torch.tensor([-100.0, 100.0])), torch.tensor([-15.0, 15.0]))
    assert float(Spline(init=0.01)(torch.tensor([3.0])).detach()) == pytest.approx(0.01)


def testGradcheckSharedAndPerChannel():
    torch.manual_seed(0)
    knotMin, knotStep = -2.0, 4.0 / 9
    x = (torch.rand(40, dtype=torch.float64) * 6 - 3).requires_grad_()
    values = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: splineActivation(a, v, knotMin, knotStep), (x, values))
    x2 = (torch.rand(4, 3, dtype=torch.float64) * 6 - 3).requires_grad_()
    values2 = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: splineActivation(a, v, knotMin, knotStep), (x2, values2))


def testAgainstDenseReferenceFloat32():
    torch.manual_seed(1)
    spline = Spline(nKnots=16, knotRange=3.0)
    with torch.no_grad():
        spline.values.copy_(torch.randn(16))
    knots = spline.knots
    onKnots = knots[torch.randint(0, 16, (20,))]
    x = torch.cat([torch.randn(200) * 3, onKnots, torch.tensor([-3.0, 3.0, -50.0, 50.0])]).requires_grad_()
    y = spline(x)
    xRef = x.detach().clone().requires_grad_()
    valuesRef = spline.values.detach().clone().requires_grad_()
    yRef = denseSpline(xRef, valuesRef, knots)
    torch.testing.assert_close(y, yRef, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yRef.backward(g)
    torch.testing.assert_close(spline.values.grad, valuesRef.grad, atol=1e-4, rtol=1e-5)
    inside = (x.detach().abs() < 3.0 - 1e-3) & ~torch.isin(x.detach(), onKnots)
    torch.testing.assert_close(x.grad[inside], xRef.grad[inside], atol=1e-4, rtol=1e-5)
    assert (x.grad[x.detach().abs() > 3.0] == 0).all()


def testPerChannelMatchesSeparateSplines():
    torch.manual_seed(2)
    perDim = SplinePerDim(3, nKnots=8, knotRange=2.0)
    with torch.no_grad():
        perDim.values.copy_(torch.randn(3, 8))
    x = torch.randn(5, 7, 3) * 2
    y = perDim(x)
    for c in range(3):
        single = Spline(nKnots=8, knotRange=2.0).loadValues(perDim.values[c].detach())
        torch.testing.assert_close(y[..., c], single(x[..., c]))


def testFastPathEqualsReferenceInBfloat16():
    torch.manual_seed(3)
    values = torch.randn(64)
    x = (torch.randn(1000) * 8).to(torch.bfloat16)
    y = splineActivation(x, values, -15.0, 30.0 / 63)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, splineReference(x, values, -15.0, 30.0 / 63))


def testLoadValuesFreezeAndStateDict():
    knots = torch.linspace(-5, 5, 11)
    values = torch.randn(11)
    spline = Spline(nKnots=64, knotRange=15.0).loadValues(values, knots, freeze=True)
    assert spline.nKnots == 11 and spline.knotRange == 5.0 and not spline.values.requires_grad
    torch.testing.assert_close(spline(knots), values)
    fresh = Spline(nKnots=64, knotRange=15.0)
    fresh.load_state_dict(spline.state_dict())
    torch.testing.assert_close(fresh(torch.tensor([0.3, 4.9])), spline(torch.tensor([0.3, 4.9])))
    with pytest.raises(ValueError, match="evenly spaced"):
        Spline().loadValues(torch.zeros(3), torch.tensor([0.0, 1.0, 3.0]))


def testEvaluateOnGrid():
    xs, ys = Spline(nKnots=8, knotRange=1.0, init=-1).evaluateOnGrid(nPoints=50, margin=0.5)
    assert xs.shape == ys.shape == (50,)
    assert float(xs[0]) == pytest.approx(-2.0) and float(ys[0]) == pytest.approx(-1.0)
    xs, ys = SplinePerDim(4, nKnots=8).evaluateOnGrid(nPoints=20)
    assert ys.shape == (4, 20)


def testFixedActivations():
    x = torch.tensor([-2.0, 0.5, 3.0])
    torch.testing.assert_close(makeActivation("relu2", 3)(x), torch.tensor([0.0, 0.25, 9.0]))
    torch.testing.assert_close(makeActivation("linear", 3)(x), x)
    torch.testing.assert_close(makeActivation("gelu", 3)(x), torch.nn.functional.gelu(x))
    with pytest.raises(ValueError, match="unknown activation"):
        makeActivation("bogus", 3)


def testImportableWithTorchAlone():
    code = ("import sys; import activationFunctions; "
            "bad = [m for m in ('model', 'trainLmAf', 'tokenShards', 'matplotlib') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def testNanPropagatesWithoutBadIndexing():
    spline = Spline(nKnots=8, knotRange=2.0)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5], requires_grad=True)
    y = spline(x)
    assert torch.isnan(y[0]) and torch.isfinite(y[1:]).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
