"""Activation functions for LM-AFs: the learnable linear spline (shared or one per channel) and fixed AFs.

Importable on its own with torch alone:

    from activationFunctions import Spline
    af = Spline(nKnots=64, knotRange=15.0, init=-1)   # starts as the identity on [-15, 15]
    y = af(x)                                          # any shape; gradients to x and af.values

The math
--------
Knots t_k = -R + k*h, k = 0..K-1, h = 2R/(K-1), evenly spaced, float32, not trained.
Values v_k: one trained number per knot (or a [C, K] matrix, one spline per channel of the last dim).
For an input x, u = clamp((x + R)/h, 0, K-1), i = min(floor(u), K-2), w = u - i and
    f(x) = v_i + w * (v_{i+1} - v_i)
so f interpolates linearly between knots and stays constant at v_0 / v_{K-1} outside [-R, R].
Because knots are uniform the interval is found by arithmetic, not by a search.
    df/dx   = (v_{i+1} - v_i) / h  inside [-R, R], 0 outside
    df/dv_i = 1 - w,  df/dv_{i+1} = w
Initialisation: every value = init (0.01 by default: a near-zero function the training shapes),
or init = -1: values = knot positions, i.e. the identity on [-R, R].
The interpolation is computed in float32 whatever the input dtype; the output has the input's dtype.
On CUDA the forward and backward run as Triton kernels (splineKernel.py) when Triton is present;
elsewhere as the PyTorch code below, which the kernels are tested against.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

SPLINE_TYPES = ("spline", "splinePerDim")
FIXED_TYPES = ("linear", "gelu", "relu", "relu2")


# ----------------------------------------------------------------------------------------------
# The spline as a pure function


def _computeDtype(x):
    # float32 for float32/bf16/fp16 inputs; float64 inputs keep float64 (gradcheck needs it)
    return torch.promote_types(x.dtype, torch.float32)


def _splineCoordinates(x, nKnots, knotMin, invStep):
    """Interval index i (int64), weight w and the in-range mask of every element (w in float32, or float64)."""
    uRaw = (x.to(_computeDtype(x)) - knotMin) * invStep
    u = uRaw.clamp(0.0, nKnots - 1)
    # A NaN input gets a valid index (no out-of-bounds gather) and a NaN weight, so NaN propagates.
    index = torch.nan_to_num(u, nan=0.0).floor().clamp_(max=nKnots - 2)
    weight = u - index
    inside = (uRaw >= 0) & (uRaw <= nKnots - 1)
    return index.long(), weight, inside


def _flatValueIndex(index, values):
    """Index into values.view(-1): per-channel splines offset each element by its channel's row."""
    if values.dim() == 1:
        return index
    nChannels, nKnots = values.shape
    channel = torch.arange(nChannels, device=index.device)
    return index + channel * nKnots


def splineForwardTorch(x, values, knotMin, invStep):
    nKnots = values.shape[-1]
    index, weight, _ = _splineCoordinates(x, nKnots, knotMin, invStep)
    flatValues = values.to(weight.dtype).reshape(-1)
    flatIndex = _flatValueIndex(index, values)
    left = flatValues[flatIndex]
    right = flatValues[flatIndex + 1]
    return (left + weight * (right - left)).to(x.dtype)


def splineBackwardTorch(gradOut, x, values, knotMin, invStep):
    """Gradients to x and to the values, recomputing the coordinates instead of storing them."""
    nKnots = values.shape[-1]
    index, weight, inside = _splineCoordinates(x, nKnots, knotMin, invStep)
    flatValues = values.to(weight.dtype).reshape(-1)
    flatIndex = _flatValueIndex(index, values)
    left = flatValues[flatIndex]
    right = flatValues[flatIndex + 1]
    grad = gradOut.to(weight.dtype)
    gradX = torch.where(inside, grad * (right - left) * invStep, 0.0).to(x.dtype)
    gradValues = torch.zeros(values.numel(), dtype=weight.dtype, device=values.device)
    flatIndex = flatIndex.reshape(-1)
    gradValues.index_add_(0, flatIndex, (grad * (1.0 - weight)).reshape(-1))
    gradValues.index_add_(0, flatIndex + 1, (grad * weight).reshape(-1))
    return gradX, gradValues.view(values.shape).to(values.dtype)


_tritonBroken = []  # the first failure of the Triton path, after which the PyTorch path is used


def _tritonUsable(x, values):
    if _tritonBroken or not x.is_cuda or values.dim() != 1 or values.dtype != torch.float32:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    try:
        import splineKernel  # optional: Triton is only needed on CUDA
    except ImportError:
        return False
    return values.numel() <= splineKernel.MAX_KNOTS


def _disableTriton(err):
    """A Triton version the kernels were not written for must not stop training: warn once, use PyTorch."""
    import warnings
    _tritonBroken.append(err)
    warnings.warn(f"spline Triton kernel failed ({type(err).__name__}: {err}); using the PyTorch implementation")


