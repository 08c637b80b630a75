"""Checks the Triton spline kernels in splineKernel.py against a PyTorch reference of the spline activation."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not importable, so the spline kernels cannot run")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import activationFunctions  # noqa: E402
from lmafs.network import splineKernel  # noqa: E402
from activationFunctions import splineBackends, splineReference  # noqa: E402
from conftest import requiresCuda  # noqa: E402
from lmafs.network.splineKernel import splineBackwardTriton, splineForwardTriton  # noqa: E402


# name, knots, knotMin, knotMax, dtype, shape, layout of x and gradOut, whether x holds NaNs
CASES = [
    ("k64-fp32-ragged", 64, -4.0, 4.0, torch.float32, (4099,), "contiguous", False),
    ("k64-bf16-3d", 64, -4.0, 4.0, torch.bfloat16, (3, 37, 41), "contiguous", False),
    ("k17-fp32-transposed", 17, -1.3, 2.1, torch.float32, (70, 96), "transposed", False),
    ("k17-bf16-strided", 17, -1.3, 2.1, torch.bfloat16, (50, 130), "strided", False),
    ("k256-fp32", 256, -4.0, 4.0, torch.float32, (2500,), "contiguous", False),
    ("k2-bf16", 2, -0.5, 0.5, torch.bfloat16, (777,), "contiguous", False),
    ("k8-bf16-nan", 8, -2.0, 2.0, torch.bfloat16, (300,), "contiguous", True),
    ("k64-fp32-empty", 64, -4.0, 4.0, torch.float32, (0, 5), "contiguous", False),
]

# The kernels run under TRITON_INTERPRET=1, which Triton reads at import, so they run in a child process that
# loads the inputs, calls both kernels and saves the outputs (torch.save keeps the non-contiguous views).
RUNNER = """
import sys, torch
from lmafs.network.splineKernel import splineBackwardTriton, splineForwardTriton
results = []
for case in torch.load(sys.argv[1]):
    invStep = 1.0 / case["knotStep"]
    y = splineForwardTriton(case["x"], case["values"], case["knotMin"], invStep)
    gradX, gradValues = splineBackwardTriton(case["gradOut"], case["x"], case["values"], case["knotMin"], invStep)
    results.append({"y": y, "gradX": gradX, "gradValues": gradValues, "xContiguous": case["x"].is_contiguous()})
