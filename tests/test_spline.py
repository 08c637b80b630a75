"""The spline activation: values, gradients (gradcheck and a dense one-hot reference), loading, freezing."""
import subprocess
import sys
import warnings

import pytest
import torch

import activationFunctions
from activationFunctions import (Spline, SplinePerDim, makeActivation, splineActivation, splineBackends,
                                 splineReference)
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


def splineInput(generator, shape, knotMin, knotMax, nKnots, dtype):
    """x mixing in-range and out-of-range values with exact knots, both ends, far outliers, infinities and NaN."""
    numel = torch.Size(shape).numel()
    x = (knotMin + knotMax) / 2 + 0.75 * (knotMax - knotMin) * (2 * torch.rand(numel, generator=generator) - 1)
    knots = knotMin + (knotMax - knotMin) / (nKnots - 1) * torch.arange(nKnots, dtype=torch.float32)
    specials = torch.cat([knots, torch.tensor([knotMin, knotMax, -1e4, 1e4, float("inf"), -float("inf"),
                                               float("nan"), float("nan")])])
    x[torch.randperm(numel, generator=generator)[:specials.numel()]] = specials
    return x.view(shape).to(dtype)


def referenceGradients(x, values, knotMin, knotStep, gradOut):
    xRef = x.detach().clone().requires_grad_()
    valuesRef = values.detach().clone().requires_grad_()
    y = splineReference(xRef, valuesRef, knotMin, knotStep)
    gradX, gradValues = torch.autograd.grad(y, (xRef, valuesRef), gradOut)
    # the same knot sums over |gradOut| bound what a different summation order may change in each knot gradient
    absMass, = torch.autograd.grad(splineReference(x, valuesRef, knotMin, knotStep), valuesRef, gradOut.abs())
    return y.detach(), gradX, gradValues, absMass


def customOpSpline(x, values, knotMin, knotStep):
    """The custom op torch.compile sees (on a CPU it runs the same PyTorch code as splineActivation)."""
    return activationFunctions._splineForwardOp(x.contiguous(), values, float(knotMin), 1.0 / float(knotStep))


@pytest.mark.parametrize("chunk", [None, 64], ids=["oneChunk", "chunksOf64"])
@pytest.mark.parametrize("path", [splineActivation, customOpSpline], ids=["autogradFunction", "customOp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [None, 5])
def testTorchPathMatchesReferenceEverywhere(path, dtype, channels, chunk, monkeypatch):
    """Values and both gradients equal the reference at knots, at both ends, outside, at infinities and at NaN."""
    if chunk is not None:  # on one thread, inputs longer than a chunk go through in pieces (per-channel: whole rows)
        monkeypatch.setattr(activationFunctions, "_CHUNK", chunk)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    generator = torch.Generator().manual_seed(7)
    nKnots, knotMin, knotMax = 9, -2.0, 2.0
    knotStep = (knotMax - knotMin) / (nKnots - 1)
    shape = (3, 41, channels or 7)
    x = splineInput(generator, shape, knotMin, knotMax, nKnots, dtype).requires_grad_()
    values = torch.randn((nKnots,) if channels is None else (channels, nKnots), generator=generator)
    values.requires_grad_()
    gradOut = torch.randn(shape, generator=generator).to(dtype)
    y = path(x, values, knotMin, knotStep)
    gradX, gradValues = torch.autograd.grad(y, (x, values), gradOut)
    refY, refGradX, refGradValues, absMass = referenceGradients(x, values, knotMin, knotStep, gradOut)
    assert y.dtype == gradX.dtype == dtype and gradValues.dtype == torch.float32
    torch.testing.assert_close(y, refY, equal_nan=True)
    torch.testing.assert_close(gradX, refGradX)
    assert torch.equal(gradValues.isnan(), refGradValues.isnan()) and gradValues.isnan().any()
    finite = ~refGradValues.isnan()
    assert torch.all((gradValues - refGradValues)[finite].abs() <= 2e-5 * absMass[finite] + 1e-6)


def testRightEndBelongsToTheLastInterval():
    """At x = knotMax exactly: value v_{K-1}, slope of the last interval, the whole gradient on the last knot."""
    values = torch.tensor([[0.0, 1.0, 3.0], [2.0, -2.0, 5.0]], requires_grad=True)  # two channels, knots -1, 0, 1
    x = torch.tensor([[1.0, 1.0]], requires_grad=True)
    y = splineActivation(x, values, -1.0, 1.0)
    torch.testing.assert_close(y.detach(), torch.tensor([[3.0, 5.0]]))
    gradX, gradValues = torch.autograd.grad(y, (x, values), torch.tensor([[1.0, 10.0]]))
    torch.testing.assert_close(gradX, torch.tensor([[2.0, 70.0]]))
    # nothing spills into the next channel's first knot
    torch.testing.assert_close(gradValues, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 10.0]]))


def testEmptyInput():
    x = torch.zeros(0, 4, requires_grad=True)
    values = torch.randn(6, requires_grad=True)
    y = splineActivation(x, values, -1.0, 0.4)
    gradX, gradValues = torch.autograd.grad(y.sum(), (x, values))
    assert y.shape == (0, 4) and gradX.shape == (0, 4)
    assert torch.equal(gradValues, torch.zeros(6))