@torch.library.custom_op("lmafs::spline_forward", mutates_args=())
def _splineForwardOp(x: torch.Tensor, values: torch.Tensor, knotMin: float, invStep: float) -> torch.Tensor:
    if _tritonUsable(x, values):
        from splineKernel import splineForwardTriton
        try:
            return splineForwardTriton(x, values, knotMin, invStep)
        except Exception as err:  # compile errors of other Triton versions have many types
            _disableTriton(err)
    return splineForwardTorch(x, values, knotMin, invStep)


@_splineForwardOp.register_fake
def _(x, values, knotMin, invStep):
    return torch.empty_like(x)


@torch.library.custom_op("lmafs::spline_backward", mutates_args=())
def _splineBackwardOp(gradOut: torch.Tensor, x: torch.Tensor, values: torch.Tensor, knotMin: float,
                      invStep: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _tritonUsable(x, values):
        from splineKernel import splineBackwardTriton
        try:
            gradX, gradValues = splineBackwardTriton(gradOut, x, values, knotMin, invStep)
            return gradX, gradValues.to(values.dtype)
        except Exception as err:
            _disableTriton(err)
    return splineBackwardTorch(gradOut, x, values, knotMin, invStep)


@_splineBackwardOp.register_fake
def _(gradOut, x, values, knotMin, invStep):
    return torch.empty_like(x), torch.empty_like(values)


def _setupSplineContext(ctx, inputs, output):
    x, values, knotMin, invStep = inputs
    ctx.save_for_backward(x, values)
    ctx.knotMin, ctx.invStep = knotMin, invStep


def _splineBackwardRule(ctx, gradOut):
    x, values = ctx.saved_tensors
    gradX, gradValues = _splineBackwardOp(gradOut.contiguous(), x, values, ctx.knotMin, ctx.invStep)
    return gradX, gradValues, None, None


_splineForwardOp.register_autograd(_splineBackwardRule, setup_context=_setupSplineContext)


def splineActivation(x, values, knotMin, knotStep):
    """Linear spline on uniform knots knotMin + k*knotStep; values [K] shared, or [C, K] per channel (last dim of x).

    Differentiable w.r.t. x and values; stores only x and values for the backward pass.
    """
    if values.dim() == 2 and x.shape[-1] != values.shape[0]:
        raise ValueError(f"per-channel spline has {values.shape[0]} channels but the input's last dim is {x.shape[-1]}")
    return _splineForwardOp(x.contiguous(), values, float(knotMin), 1.0 / float(knotStep))


def splineReference(x, values, knotMin, knotStep):
    """The same function through plain autograd (gather + lerp): the reference the fast paths are tested against."""
    nKnots = values.shape[-1]
    index, weight, _ = _splineCoordinates(x, nKnots, knotMin, 1.0 / knotStep)
    flatIndex = _flatValueIndex(index, values)
    flatValues = values.to(weight.dtype).reshape(-1)
    left, right = flatValues[flatIndex], flatValues[flatIndex + 1]
    return (left + weight * (right - left)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Modules


def uniformKnots(nKnots, knotRange):
    return torch.linspace(-knotRange, knotRange, nKnots, dtype=torch.float32)


class Spline(nn.Module):
    """Learnable linear spline on nKnots uniform knots in [-knotRange, knotRange]; constant outside.

    channels=None: one spline for every element; channels=C: one spline per channel of the last dim.
    Shapes: x [..., C] -> y [..., C]; values [K] or [C, K].
    """

    def __init__(self, nKnots=64, knotRange=15.0, init=0.01, channels=None):
        super().__init__()
        if not isinstance(nKnots, int) or nKnots < 2:
            raise ValueError(f"nKnots must be an integer >= 2, got {nKnots!r}")
        if not knotRange > 0:
            raise ValueError(f"knotRange must be > 0, got {knotRange!r}")
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be None or >= 1, got {channels!r}")
        self.channels = channels
        self.register_buffer("knots", uniformKnots(nKnots, knotRange))
        shape = (nKnots,) if channels is None else (channels, nKnots)
        self.values = nn.Parameter(torch.empty(shape, dtype=torch.float32))
        self.init = init
        self._setGrid(-float(knotRange), 2.0 * float(knotRange) / (nKnots - 1))
        self.reset_parameters()

    def _setGrid(self, knotMin, knotStep):
        self.knotMin, self.knotStep = knotMin, knotStep

    def reset_parameters(self):
        with torch.no_grad():
            if self.init == -1:
                self.values.copy_(self.knots.expand_as(self.values))
            else:
                self.values.fill_(self.init)

    @property
    def nKnots(self):
        return self.knots.numel()

    @property
    def knotRange(self):
        return -self.knotMin

    def forward(self, x):
        return splineActivation(x, self.values, self.knotMin, self.knotStep)

    def loadValues(self, values, knots=None, freeze=True):
        """Copy learned values (and their knots, which must be uniform) into this spline.

        A single spline's values [K] are broadcast to every channel of a per-channel spline.
        freeze=True stops gradients to the values.
        """
        values = torch.as_tensor(values, dtype=torch.float32)
        if knots is not None:
            knots = torch.as_tensor(knots, dtype=torch.float32).reshape(-1)
            checkUniformKnots(knots)
            if knots.numel() != values.shape[-1]:
                raise ValueError(f"{knots.numel()} knots but {values.shape[-1]} values per spline")
        else:
            knots = self.knots
        targetShape = (knots.numel(),) if self.channels is None else (self.channels, knots.numel())
        if values.shape != targetShape:
            if self.channels is not None and values.dim() == 1:
                values = values.expand(targetShape)
            else:
                raise ValueError(f"values of shape {tuple(values.shape)} do not fit a spline of shape {targetShape}")
        device = self.values.device
        self.knots = knots.to(device)
        self.values = nn.Parameter(values.clone().to(device), requires_grad=not freeze)
        self._setGrid(float(knots[0]), float(knots[-1] - knots[0]) / (knots.numel() - 1))
        return self

    def _load_from_state_dict(self, stateDict, prefix, *args, **kwargs):
        # The knot count and range may differ from the constructor's (a spline learned elsewhere): adopt them.
        knots = stateDict.get(prefix + "knots")
        values = stateDict.get(prefix + "values")
        if knots is not None and values is not None and knots.shape != self.knots.shape:
            self.loadValues(values, knots, freeze=not self.values.requires_grad)
        super()._load_from_state_dict(stateDict, prefix, *args, **kwargs)
        if knots is not None:
            self._setGrid(float(self.knots[0]), float(self.knots[-1] - self.knots[0]) / (self.nKnots - 1))

    @torch.no_grad()
    def evaluateOnGrid(self, nPoints=1001, margin=0.1):
        """(xs, ys) on a 1-D grid covering the knots plus a margin each side; ys [nPoints] or [C, nPoints]."""
        span = 2.0 * self.knotRange
        xs = torch.linspace(-self.knotRange - margin * span, self.knotRange + margin * span, nPoints,
                            device=self.values.device)
        if self.channels is None:
            return xs, self(xs)
        ys = self(xs[:, None].expand(nPoints, self.channels).contiguous())
        return xs, ys.t()

    def extra_repr(self):
        perChannel = "" if self.channels is None else f", channels={self.channels}"
        return f"nKnots={self.nKnots}, knotRange={self.knotRange:g}{perChannel}, trainable={self.values.requires_grad}"


class SplinePerDim(Spline):
    """One learnable linear spline per channel (last dim of the input)."""

    def __init__(self, channels, nKnots=64, knotRange=15.0, init=0.01):
        super().__init__(nKnots=nKnots, knotRange=knotRange, init=init, channels=channels)


def checkUniformKnots(knots):
    steps = knots[1:] - knots[:-1]
    if knots.numel() < 2 or not bool((steps > 0).all()):
        raise ValueError("spline knots must be increasing")
    if float((steps - steps.mean()).abs().max()) > 1e-4 * float(steps.mean()) + 1e-6:
        raise ValueError("spline knots must be evenly spaced")


class ReLU2(nn.Module):
    """relu(x)^2 (Primer, So et al. 2021)."""

    def forward(self, x):
        return F.relu(x).square()


def makeActivation(name, channels, nKnots=64, knotRange=15.0, init=0.01):
    """The AF module called `name` for inputs with `channels` channels in the last dim."""
    if name == "spline":
        return Spline(nKnots=nKnots, knotRange=knotRange, init=init)
    if name == "splinePerDim":
        return SplinePerDim(channels, nKnots=nKnots, knotRange=knotRange, init=init)
    if name == "linear":
        return nn.Identity()
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    if name == "relu2":
        return ReLU2()
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(SPLINE_TYPES + FIXED_TYPES)}")


def isLearnable(module):
    return any(True for _ in module.parameters())


def evaluateOnGrid(module, nPoints=1001, xMin=-5.0, xMax=5.0):
    """(xs, ys) of any 1-D AF module on a grid (splines choose their own range)."""
    if isinstance(module, Spline):
        return module.evaluateOnGrid(nPoints)
    xs = torch.linspace(xMin, xMax, nPoints)
    with torch.no_grad():
        return xs, module(xs)


__all__ = ["Spline", "SplinePerDim", "ReLU2", "makeActivation", "splineActivation", "splineReference",
           "uniformKnots", "checkUniformKnots", "isLearnable", "evaluateOnGrid", "SPLINE_TYPES", "FIXED_TYPES"] 