torch.save(results, sys.argv[2])
"""


def makeInput(numKnots, knotMin, knotMax, dtype, shape, layout, withNaN, generator):
    """x mixes in-range and out-of-range values, far outliers, infinities, exact knots and exact range ends."""
    numel = 1
    for size in shape:
        numel *= size
    halfRange = (knotMax - knotMin) / 2
    centre = (knotMin + knotMax) / 2
    x = centre + 1.5 * halfRange * (2 * torch.rand(numel, generator=generator) - 1)
    knotStep = (knotMax - knotMin) / (numKnots - 1)
    specials = torch.cat([
        knotMin + knotStep * torch.arange(numKnots, dtype=torch.float32),
        torch.tensor([knotMin, knotMax, -1e4, 1e4, -1e30, 1e30, -float("inf"), float("inf"), 0.0]),
        torch.full((5 if withNaN else 0,), float("nan")),
    ])
    count = min(numel, specials.numel())
    x[torch.randperm(numel, generator=generator)[:count]] = specials[:count]
    x = x.reshape(shape).to(dtype)
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(shape[0], 2 * shape[1], dtype=dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def buildCases():
    generator = torch.Generator().manual_seed(1234)
    cases = []
    for name, numKnots, knotMin, knotMax, dtype, shape, layout, withNaN in CASES:
        x = makeInput(numKnots, knotMin, knotMax, dtype, shape, layout, withNaN, generator)
        gradOut = torch.randn(x.shape, generator=generator).to(dtype)
        if layout != "contiguous":
            gradOut = gradOut.t().contiguous().t()
        cases.append({
            "name": name, "x": x, "gradOut": gradOut, "values": torch.randn(numKnots, generator=generator),
            "knotMin": knotMin, "knotStep": (knotMax - knotMin) / (numKnots - 1), "layout": layout,
        })
    return cases


def childEnv(interpret):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def interpreterTakesProgramIdBounds():
    """Triton before 3.7 keeps program ids as 1-element arrays in its interpreter, which numpy from 2.4 refuses to
    turn into the Python int a loop bound needs; compiling for a GPU is not affected."""
    import numpy
    import triton
    version = lambda text: tuple(int(part) for part in text.split(".")[:2])  # noqa: E731
    return version(triton.__version__) >= (3, 7) or version(numpy.__version__) < (2, 4)


@pytest.fixture(scope="module")
def interpretedRuns(tmp_path_factory):
    if not interpreterTakesProgramIdBounds():
        pytest.skip("this Triton's interpreter cannot run a loop bounded by program ids under this numpy")
    cases = buildCases()
    workDir = tmp_path_factory.mktemp("splineKernel")
    inputPath, outputPath = workDir / "cases.pt", workDir / "results.pt"
    torch.save(cases, inputPath)
    done = subprocess.run([sys.executable, "-c", RUNNER, str(inputPath), str(outputPath)], env=childEnv(interpret=True),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"interpreted kernels failed:\n{done.stdout}\n{done.stderr}"
    return {case["name"]: (case, result) for case, result in zip(cases, torch.load(outputPath))}


def referenceRun(case):
    x = case["x"].detach().clone().requires_grad_()
    values = case["values"].clone().requires_grad_()
    y = splineReference(x, values, case["knotMin"], case["knotStep"])
    gradX, gradValues = torch.autograd.grad(y, (x, values), case["gradOut"])
    # the same knot sums taken over |gradOut| bound what summation order can change in each knot gradient
    absMass, = torch.autograd.grad(splineReference(case["x"], values, case["knotMin"], case["knotStep"]), values,
                                   case["gradOut"].abs())
    return y.detach(), gradX, gradValues, absMass


def assertMatches(case, y, gradX, gradValues):
    refY, refGradX, refGradValues, absMass = referenceRun(case)
    if case["x"].dtype == torch.bfloat16:
        # both sides round the same float32 value to bf16, but the interpreter truncates where GPUs round to
        # nearest, so one bf16 ulp (at most 2**-7 relative) may separate them
        rtol, atol = 2.0 ** -7, 1e-6
    else:
        # same float32 expressions in the same order; GPU FMA contraction of v0 + w*(v1-v0) moves y by ~1 ulp
        rtol, atol = 1e-5, 1e-5
    assert y.shape == case["x"].shape and y.dtype == case["x"].dtype
    assert gradX.shape == case["x"].shape and gradX.dtype == case["x"].dtype
    torch.testing.assert_close(y, refY, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(gradX, refGradX, rtol=rtol, atol=atol)
    # knot gradients are float32 sums of float32 terms in another order (per-program partials, then atomics):
    # rounding differs by a few ulp of the summed magnitudes, far below one misplaced term
    assert gradValues.dtype == torch.float32
    assert torch.equal(gradValues.isnan(), refGradValues.isnan())
    finite = ~refGradValues.isnan()
    error = (gradValues - refGradValues)[finite].abs()
    assert torch.all(error <= 2e-5 * absMass[finite] + 1e-6), (gradValues, refGradValues)


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_interpretedKernelsMatchReference(interpretedRuns, name):
    case, result = interpretedRuns[name]
    assert result["xContiguous"] == (case["layout"] == "contiguous")
    assertMatches(case, result["y"], result["gradX"], result["gradValues"])


def test_rejectsBadInputs():
    x = torch.zeros(4)
    with pytest.raises(ValueError):
        splineForwardTriton(x, torch.zeros(8, dtype=torch.float64), -1.0, 1.0)
    with pytest.raises(ValueError):
        splineForwardTriton(x, torch.zeros(1), -1.0, 1.0)
    with pytest.raises(ValueError):
        splineForwardTriton(x.double(), torch.zeros(8), -1.0, 1.0)
    with pytest.raises(ValueError):
        splineBackwardTriton(x[:3], x, torch.zeros(8), -1.0, 1.0)
    with pytest.raises(ValueError, match="cannot run on cpu"):
        splineBackwardTriton(x, x, torch.zeros(8), -1.0, 1.0, backend="triton-gluon")


# Runs the tile arithmetic every kernel uses (tile count of the persistent loops, 64-bit tile start, lane mask) on
# sizes around 2**31, where n is passed as int32 and its count used to wrap, leaving gradX unwritten.
TILE_PROBE = """
import sys
import torch
import triton
import triton.language as tl
from lmafs.network.splineKernel import _tileCount, _tileStart


@triton.jit
def tileProbe(n, out, TILE: tl.constexpr):
    count = _tileCount(n, TILE)
    base = _tileStart(count - 1, TILE)
    lanes = tl.arange(0, TILE)
    tl.store(out, count)
    tl.store(out + 1, base)
    tl.store(out + 2, tl.sum((lanes < n - base).to(tl.int64)))


rows = []
for tile in map(int, sys.argv[1].split(",")):
    for n in map(int, sys.argv[2].split(",")):
        out = torch.zeros(3, dtype=torch.int64)
        tileProbe[(1,)](n, out, TILE=tile)
        rows.append([tile, n] + out.tolist())