def testSplineBackendsWithoutKernels():
    torchOnly = {"forward": "torch", "backward": "torch"}
    assert splineBackends("cpu") == torchOnly
    assert splineBackends("cuda", perChannel=True) == torchOnly
    assert splineBackends("cuda", nKnots=100_000) == torchOnly
    assert splineBackends("cuda", dtype=torch.float64) == torchOnly


class FakeKernels:
    """Stands in for splineKernel: records which kernel ran and raises for the backends listed in `broken`."""

    MAX_KNOTS = 256

    def __init__(self, broken, outOfMemory=()):
        self.broken, self.outOfMemory, self.calls = set(broken), set(outOfMemory), []

    def splineForwardTriton(self, x, values, knotMin, invStep):
        self.calls.append(("forward", "triton-tl"))
        if ("forward", "triton-tl") in self.outOfMemory:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if ("forward", "triton-tl") in self.broken:
            raise RuntimeError("forward kernel does not compile")
        return activationFunctions.splineForwardTorch(x, values, knotMin, invStep)

    def splineBackwardTriton(self, gradOut, x, values, knotMin, invStep, *, backend):
        self.calls.append(("backward", backend))
        if ("backward", backend) in self.outOfMemory:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if ("backward", backend) in self.broken:
            raise RuntimeError(f"{backend} does not compile\nAttributeError('no atomic_scatter_add')")
        return activationFunctions.splineBackwardTorch(gradOut, x, values, knotMin, invStep)


@pytest.fixture
def fakeKernelsOnCpu(monkeypatch):
    """Makes the op dispatch offer Triton kernels for CPU tensors, served by FakeKernels; returns its installer."""
    candidates = {"forward": ("triton-tl", "torch"), "backward": ("triton-gluon", "triton-tl", "torch")}
    monkeypatch.setattr(activationFunctions, "_kernelCandidates", lambda device: (candidates, FakeKernels.MAX_KNOTS))
    monkeypatch.setattr(activationFunctions, "_failedBackends", set())

    def install(broken, outOfMemory=()):
        fake = FakeKernels(broken, outOfMemory)
        monkeypatch.setitem(sys.modules, "lmafs.network.splineKernel", fake)
        return fake

    return install


def runCustomOp(x, values):
    y = customOpSpline(x, values, -15.0, 30.0 / 63)
    gradX, gradValues = torch.autograd.grad(y.sum(), (x, values))
    return y, gradX, gradValues


def testKernelFailureFallsBackForThatKernelOnly(fakeKernelsOnCpu):
    fake = fakeKernelsOnCpu(broken={("backward", "triton-gluon"), ("backward", "triton-tl")})
    torch.manual_seed(4)
    x = (torch.randn(300) * 8).requires_grad_()
    values = torch.randn(64, requires_grad=True)
    with pytest.warns(UserWarning) as caught:
        y, gradX, gradValues = runCustomOp(x, values)
    assert len(caught) == 2
    reference = torch.autograd.grad(splineReference(x, values, -15.0, 30.0 / 63).sum(), (x, values))
    torch.testing.assert_close((gradX, gradValues), reference)
    fake.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each failure warned once, when it happened
        runCustomOp(x, values)
    assert fake.calls == [("forward", "triton-tl")]  # the forward kernel still runs; the backward is on PyTorch now
    assert splineBackends("cpu") == {"forward": "triton-tl", "backward": "torch"}


def testEachFailureWarnsNamingKernelAndNextBackend(fakeKernelsOnCpu):
    fake = fakeKernelsOnCpu(broken={("backward", "triton-gluon")})
    x = torch.randn(50, requires_grad=True)
    values = torch.randn(8, requires_grad=True)
    with pytest.warns(UserWarning) as caught:
        runCustomOp(x, values)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1
    assert "backward kernel triton-gluon failed" in messages[0] and "now uses triton-tl" in messages[0]
    assert "no atomic_scatter_add" in messages[0]  # the cause, not the first line of a compiler message
    assert fake.calls == [("forward", "triton-tl"), ("backward", "triton-gluon"), ("backward", "triton-tl")]
    assert splineBackends("cpu") == {"forward": "triton-tl", "backward": "triton-tl"}
    fake.broken.add(("forward", "triton-tl"))
    with pytest.warns(UserWarning, match="forward kernel triton-tl failed .* now uses torch"):
        runCustomOp(x, values)
    assert splineBackends("cpu") == {"forward": "torch", "backward": "triton-tl"}


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def testOutOfMemoryInAKernelIsRaisedAndKeepsTheKernel(fakeKernelsOnCpu, kernel):
    # running out of memory says nothing about the kernel; the PyTorch path would need more memory, not less
    fakeKernelsOnCpu(broken=(), outOfMemory={(kernel, "triton-tl" if kernel == "forward" else "triton-gluon")})
    x = torch.randn(50, requires_grad=True)
    values = torch.randn(8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(torch.OutOfMemoryError):
            runCustomOp(x, values)
    assert splineBackends("cpu") == {"forward": "triton-tl", "backward": "triton-gluon"}
