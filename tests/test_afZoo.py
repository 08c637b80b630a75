"""The activation-function zoo: every AF against its formula on known inputs, finite gradients, the gated and KAN
MLPs (formulas, parameter counts), sharing rules, validation of afType, plotting of learned shapes, and every name
training a few steps through trainLmAf.py."""
import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

import activationFunctions as afs
from conftest import tinyFlags
from model import GPT, GatedMlp, KanLayer, KanMlp, bSplineBasis, gatedHiddenWidth, kanHiddenWidth
from lmafs.run import runOutputs
from lmafs.run.flagChecks import ConfigError, checkFlags, isLearnableAf
from trainLmAf import Hyperparameters, Trainer, main, parseArgs

ELEMENTWISE = afs.FIXED_TYPES + afs.LEARNABLE_TYPES + afs.SPLINE_TYPES
MLP_ONLY = ("moa", "geglu", "swiglu", "reglu", "kan")
X = [-3.0, -1.0, -0.25, 0.0, 0.5, 2.0]


def gelu(x):
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def check(module, formula, xs=X):
    got = module(torch.tensor(xs)).detach()
    torch.testing.assert_close(got, torch.tensor([formula(x) for x in xs]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Forward against the formulas


@pytest.mark.parametrize("name, formula", [
    ("silu", lambda x: x * sigmoid(x)),
    ("tanh", math.tanh),
    ("elu", lambda x: x if x > 0 else math.exp(x) - 1),
    ("selu", lambda x: 1.0507009873554805 * (x if x > 0 else 1.6732632423543772 * (math.exp(x) - 1))),
    ("softplus", lambda x: math.log1p(math.exp(x))),
])
def testFixedAfs(name, formula):
    module = afs.makeActivation(name, 6)
    assert not afs.isLearnable(module)
    check(module, formula)


def testPreluHasOneSlopePerChannel():
    module = afs.makeActivation("prelu", 3)
    torch.testing.assert_close(module.slope.detach(), torch.full((3,), 0.25))
    with torch.no_grad():
        module.slope.copy_(torch.tensor([0.1, 0.5, 2.0]))
    x = torch.tensor([[-2.0, -2.0, -2.0], [3.0, 3.0, 3.0]])
    torch.testing.assert_close(module(x), torch.tensor([[-0.2, -1.0, -4.0], [3.0, 3.0, 3.0]]))


def testScalarLearnableAfs():
    swish = afs.Swish()
    with torch.no_grad():
        swish.beta.fill_(2.0)
    check(swish, lambda x: x * sigmoid(2 * x))

    lgelu = afs.LGELU()
    check(lgelu, gelu)  # the init is GELU itself
    with torch.no_grad():
        lgelu.alpha.fill_(2.0), lgelu.beta.fill_(0.5)
    check(lgelu, lambda x: 2 * gelu(0.5 * x))

    crrelu = afs.CRReLU()
    check(crrelu, lambda x: max(x, 0) + 0.01 * x * math.exp(-x * x / 2))
    with torch.no_grad():
        crrelu.eps.fill_(0.5)
    check(crrelu, lambda x: max(x, 0) + 0.5 * x * math.exp(-x * x / 2))


def testRationalFormulaAndGeluInit():
    rational = afs.Rational()
    xs = torch.linspace(-3, 3, 601)
    assert (rational(xs) - F.gelu(xs)).abs().max() < 0.012
    wide = torch.linspace(-12, 12, 2401)
    assert (rational(wide) - F.gelu(wide)).abs().max() < 0.03
    a, b = [0.1, 1.0, -0.5, 0.2, 0.05, -0.01], [0.3, -0.4, 0.1, 0.02]
    with torch.no_grad():
        rational.numerator.copy_(torch.tensor(a))
        rational.denominator.copy_(torch.tensor(b))
    check(rational, lambda x: sum(a[j] * x ** j for j in range(6))
          / (1 + abs(sum(b[k - 1] * x ** k for k in range(1, 5)))))


def testPolyCom():
    polyrelu = afs.PolyReLU()
    check(polyrelu, lambda x: (max(x, 0) + max(x, 0) ** 2 + max(x, 0) ** 3) / 3)
    with torch.no_grad():
        polyrelu.coefficients.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    check(polyrelu, lambda x: 1 + 2 * max(x, 0) + 3 * max(x, 0) ** 2 + 4 * max(x, 0) ** 3)

    polynorm = afs.PolyNorm()
    with torch.no_grad():
        polynorm.coefficients.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    token = [1.0, -2.0, 3.0]

    def rms(values):
        return math.sqrt(sum(v * v for v in values) / len(values) + 1e-6)

    expected = [0.5 + sum(c * x ** i / rms([t ** i for t in token]) for i, c in ((1, 1.0), (2, 2.0), (3, 3.0)))
                for x in token]
    # Two tokens: the normalisation is per token, so a scaled copy of a token gives the same output.
    out = polynorm(torch.tensor([token, [10 * t for t in token]]))
    torch.testing.assert_close(out[0], torch.tensor(expected))
    torch.testing.assert_close(out[1], torch.tensor(expected), rtol=1e-4, atol=1e-4)


def testLearnableMixture():
    la = afs.LearnableActivation()
    check(la, lambda x: (max(x, 0) + gelu(x) + x * sigmoid(x) + math.tanh(x) + x) / 5)
    with torch.no_grad():
        la.weights.copy_(torch.tensor([1.0, 0.0, -2.0, 0.5, 3.0]))
    check(la, lambda x: max(x, 0) - 2 * x * sigmoid(x) + 0.5 * math.tanh(x) + 3 * x)


def testMixtureOfActivationsIsTokenAdaptive():
    moa = afs.makeActivation("moa", 4, inputDim=2)
    h = torch.tensor([[-1.0, 0.5, 2.0, -3.0], [-1.0, 0.5, 2.0, -3.0]])
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the two tokens' MLP inputs
    uniform = sum(phi for phi in afs.dictionaryActivations(h)) / 5
    torch.testing.assert_close(moa(h, u), uniform)  # zero gate: the uniform mixture
    with torch.no_grad():
        moa.gateWeight.zero_()
        moa.gateWeight[0, 0] = 50.0  # token 0 -> relu
        moa.gateWeight[3, 1] = 50.0  # token 1 -> tanh
    out = moa(h, u)
    torch.testing.assert_close(out[0], F.relu(h[0]))
    torch.testing.assert_close(out[1], torch.tanh(h[1]))
    assert afs.MIX_DICTIONARY == ("relu", "gelu", "silu", "tanh", "identity")


def testEveryNameMakesAModule():
    for name in ELEMENTWISE + afs.MLP_INPUT_TYPES:
        module = afs.makeActivation(name, 8, inputDim=4)
        assert afs.isLearnable(module) == isLearnableAf(name), name
        assert (name in afs.FIXED_TYPES) != afs.isLearnable(module), name
    with pytest.raises(ValueError, match="unknown activation"):
        afs.makeActivation("geglu", 8)  # a gated MLP, not an AF
    with pytest.raises(ValueError, match="inputDim"):
        afs.makeActivation("moa", 8)


@pytest.mark.parametrize("name", ELEMENTWISE + afs.MLP_INPUT_TYPES)
def testGradientsAreFinite(name):
    torch.manual_seed(0)
    module = afs.makeActivation(name, 16, inputDim=8)
    x = (torch.randn(3, 16) * 8).requires_grad_()  # well outside [-3, 3], where the polynomials grow fastest
    y = module(x, torch.randn(3, 8)) if name in afs.MLP_INPUT_TYPES else module(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in module.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("module", [afs.Swish(), afs.LGELU(), afs.CRReLU(), afs.Rational(), afs.PolyReLU(),
                                    afs.PolyNorm(), afs.LearnableActivation(), afs.PReLU(4)],
                         ids=lambda m: type(m).__name__)
def testGradcheck(module):
    module = module.double()
    x = torch.tensor([[-2.3, -0.7, 0.4, 1.9], [0.9, -1.2, 2.6, -0.1]], dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())
    names = [name for name, _ in module.named_parameters()]

    def f(x, *values):
        return torch.func.functional_call(module, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def testEvaluateOnGridForPlots():
    xs, ys = afs.evaluateOnGrid(afs.PReLU(3), nPoints=11)
    assert xs.shape == (11,) and ys.shape == (3, 11)
    torch.testing.assert_close(ys[1], torch.where(xs >= 0, xs, 0.25 * xs))
    xs, ys = afs.evaluateOnGrid(afs.Swish(), nPoints=11)
    torch.testing.assert_close(ys, F.silu(xs))


# ----------------------------------------------------------------------------------------------
# Gated and KAN MLPs


def testGatedMlpFormulaAndParameterCount():
    assert gatedHiddenWidth(256) == 704 and gatedHiddenWidth(32) == 64
    mlp = GatedMlp(nModels=1, dimEmb=256, hidden=704, zeroInit=True)
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 256 * 704 == 540_672  # plain MLP: 8 * 256^2 = 524,288
    assert not mlp(torch.randn(1, 2, 3, 256), F.silu, None, 0).any()  # zero-initialised projection

    torch.manual_seed(0)
    mlp = GatedMlp(nModels=2, dimEmb=8, hidden=64, zeroInit=False)
    x = torch.randn(2, 1, 5, 8)
    for m in range(2):
        gate, value = x[m] @ mlp.fc[m, :64].T, x[m] @ mlp.fc[m, 64:].T
        torch.testing.assert_close(mlp(x, F.gelu, None, 0)[m], (F.gelu(gate) * value) @ mlp.proj[m].T)


def testBSplineBasis():
    grid = torch.arange(-3, 9, dtype=torch.float32)  # uniform, step 1
    inside = torch.linspace(0, 4.999, 50)  # where a full set of cubic bases overlaps
    bases = bSplineBasis(inside, grid, 3)
    assert bases.shape == (50, len(grid) - 4)
    assert (bases >= 0).all()
    torch.testing.assert_close(bases.sum(-1), torch.ones(50))  # partition of unity
    # At a knot the uniform cubic B-spline takes the values 1/6, 2/3, 1/6.
    atKnot = bSplineBasis(torch.tensor([2.0]), grid, 3)[0]
    torch.testing.assert_close(atKnot[atKnot > 0], torch.tensor([1 / 6, 2 / 3, 1 / 6]))


def testKanLayerFormulaAndParameterCount():
    assert kanHiddenWidth(256, 5, 3) == 112
    mlp = KanMlp(nModels=1, dimEmb=256, hidden=112, gridSize=5, splineOrder=3, zeroInit=True)
    nParams = sum(p.numel() for p in mlp.parameters())
    assert nParams == 2 * 256 * 112 * (5 + 3 + 1) == 516_096  # plain MLP: 524,288

    torch.manual_seed(0)
    layer = KanLayer(nModels=2, inDim=3, outDim=2, gridSize=4, splineOrder=2, gridRange=2.0, zeroInit=False)
    torch.testing.assert_close(layer.grid, torch.arange(-2, 7, dtype=torch.float32) - 2.0)  # step 1, 2 extra each side
    x = torch.randn(2, 1, 4, 3)
    y = layer(x, F.silu, 0)
    for m in range(2):
        spline = layer.splineWeight[m].view(2, 3, 6)  # [out, in, bases]
        for t in range(4):
            for o in range(2):
                expected = sum(layer.baseWeight[m, o, i] * F.silu(x[m, 0, t, i])
                               + (spline[o, i] * bSplineBasis(x[m, 0, t, i:i + 1], layer.grid, 2)[0]).sum()
                               for i in range(3))
                torch.testing.assert_close(y[m, 0, t, o], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, hidden", [("geglu", 704), ("swiglu", 704), ("reglu", 704), ("kan", 112)])
def testGptMlpVariants(name, hidden):
    model = GPT(vocabSize=128, nLayers=2, nHeads=4, dimEmb=256, nModels=2, afMlp=name)
    mlpParams = sum(p.numel() for p in model.blocks[0].mlp.parameters()) // 2
    assert mlpParams == (3 * 256 * hidden if name != "kan" else 2 * 256 * hidden * 9)
    assert abs(mlpParams - 8 * 256 ** 2) / (8 * 256 ** 2) < 0.04
    assert model.afParameters() == []  # their weights are per-model weights, trained with lr
    tokens = torch.randint(0, 128, (2, 1, 9))
    loss, _ = model(tokens[..., :-1], tokens[..., 1:])
    loss.sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].mlp.parameters())


def testLearnedAfsAreSharedLikeTheSpline():
    model = GPT(vocabSize=64, nLayers=3, nHeads=2, dimEmb=16, nModels=3, afMlp="moa", afAtt="prelu",
                afLayerSpecific=0)
    assert len(model.mlpAfs) == 1 and len(model.attAfs) == 1
    assert model.attAfs[0].slope.shape == (16,)
    assert model.mlpAfs[0].gateWeight.shape == (5, 16)  # the gate reads the MLP input (dimEmb)
    afIds = {id(p) for p in model.afParameters()}
    assert afIds == {id(p) for p in list(model.mlpAfs.parameters()) + list(model.attAfs.parameters())}
    assert all(p.shape[0] == 3 for p in model.weightParameters())
    perLayer = GPT(vocabSize=64, nLayers=3, nHeads=2, dimEmb=16, afMlp="rational", afLayerSpecific=1)
    assert len(perLayer.mlpAfs) == 3


# ----------------------------------------------------------------------------------------------
# Flags and training


def testValidateAfTypes():
    def hp(afType, **flags):
        return Hyperparameters(afType=afType, runName="x", **flags)

    with pytest.raises(ConfigError, match="'att-geglu' exists only in the MLP"):
        checkFlags(hp("gelu;att-geglu"))
    with pytest.raises(ConfigError, match="'att-moa' exists only in the MLP"):
        checkFlags(hp("gelu;att-moa"))
    with pytest.raises(ConfigError, match="unknown MLP activation 'bogus'"):
        checkFlags(hp("bogus"))
    with pytest.raises(ConfigError, match="--kanGridSize"):
        checkFlags(hp("kan", kanGridSize=0))
    learnable, _ = checkFlags(hp("prelu;att-linear"))
    assert learnable.afLr == 0.1 and learnable.afLayerSpecific == 1
    assert learnable.saveAfEvery == -1  # ptAf files hold splines only
    gated, forced = checkFlags(hp("swiglu"))
    assert "afLr=0 and afLayerSpecific=0 (no learnable AF)" in forced
    assert gated.afLr == 0


@pytest.mark.parametrize("name", ELEMENTWISE + MLP_ONLY)
def testEveryNameTrains(name, tinyData, tmp_path, capsys):
    afType = f"{name};att-linear" if name in MLP_ONLY else f"{name};att-{name}"
    argv = tinyFlags(tinyData, tmp_path, runName="z", afType=afType, nSteps=4, nStepsWarmup=1, nStepsCooldown=1,
                     valEvery=0)
    assert main(argv) == 0, capsys.readouterr().err
    with open(tmp_path / "log-z.txt") as f:
        log = f.read()
    assert "Step 4/4   lossVa" in log
    final = float(log.split("Step 4/4   lossVa ")[1].split()[0])
    assert math.isfinite(final)


@pytest.mark.parametrize("afType, nTiles", [("prelu;att-rational", 2), ("polynorm", 1), ("swiglu", 0), ("moa", 0)])
def testLearnedShapesArePlotted(afType, nTiles, tinyData, tmp_path, capsys):
    flags = dict(runName="p", afType=afType, afLayerSpecific=0, nSteps=4, nStepsWarmup=1, nStepsCooldown=1,
                 valEvery=0, plottingLevel=1)
    hp, given = parseArgs(tinyFlags(tinyData, tmp_path / "tiles", **flags))
    trainer = Trainer(hp, given).setup()
    tiles = runOutputs.afTiles(trainer.model, trainer.startValues, None, trainer.afInputRange, 0)
    assert len(tiles) == nTiles
    for tile in tiles:  # sampled curves: x grid [K], values [K] or [C, K] for per-channel AFs
        assert tile["curve"] and tile["values"].shape[-1] == tile["knots"].shape[0]
    if afType.startswith("prelu"):
        assert tiles[0]["name"] == "MLP prelu (all layers)" and tiles[0]["values"].shape == (128, 1001)
    assert main(tinyFlags(tinyData, tmp_path, **flags)) == 0, capsys.readouterr().err
    assert len(glob.glob(os.path.join(tmp_path, "af-p-*.png"))) == (1 if nTiles else 0)
    assert not glob.glob(os.path.join(tmp_path, "ptAf-*"))  # non-spline AFs are saved in model checkpoints only