torch.save(torch.tensor(rows), sys.argv[3])
"""


def test_tileArithmeticAroundInt32Limit(tmp_path):
    tiles = sorted({splineKernel._FORWARD_BLOCK, splineKernel._GLUON_TILE}
                   | {splineKernel._oneHotRows(2 ** e) for e in range(1, splineKernel.MAX_KNOTS.bit_length())})
    limit = 2 ** 31
    sizes = sorted({limit + d for d in (-max(tiles) - 1, -2049, -2048, -2047, -1025, -1024, -1023, -129, -33, -32,
                                        -31, -2, -1, 0, 1)} | {limit * 2 + 3})
    probe = tmp_path / "tileProbe.py"
    probe.write_text(TILE_PROBE)
    done = subprocess.run([sys.executable, str(probe), ",".join(map(str, tiles)), ",".join(map(str, sizes)),
                           str(tmp_path / "rows.pt")], env=childEnv(interpret=True), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"interpreted tile probe failed:\n{done.stdout}\n{done.stderr}"
    for tile, n, count, base, active in torch.load(tmp_path / "rows.pt").tolist():
        assert count == -(-n // tile), (tile, n, count)
        assert base == (count - 1) * tile and active == n - base, (tile, n, base, active)


COMPILE_TARGETS = {"sm_80": 80, "sm_89": 89, "sm_90": 90}
COMPILE_DTYPES = {"fp32": 17, "bf16": 64}  # input dtype -> knot count compiled with it (padded to 32 and 64)


@pytest.mark.parametrize("dtype", list(COMPILE_DTYPES))
@pytest.mark.parametrize("target", list(COMPILE_TARGETS))
@pytest.mark.parametrize("kernel, backend", [("forward", name) for name in splineKernel.FORWARD_KERNELS]
                         + [("backward", name) for name in splineKernel.BACKWARD_KERNELS])
def test_kernelCompiles(kernel, backend, target, dtype):
    """The interpreter never compiles, so this checks that every kernel this Triton offers builds for A100, L4/4090
    and H100 class GPUs."""
    import triton
    if splineKernel.MISSING_FEATURES[backend]:
        pytest.skip(f"this Triton ({triton.__version__}) lacks {', '.join(splineKernel.MISSING_FEATURES[backend])}")
    if not isinstance(splineKernel._splineForwardKernel, triton.runtime.JITFunction):
        pytest.skip("TRITON_INTERPRET is set, so the kernels were defined for the interpreter and cannot compile")
    compiled = splineKernel.compileForTarget(kernel, backend, COMPILE_TARGETS[target], dtype, COMPILE_DTYPES[dtype])
    assert compiled.asm["cubin"]
    if backend == "triton-gluon":
        # the per-program histogram: one float32 column per lane for every padded knot
        assert compiled.metadata.shared >= triton.next_power_of_2(COMPILE_DTYPES[dtype]) * 32 * 4


def test_missingFeaturesAreNamed():
    class OldSharedMemory:  # Triton 3.7.1's shared_memory_descriptor: Gluon, but no atomic scatter
        load = reshape = None
    features = [("gl.shared_memory_descriptor", OldSharedMemory, ("atomic_scatter_add", "load", "reshape")),
                ("gluon", None, ("jit",))]
    assert splineKernel._missingFeatures(features) == ["gl.shared_memory_descriptor.atomic_scatter_add",
                                                       "gluon (missing)"]


@pytest.fixture
def freshBackendChoice():
    activationFunctions._kernelCandidates.cache_clear()
    yield
    activationFunctions._kernelCandidates.cache_clear()


def test_backendsFollowFeatureProbes(monkeypatch, freshBackendChoice):
    """A Triton without the Gluon kernel's features (3.7.1) gets the tl backward and keeps the forward kernel."""
    cuda = torch.device("cuda")
    offered = [name for name in splineKernel.BACKWARD_KERNELS if not splineKernel.MISSING_FEATURES[name]]
    assert splineKernel.kernelBackends(cuda)["backward"] == tuple(offered)
    monkeypatch.setitem(splineKernel.MISSING_FEATURES, "triton-gluon",
                        ["gl.shared_memory_descriptor.atomic_scatter_add"])
    assert splineKernel.kernelBackends(cuda) == {"forward": ("triton-tl",), "backward": ("triton-tl",)}
    assert splineBackends(cuda) == {"forward": "triton-tl", "backward": "triton-tl"}
    monkeypatch.setitem(splineKernel.MISSING_FEATURES, "triton-tl", ["tl.clamp"])
    activationFunctions._kernelCandidates.cache_clear()
    assert splineBackends(cuda) == {"forward": "torch", "backward": "torch"}


def test_noKernelsOnCpuWithoutInterpreter():
    if splineKernel._interpreting():
        pytest.skip("TRITON_INTERPRET is set: the tl kernels do run on CPU tensors")
    assert splineKernel.kernelBackends(torch.device("cpu")) == {"forward": (), "backward": ()}
    assert splineBackends("cpu") == {"forward": "torch", "backward": "torch"}


@requiresCuda
@pytest.mark.parametrize("backend", splineKernel.BACKWARD_KERNELS)
@pytest.mark.parametrize("name", ["k64-bf16-3d", "k17-fp32-transposed", "k256-fp32"])
def test_gpuKernelsMatchReference(backend, name):
    if backend not in splineKernel.kernelBackends(torch.device("cuda"))["backward"]:
        pytest.skip(f"{backend} is not offered here: {splineKernel.MISSING_FEATURES[backend]}")
    case = next(c for c in buildCases() if c["name"] == name)
    case = {**case, **{key: case[key].cuda() for key in ("x", "gradOut", "values")}}
    invStep = 1.0 / case["knotStep"]
    y = splineForwardTriton(case["x"], case["values"], case["knotMin"], invStep)
    gradX, gradValues = splineBackwardTriton(case["gradOut"], case["x"], case["values"], case["knotMin"], invStep,
                                             backend=backend)
    assertMatches(case, y, gradX, gradValues)
