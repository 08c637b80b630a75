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
or init = -1: values = knot positions, i.e. the identity on [-R, R], or init = the name of a fixed AF
(FIXED_TYPES, e.g. "relu2"): values = that AF at the knots (and constant outside, as always).
Smoothness (splineSmoothness): sum_k (v_{k+1} - 2 v_k + v_{k-1})^2 / h^3, the discretised integral of f''(x)^2 over
[-R, R], so a curve scores the same whatever the knot count.
The interpolation is computed in float32 whatever the input dtype; the output has the input's dtype.
On CUDA the forward and backward run as Triton kernels (lmafs/network/splineKernel.py), each chosen from what the installed
Triton offers; elsewhere, and for any kernel that fails, as the PyTorch code below. splineBackends(device) tells
which runs. Both are tested against splineReference.

replaceActivations(model, afFile=..., match=...) swaps the activation modules of any PyTorch model (a Hugging Face
transformers model included) for splines: fresh ones or the MLP splines a ptAf file of phase I holds. The ptAf
files are read here too (readAfFile), so that this works with this module alone; afFiles writes them.

Besides the spline: fixed AFs (FIXED_TYPES), elementwise AFs with a few trained parameters
(LEARNABLE_TYPES) and the token-adaptive mixture `moa` (MLP only); each class names its formula and paper.
"""
import csv
import functools
import glob
import importlib
import itertools
import os
import pickle
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

SPLINE_TYPES = ("spline", "splinePerDim")
FIXED_TYPES = ("linear", "gelu", "relu", "relu2", "silu", "tanh", "elu", "selu", "softplus")
# Elementwise AFs with a few trained parameters (besides the splines); usable in the MLP and before QKV.
LEARNABLE_TYPES = ("prelu", "swish", "lgelu", "crrelu", "rational", "polyrelu", "polynorm", "la")
# AFs that read the MLP's input as well as its hidden activations, so they exist only inside the MLP.
MLP_INPUT_TYPES = ("moa",)


# ----------------------------------------------------------------------------------------------
# The spline as a pure function


def _computeDtype(x):
    # float32 for float32/bf16/fp16 inputs; float64 inputs keep float64 (gradcheck needs it)
    return torch.promote_types(x.dtype, torch.float32)


def _splineCoordinates(x, nKnots, knotMin, invStep):
    """Interval index i (int64), weight w and the in-range mask of every element (w in float32, or float64)."""
    uRaw = (x.to(_computeDtype(x)) - knotMin) * invStep
    inside = (uRaw >= 0) & (uRaw <= nKnots - 1)
    # The end knots belong to the range (slope of the end interval, as the fast paths): clamp's own gradient there is
    # 1 up to torch 2.14 and 0 from 2.15, so inside values bypass it
    u = torch.where(inside, uRaw, uRaw.clamp(0.0, nKnots - 1))
    # A NaN input gets a valid index (no out-of-bounds gather) and a NaN weight, so NaN propagates.
    index = torch.nan_to_num(u, nan=0.0).floor().clamp_(max=nKnots - 2)
    weight = u - index
    return index.long(), weight, inside


def _flatValueIndex(index, values):
    """Index into values.view(-1): per-channel splines offset each element by its channel's row."""
    if values.dim() == 1:
        return index
    nChannels, nKnots = values.shape
    return index + torch.arange(0, nChannels * nKnots, nKnots, dtype=index.dtype, device=index.device)


def _knotPosition(x, knotMin, invStep):
    """u = (x - knotMin) / h in the compute dtype, as a new tensor the caller may overwrite."""
    if x.dtype == _computeDtype(x):
        return torch.sub(x, knotMin).mul_(invStep)
    return x.to(_computeDtype(x)).sub_(knotMin).mul_(invStep)


def _knotIndex(u, values):
    """Flat int32 index into values.view(-1) of knot floor(u), for u (1-D) clamped to [0, K-1]."""
    # floor(u) = K-1 only at the right end, where the weight u.frac() is 0: the tables below read v_{K-1} there
    # (and, for the backward, the last interval's slope), so no clamp to K-2 and no mixed int-float weight.
    # Whatever integer a NaN converts to, the clamp keeps it in range; its weight stays NaN, so NaN still reaches
    # y and the knot gradients.
    index = u.to(torch.int32).clamp_(0, values.shape[-1] - 1)
    if values.dim() == 1:
        return index
    return _flatValueIndex(index.view(-1, values.shape[0]), values).view(-1)


# The PyTorch path below is the one every CPU run takes, so it is written for few passes over memory: 1-D int32
# indices, in-place arithmetic into as few fresh tensors as possible (on a CPU, writing a fresh tensor costs 2-3
# in-place passes), one gather per table, no comparison producing a bool tensor (several times slower than one
# producing floats), and, on one thread, long inputs taken in chunks whose temporaries stay in cache.
_CHUNK = 1 << 17  # elements per chunk: 2.6x faster than one pass over 8M elements, as fast as 2**16 (2-core Xeon)


def _chunks(n, values):
    """Slices of a flat input of n elements; a per-channel spline's chunks start at channel 0."""
    # With several threads every operation on a chunk is a parallel region that waits for all threads, and on a
    # busy machine a descheduled thread stalls each one: on the shared 2-core Xeon, 8M elements took 20 s in chunks,
    # 0.7 s in one pass. A GPU (the fallback for a failed kernel) takes one chunk too: launches would limit it.
    if values.device.type != "cpu" or torch.get_num_threads() > 1:
        return [slice(0, n)]
    step = _CHUNK if values.dim() == 1 else max(1, _CHUNK // values.shape[0]) * values.shape[0]
    return [slice(start, start + step) for start in range(0, n, step)]


def _forwardChunk(x, values, table, slope, knotMin, invStep, y):
    weight = _knotPosition(x, knotMin, invStep).clamp_(0.0, values.shape[-1] - 1)
    index = _knotIndex(weight, values)
    right = slope.index_select(0, index).mul_(weight.frac_())
    # weight is spent: the second gather reuses its memory
    torch.add(right, torch.index_select(table, 0, index, out=weight), out=y)


def splineForwardTorch(x, values, knotMin, invStep):
    table = values.to(_computeDtype(x))
    slope = torch.diff(table, dim=-1, append=table[..., -1:]).view(-1)
    xFlat = x.reshape(-1)
    y = torch.empty_like(xFlat)
    for part in _chunks(xFlat.numel(), values):
        _forwardChunk(xFlat[part], values, table.view(-1), slope, knotMin, invStep, y[part])
    return y.view(x.shape)


def _backwardChunk(gradOut, x, values, slope, knotMin, invStep, gradX):
    """Writes the chunk's gradX; returns its interval sums of g and of g w."""
    position = _knotPosition(x, knotMin, invStep)
    weight = position.clamp(0.0, values.shape[-1] - 1)
    inside = torch.eq(position, weight, out=position)  # 1.0 on [knotMin, knotMax], 0.0 outside and for NaN
    index = _knotIndex(weight, values)
    grad = gradOut.to(weight.dtype)
    # bincount: a serial sum in element order, like index_add_ but faster on CPU
    gradSums = torch.bincount(index, grad, minlength=values.numel())
    rightSums = torch.bincount(index, weight.frac_().mul_(grad), minlength=values.numel())
    torch.mul(torch.index_select(slope, 0, index, out=weight).mul_(grad), inside, out=gradX)
    return gradSums, rightSums


def splineBackwardTorch(gradOut, x, values, knotMin, invStep):
    """Gradients to x and to the values, recomputing the coordinates instead of storing them."""
    table = values.to(_computeDtype(x))
    slope = torch.diff(table, dim=-1)
    # the extra last slope is read only at the right end, which belongs to the last interval
    slope = torch.cat([slope, slope[..., -1:]], dim=-1).mul_(invStep).view(-1)
    xFlat, gradFlat = x.reshape(-1), gradOut.reshape(-1)
    gradX = torch.empty_like(xFlat)
    gradSums = torch.zeros(values.numel(), dtype=table.dtype, device=x.device)
    rightSums = torch.zeros_like(gradSums)
    for part in _chunks(xFlat.numel(), values):
        chunkGradSums, chunkRightSums = _backwardChunk(gradFlat[part], xFlat[part], values, slope, knotMin, invStep,
                                                       gradX[part])
        gradSums += chunkGradSums
        rightSums += chunkRightSums
    # knot k gets sum g (1 - w) over its interval plus sum g w over the one before
    gradValues = gradSums.sub_(rightSums)
    gradValues[1:] += rightSums[:-1]
    return gradX.view(x.shape), gradValues.view(values.shape).to(values.dtype)


# ----------------------------------------------------------------------------------------------
# Choosing the implementation: Triton kernels where they run, the PyTorch code above elsewhere

_KERNELS = ("forward", "backward")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 would lose precision in float32 kernels
_failedBackends = set()  # (kernel, backend) pairs that raised in this process; they are not tried again


@functools.lru_cache(maxsize=None)
def _kernelCandidates(device):
    """(per kernel the implementations to try on device, fastest first and "torch" last; the kernels' knot limit)."""
    torchOnly = {kernel: ("torch",) for kernel in _KERNELS}, 0
    if device.type != "cuda":
        return torchOnly
    try:  # optional: Triton is only needed on CUDA, and a copy of this file alone runs without the kernels
        splineKernel = importlib.import_module("lmafs.network.splineKernel")
    except ImportError:
        return torchOnly
    offered = splineKernel.kernelBackends(device)
    return {kernel: offered[kernel] + ("torch",) for kernel in _KERNELS}, splineKernel.MAX_KNOTS


def _backend(kernel, device, nKnots, perChannel, dtype):
    candidates, maxKnots = _kernelCandidates(device)
    if perChannel or dtype not in _KERNEL_DTYPES or nKnots > maxKnots:
        return "torch"
    return next(name for name in candidates[kernel] if (kernel, name) not in _failedBackends)


def splineBackends(device, nKnots=64, perChannel=False, dtype=torch.bfloat16):
    """Which implementation runs the spline's forward and backward on device: {"forward": name, "backward": name}.

    Names: "triton-gluon" and "triton-tl" (the Triton kernels of lmafs/network/splineKernel.py, offered by what the installed Triton
    supports) and "torch" (the PyTorch code above). Kernels serve a shared spline (perChannel=False) of at most
    splineKernel.MAX_KNOTS knots with float32, bfloat16 or float16 inputs (dtype) on CUDA; everything else, float64
    included, uses "torch". A kernel that raised earlier in this process is replaced by the next one.
    """
    return {kernel: _backend(kernel, torch.device(device), nKnots, perChannel, dtype) for kernel in _KERNELS}


def _callBackend(kernel, x, values):
    if values.dtype != torch.float32:
        return "torch"
    return _backend(kernel, x.device, values.shape[-1], values.dim() != 1, x.dtype)


def _backendFailed(kernel, x, values, backend, err):
    """A Triton version or GPU the kernels were not written for must not stop training: warn once, use the next one."""
    _failedBackends.add((kernel, backend))
    nextBackend = _callBackend(kernel, x, values)
    lines = [line for line in str(err).splitlines() if line.strip()]
    # compile errors end with the cause, after the kernel source
    warnings.warn(f"spline {kernel} kernel {backend} failed ({type(err).__name__}: {lines[-1] if lines else ''}); "
                  f"the spline {kernel} now uses {nextBackend}")
    return nextBackend


@torch.library.custom_op("lmafs::spline_forward", mutates_args=())
def _splineForwardOp(x: torch.Tensor, values: torch.Tensor, knotMin: float, invStep: float) -> torch.Tensor:
    backend = _callBackend("forward", x, values)
    while backend != "torch":
        from lmafs.network.splineKernel import splineForwardTriton
        try:
            return splineForwardTriton(x, values, knotMin, invStep)
        except torch.OutOfMemoryError:  # the run's memory, not the kernel: the PyTorch path would need more
            raise
        except Exception as err:  # compile errors of other Triton versions have many types
            backend = _backendFailed("forward", x, values, backend, err)
    return splineForwardTorch(x, values, knotMin, invStep)


@_splineForwardOp.register_fake
def _(x, values, knotMin, invStep):
    return torch.empty_like(x)


@torch.library.custom_op("lmafs::spline_backward", mutates_args=())
def _splineBackwardOp(gradOut: torch.Tensor, x: torch.Tensor, values: torch.Tensor, knotMin: float,
                      invStep: float) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _callBackend("backward", x, values)
    while backend != "torch":
        from lmafs.network.splineKernel import splineBackwardTriton
        try:
            gradX, gradValues = splineBackwardTriton(gradOut, x, values, knotMin, invStep, backend=backend)
            return gradX, gradValues.to(values.dtype)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            backend = _backendFailed("backward", x, values, backend, err)
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


class _SplineTorch(torch.autograd.Function):
    """The PyTorch path as a plain autograd.Function: on 1 x 128 x 256 inputs (one model of the CPU quick start),
    the custom op's dispatch added 22-32% to the spline's time (bench/RESULTS.md). torch.compile still sees the
    custom op."""

    @staticmethod
    def forward(ctx, x, values, knotMin, invStep):
        ctx.save_for_backward(x, values)
        ctx.knotMin, ctx.invStep = knotMin, invStep
        return splineForwardTorch(x, values, knotMin, invStep)

    @staticmethod
    def backward(ctx, gradOut):
        x, values = ctx.saved_tensors
        gradX, gradValues = splineBackwardTorch(gradOut, x, values, ctx.knotMin, ctx.invStep)
        return gradX, gradValues, None, None


def splineActivation(x, values, knotMin, knotStep):
    """Linear spline on uniform knots knotMin + k*knotStep; values [K] shared, or [C, K] per channel (last dim of x).

    Differentiable w.r.t. x and values; stores only x and values for the backward pass.
    """
    if values.dim() == 2 and x.shape[-1] != values.shape[0]:
        raise ValueError(f"per-channel spline has {values.shape[0]} channels but the input's last dim is {x.shape[-1]}")
    args = (x.contiguous(), values, float(knotMin), 1.0 / float(knotStep))
    # fake tensors (--preflight's memory estimate) take the custom op too: its fake kernels know the shapes, while
    # the PyTorch path's knot histogram has a data-dependent size
    if x.is_cuda or torch.compiler.is_compiling() or isinstance(x, FakeTensor):
        return _splineForwardOp(*args)
    return _SplineTorch.apply(*args)


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
        if not (isinstance(init, str) and init in FIXED_TYPES or isinstance(init, (int, float))):
            raise ValueError(f"init must be a number (-1: the identity) or a fixed AF's name ({', '.join(FIXED_TYPES)}), "
                             f"got {init!r}")
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
            self.values.copy_(splineInitValues(self.init, self.knots).expand_as(self.values))

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


def splineInitValues(init, knots):
    """A spline's starting values at knots: the constant init, the identity (init -1) or the fixed AF named init."""
    if isinstance(init, str):
        with torch.no_grad():
            return makeActivation(init, None)(knots).float()
    return knots.clone() if init == -1 else torch.full_like(knots, float(init))


def splineSmoothness(spline):
    """The roughness S of a Spline (splineRoughness of its values)."""
    return splineRoughness(spline.values, spline.knotStep)


def splineRoughness(values, knotStep):
    """sum_k (v_{k+1} - 2 v_k + v_{k-1})^2 / h^3 of spline values on knots h apart (the mean over channels of
    per-channel ones): the integral of f''^2 over the knot range, discretised, so that its scale does not depend on
    the knot count."""
    secondDifferences = values[..., 2:] - 2 * values[..., 1:-1] + values[..., :-2]
    return secondDifferences.pow(2).sum(-1).mean() / knotStep ** 3


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


class SiLU(nn.Module):
    """x * sigmoid(x) (SiLU, Elfwing et al. 2018)."""

    def forward(self, x):
        return F.silu(x)


class Tanh(nn.Module):
    """tanh(x) (hyperbolic tangent, LeCun et al. 1998)."""

    def forward(self, x):
        return torch.tanh(x)


class ELU(nn.Module):
    """x for x > 0, exp(x) - 1 otherwise (ELU, Clevert et al. 2016)."""

    def forward(self, x):
        return F.elu(x)


class SELU(nn.Module):
    """lambda * (x if x > 0 else alpha * (exp(x) - 1)), lambda 1.0507, alpha 1.6733 (SELU, Klambauer et al. 2017)."""

    def forward(self, x):
        return F.selu(x)


class Softplus(nn.Module):
    """log(1 + exp(x)) (Softplus, Dugas et al. 2001)."""

    def forward(self, x):
        return F.softplus(x)


# ----------------------------------------------------------------------------------------------
# Learnable elementwise AFs (a few parameters each; shared like the spline)


class PReLU(nn.Module):
    """max(0, x) + a_c * min(0, x), one slope a_c per channel of the last dim, init 0.25 (PReLU, He et al. 2015)."""

    def __init__(self, channels, init=0.25):
        super().__init__()
        if channels is None or channels < 1:
            raise ValueError(f"prelu needs channels >= 1 (one slope per channel), got {channels!r}")
        self.channels = channels
        self.slope = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x):  # x [..., C]
        return torch.where(x >= 0, x, self.slope.to(x.dtype) * x)


class Swish(nn.Module):
    """x * sigmoid(beta * x), learnable beta init 1 (Swish, Ramachandran et al. 2017)."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * torch.sigmoid(self.beta.to(x.dtype) * x)


class LGELU(nn.Module):
    """alpha * GELU(beta * x), learnable output and input scales, init 1 (GELU: Hendrycks & Gimpel 2016)."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.alpha.to(x.dtype) * F.gelu(self.beta.to(x.dtype) * x)


class CRReLU(nn.Module):
    """relu(x) + eps * x * exp(-x^2 / 2), learnable eps init 0.01 (CRReLU, Sun et al. 2024, entropy-based AF search)."""

    def __init__(self, init=0.01):
        super().__init__()
        self.eps = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return F.relu(x) + self.eps.to(x.dtype) * x * torch.exp(-0.5 * x.square())


class Rational(nn.Module):
    """P(x) / (1 + |b1 x + ... + b4 x^4|), P of degree 5, init close to GELU (Pade AU, Molina et al. 2020)."""

    # Least-squares fit of this form to GELU on [-12, 12] (max error 0.025; 0.011 on [-3, 3]). A fit on [-3, 3] only
    # turns back down beyond |x| = 4, where MLP pre-activations do go; this one keeps GELU's shape out there.
    geluNumerator = (6.8536e-3, 0.5, 0.38955, 0.10359, 1.1182e-2, 4.1854e-4)
    geluDenominator = (0.0, 0.20718, 0.0, 8.3707e-4)

    def __init__(self):
        super().__init__()
        self.numerator = nn.Parameter(torch.tensor(self.geluNumerator))
        self.denominator = nn.Parameter(torch.tensor(self.geluDenominator))

    def forward(self, x):
        # float32 at least: x^5 in bfloat16 loses the cancellations between the terms
        xc = x.to(_computeDtype(x))
        a, b = self.numerator.to(xc.dtype), self.denominator.to(xc.dtype)
        p = a[5]
        for k in range(4, -1, -1):  # Horner
            p = p * xc + a[k]
        q = b[3]
        for k in range(2, -1, -1):
            q = q * xc + b[k]
        return (p / (1.0 + (q * xc).abs())).to(x.dtype)


class PolyReLU(nn.Module):
    """a0 + a1 relu(x) + a2 relu(x)^2 + a3 relu(x)^3, init a = (0, 1/3, 1/3, 1/3) (PolyCom, Zhuo et al. 2025)."""

    def __init__(self):
        super().__init__()
        self.coefficients = nn.Parameter(torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))

    def forward(self, x):
        r = F.relu(x)
        a = self.coefficients.to(x.dtype)
        return a[0] + r * (a[1] + r * (a[2] + r * a[3]))


class PolyNorm(nn.Module):
    """a0 + sum_i a_i x^i / rms(x^i), i = 1..3, rms over a token's channels, init a = (0, 1/3, 1/3, 1/3) (PolyCom)."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.coefficients = nn.Parameter(torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))
        self.eps = eps

    def forward(self, x):  # x [..., C]: the normalisation is over the last dim, so its shape is per token
        xc = x.to(_computeDtype(x))
        a = self.coefficients.to(xc.dtype)
        y = a[0]
        for i in range(1, 4):
            y = y + a[i] * F.rms_norm(xc ** i, (x.shape[-1],), eps=self.eps)
        return y.to(x.dtype)


# The dictionary that `la` and `moa` mix; the order fixes the meaning of their weights.
MIX_DICTIONARY = ("relu", "gelu", "silu", "tanh", "identity")


def dictionaryActivations(x):
    return F.relu(x), F.gelu(x), F.silu(x), torch.tanh(x), x


class LearnableActivation(nn.Module):
    """sum_j w_j phi_j(x), phi = (relu, gelu, silu, tanh, identity), w init 1/5 (LA, Token-Adaptive Mixing of AFs, 2025)."""

    def __init__(self):
        super().__init__()
        # The uniform start equals MoA's start (its zero gate gives 1/5 each), so LA and MoA differ only by the gate.
        self.weights = nn.Parameter(torch.full((len(MIX_DICTIONARY),), 1.0 / len(MIX_DICTIONARY)))

    def forward(self, x):
        w = self.weights.to(x.dtype)
        y = 0.0
        for j, phi in enumerate(dictionaryActivations(x)):
            y = y + w[j] * phi
        return y


class MixtureOfActivations(nn.Module):
    """sum_j g_j(u) phi_j(x), g = softmax(W u + c) from the token's MLP input u, W and c init 0 (MoA, same paper)."""

    def __init__(self, inputDim):
        super().__init__()
        if inputDim is None or inputDim < 1:
            raise ValueError(f"moa needs inputDim >= 1 (the width of the MLP input its gate reads), got {inputDim!r}")
        self.inputDim = inputDim
        # A zero gate starts as the uniform mixture; its gradient is not zero, so the tokens' gates still diverge.
        self.gateWeight = nn.Parameter(torch.zeros(len(MIX_DICTIONARY), inputDim))
        self.gateBias = nn.Parameter(torch.zeros(len(MIX_DICTIONARY)))

    def forward(self, x, mlpInput):  # x [..., H] hidden activations, mlpInput [..., D] the same tokens' MLP input
        logits = F.linear(mlpInput.to(self.gateWeight.dtype), self.gateWeight, self.gateBias)
        gates = torch.softmax(logits.float(), dim=-1).to(x.dtype)  # [..., 5]
        y = 0.0
        for j, phi in enumerate(dictionaryActivations(x)):
            y = y + gates[..., j:j + 1] * phi
        return y


_PLAIN_AFS = {"linear": nn.Identity, "gelu": nn.GELU, "relu": nn.ReLU, "relu2": ReLU2, "silu": SiLU, "tanh": Tanh,
              "elu": ELU, "selu": SELU, "softplus": Softplus, "swish": Swish, "lgelu": LGELU, "crrelu": CRReLU,
              "rational": Rational, "polyrelu": PolyReLU, "polynorm": PolyNorm, "la": LearnableActivation}


def makeActivation(name, channels, nKnots=64, knotRange=15.0, init=0.01, inputDim=None):
    """The AF module called `name` for inputs with `channels` channels in the last dim.

    inputDim: width of the MLP input, read by the gate of `moa` (called as af(hidden, mlpInput)).
    """
    if name == "spline":
        return Spline(nKnots=nKnots, knotRange=knotRange, init=init)
    if name == "splinePerDim":
        return SplinePerDim(channels, nKnots=nKnots, knotRange=knotRange, init=init)
    if name == "prelu":
        return PReLU(channels)
    if name == "moa":
        return MixtureOfActivations(inputDim)
    if name in _PLAIN_AFS:
        return _PLAIN_AFS[name]()
    known = SPLINE_TYPES + FIXED_TYPES + LEARNABLE_TYPES + MLP_INPUT_TYPES
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(known)}")


def isLearnable(module):
    return any(True for _ in module.parameters())


def evaluateOnGrid(module, nPoints=1001, xMin=-5.0, xMax=5.0):
    """(xs, ys) of any 1-D AF module on a grid (splines choose their own range); ys [C, nPoints] for per-channel AFs.

    polynorm normalises over a token's channels, so its curve here is that of the grid taken as one token.
    """
    if isinstance(module, Spline):
        return module.evaluateOnGrid(nPoints)
    device = next(module.parameters(), torch.empty(0, device="cpu")).device
    xs = torch.linspace(xMin, xMax, nPoints, device=device)
    channels = getattr(module, "channels", None)
    with torch.no_grad():
        if channels is None:
            return xs, module(xs)
        return xs, module(xs[:, None].expand(nPoints, channels).contiguous()).t()


# ----------------------------------------------------------------------------------------------
# Learned AFs in any PyTorch model


def _matcher(match):
    """match as a function (name, module) -> bool: classes by isinstance, a string as a regular expression searched in
    the module's qualified name or matching its class name in full, or a function of (name, module) itself."""
    if isinstance(match, type) or isinstance(match, tuple) and all(isinstance(m, type) for m in match):
        return lambda name, module: isinstance(module, match)
    if isinstance(match, str):
        pattern = re.compile(match)
        return lambda name, module: bool(pattern.search(name) or pattern.fullmatch(type(module).__name__))
    if callable(match):
        return match
    raise ValueError(f"match must be a module class, a tuple of classes, a regular expression for module names or a "
                     f"function (name, module) -> bool, got {match!r}")


def _matchedSites(model, match):
    """Qualified names of the modules match selects, in module order; a module inside a selected one is not a site."""
    isSite = _matcher(match)
    sites = []
    for name, module in model.named_modules():
        if name and not any(name.startswith(site + ".") for site in sites) and isSite(name, module):
            sites.append(name)
    return sites


def _describeCandidates(model):
    """The parameter-free leaf modules (where activation functions are), by class: what match could name."""
    counts = {}
    for name, module in model.named_modules():
        isLeaf = not any(True for _ in module.children())
        if name and isLeaf and not any(True for _ in module.parameters(recurse=False)):
            counts.setdefault(type(module).__name__, []).append(name)
    if not counts:
        return "none"
    # the likeliest activation first, and as the example
    ordered = sorted(counts.items(), key=lambda item: not re.search(r"act|elu|tanh|sigmoid|swish", item[0], re.I))
    return "; ".join(f"{cls} x{len(names)} ({names[0]}{', ...' if len(names) > 1 else ''})"
                     for cls, names in ordered) + f'; e.g. match="{ordered[0][0]}"'


# ----------------------------------------------------------------------------------------------
# Reading ptAf files: here rather than in afFiles (which writes them and loads them into this repo's model), so
# that replaceActivations(afFile=...) needs only this module and afFiles depends on it, not the reverse.

FORMAT = "lm-afs ptAf 1"


class AfFileError(Exception):
    """A learned-AF file that cannot be used; the message is one line for the user."""


def safeTorchLoad(path, what):
    """torch.load with weights_only=True; every failure becomes one clear line."""
    if not os.path.isfile(path):
        raise AfFileError(f"{what} {path!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error line says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AfFileError(f"{what} {path!r} holds objects other than plain tensors and values; refusing to load it "
                          "(unpickling them could run code)") from None
    except Exception:  # torch raises many types for damaged files
        raise AfFileError(f"{what} {path!r} is not a readable PyTorch file (damaged, truncated or another format)"
                          ) from None


def readAfFile(path):
    """Read a ptAf .pt or .csv file into {'knots', 'mlpValues', 'attValues', 'afTypeMlp', 'afTypeAtt', 'scoreKnots',
    'scoreValues', 'afTypeScore', 'nLayers', 'rows'}; .csv files leave the types and layer count to be inferred
    (None) and keep 'rows' and their 'rowKnots'. Files from before score splines read as having none."""
    if path.endswith(".csv"):
        return readAfCsv(path)
    data = safeTorchLoad(path, "afFileToLoad")
    if isinstance(data, dict) and data.get("format") != FORMAT:
        data = interpretOtherAfDict(data, path)
    if not isinstance(data, dict):
        raise AfFileError(f"afFileToLoad {path!r} is not a ptAf file (expected a dict of knots and spline values)")
    knots, scoreKnots = data["knots"], data.get("scoreKnots")
    if knots is None and scoreKnots is None:
        raise AfFileError(f"afFileToLoad {path!r} holds no spline AFs")
    try:
        for k in (knots, scoreKnots):
            if k is not None:
                checkUniformKnots(k)
    except ValueError as err:
        raise AfFileError(f"afFileToLoad {path!r}: {err}") from None
    return {"knots": knots, "mlpValues": list(data["mlpValues"]), "attValues": list(data["attValues"]),
            "afTypeMlp": data["afTypeMlp"], "afTypeAtt": data["afTypeAtt"], "scoreKnots": scoreKnots,
            "scoreValues": list(data.get("scoreValues") or []), "afTypeScore": data.get("afTypeScore", "softmax"),
            "nLayers": data["nLayers"], "rows": None}


def interpretOtherAfDict(data, path):
    """A ptAf dict saved by other code (e.g. the original research code): find the knots and the per-layer
    MLP and attention values by their key names ('knot'/'anchor', 'mlp', 'att')."""
    def find(*words, exclude=()):
        for key, value in data.items():
            name = str(key).lower()
            if any(w in name for w in words) and not any(e in name for e in exclude):
                return value
        return None

    def asLayers(value):
        if value is None:
            return []
        if torch.is_tensor(value):
            return [value.float()] if value.dim() == 1 else [v.float() for v in value]
        if isinstance(value, (list, tuple)):
            return [torch.as_tensor(v).float() for v in value]
        raise AfFileError(f"afFileToLoad {path!r}: cannot read spline values of type {type(value).__name__}")

    hyperparameters = find("hyperparam", "config", "hp") if isinstance(find("hyperparam", "config", "hp"), dict) else {}
    knots = find("knot", "anchor", exclude=("value", "mlp", "att"))
    if knots is None and {"afRange", "afNAnchors"} <= set(hyperparameters):
        knots = torch.linspace(-hyperparameters["afRange"], hyperparameters["afRange"], hyperparameters["afNAnchors"],
                               device="cpu")
    mlp = asLayers(find("mlp", exclude=("knot", "anchor")))
    att = asLayers(find("att", exclude=("knot", "anchor")))
    if knots is None or not mlp + att:
        raise AfFileError(f"afFileToLoad {path!r} has no recognisable knots and spline values "
                          f"(keys: {', '.join(map(str, data))})")
    knots = torch.as_tensor(knots).float().reshape(-1)

    def kind(values):
        return None if not values else "splinePerDim" if values[0].dim() == 2 else "spline"

    nLayers = hyperparameters.get("nLayers", len(mlp) or len(att))
    return {"format": FORMAT, "knots": knots, "mlpValues": mlp, "attValues": att, "afTypeMlp": kind(mlp),
            "afTypeAtt": kind(att), "nLayers": nLayers}


def readAfCsv(path):
    if not os.path.isfile(path):
        raise AfFileError(f"afFileToLoad {path!r} does not exist")
    try:
        with open(path, newline="") as f:
            lines = [row for row in csv.reader(f) if row]
        rows = [torch.tensor([float(v) for v in row], dtype=torch.float32, device="cpu") for row in lines]
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise AfFileError(f"afFileToLoad {path!r} is not a CSV of numbers ({err})") from None
    if not rows or len(rows) % 2:
        raise AfFileError(f"afFileToLoad {path!r} must hold pairs of lines (knots, values); it has {len(rows)} lines")
    for i in range(0, len(rows), 2):
        if len(rows[i + 1]) != len(rows[i]):
            raise AfFileError(f"afFileToLoad {path!r}: line {i + 2} has {len(rows[i + 1])} values for the "
                              f"{len(rows[i])} knots of line {i + 1}")
        try:
            checkUniformKnots(rows[i])
        except ValueError as err:
            raise AfFileError(f"afFileToLoad {path!r}: line {i + 1}: {err}") from None
    return {"knots": rows[0], "mlpValues": None, "attValues": None, "afTypeMlp": None,
            "afTypeAtt": None, "scoreKnots": None, "scoreValues": None, "afTypeScore": None, "nLayers": None,
            "rows": [rows[i + 1] for i in range(0, len(rows), 2)],
            "rowKnots": [rows[i] for i in range(0, len(rows), 2)]}


def _savedSplines(source):
    """{site name: (values, knots)} from a state dict, or from a folder written by save_pretrained (safetensors or
    pytorch_model.bin weights, sharded or not)."""
    if isinstance(source, dict):
        tensors = source
    else:
        paths = sorted(glob.glob(os.path.join(glob.escape(source), "*.safetensors")))
        tensors = {}
        if paths:
            from safetensors import safe_open

            for path in paths:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        if key.endswith((".values", ".knots")):
                            tensors[key] = f.get_tensor(key)
        else:
            for path in sorted(glob.glob(os.path.join(glob.escape(source), "*.bin"))):
                tensors.update(torch.load(path, map_location="cpu", weights_only=True))
    sites = {}
    for key, values in tensors.items():
        if key.endswith(".values") and key[:-len("values")] + "knots" in tensors:
            sites[key[:-len(".values")]] = (values, tensors[key[:-len("values")] + "knots"])
    if not sites:
        where = "the state dict" if isinstance(source, dict) else f"{source!r}"
        raise ValueError(f"{where} holds no spline values and knots (keys NAME.values and NAME.knots); give a ptAf "
                         ".pt/.csv file, or the folder save_pretrained wrote for a model whose activations were replaced")
    return sites


def _fileMlpSplines(path, nSites, sites):
    """The MLP splines of a ptAf .pt/.csv file, one per site: (values per site, knots, 'shared'/'per layer')."""
    try:
        data = readAfFile(path)
    except AfFileError as err:
        raise ValueError(str(err).replace("afFileToLoad ", "afFile ", 1)) from None
    if data["rows"] is not None:
        # A CSV lists the MLP splines, then the attention's on the same knots (then score splines on others), one line
        # per layer even where layers share one: its MLP lines are all of them or the first half, one per module or
        # all equal (shared).
        rows = [row for row, knots in zip(data["rows"], data["rowKnots"]) if torch.equal(knots, data["knots"])]
        readings = [rows] + ([rows[:len(rows) // 2]] if len(rows) % 2 == 0 else [])
        values = next((mlp for mlp in readings if len(mlp) == nSites), None) or next(
            (mlp[:1] for mlp in readings if all(torch.equal(row, mlp[0]) for row in mlp)), None)
        if values is None:
            raise ValueError(f"afFile {path!r} holds {len(rows)} different splines, which fit neither one shared MLP "
                             f"spline nor one per selected module ({nSites}, or {2 * nSites} with the attention's); "
                             f"selected: {', '.join(sites)}")
    else:
        if data["afTypeMlp"] not in SPLINE_TYPES or not data["mlpValues"]:
            raise ValueError(f"afFile {path!r} holds no MLP splines (its MLP AF is {data['afTypeMlp']!r})")
        values = data["mlpValues"]
        # a run with --afLayerSpecific 0 stores its one shared spline once per layer
        if all(torch.equal(v, values[0]) for v in values[1:]):
            values = values[:1]
        elif len(values) != nSites:
            raise ValueError(f"afFile {path!r} holds {len(values)} different MLP splines (one per layer), but match "
                             f"selected {nSites} modules ({', '.join(sites)}); give a model with {len(values)} "
                             "activation sites, or a match that selects that many")
    kind = "shared" if len(values) == 1 else "per layer"
    return (values * nSites if len(values) == 1 else values), data["knots"], kind


def replaceActivations(model, afFile=None, match=nn.GELU, init=0.01, freeze=True, nKnots=64, knotRange=15.0,
                       verbose=True):
    r"""Swap the activation modules of any PyTorch model for splines, in module order; returns one line per swap.

    match selects the modules: a class or a tuple of classes (isinstance), a string (a regular expression searched in
    the modules' qualified names or matching their class name in full: "NewGELUActivation" selects GPT-2's, r"mlp\.act"
    too), or a function (name, module) -> bool. A module inside a selected one is left alone.
    afFile None: fresh splines of nKnots knots on [-knotRange, knotRange], values from init (a number, -1 the identity,
      or a fixed AF's name such as "gelu" or "relu2"), one per module.
    afFile a ptAf .pt/.csv file: its MLP splines, on its own knots; one shared spline is copied to every module, one
      per layer needs as many selected modules as the file has layers (else ValueError).
    afFile a folder written by save_pretrained (or a state dict) of a model whose activations were replaced: every
      module NAME with NAME.values and NAME.knots saved gets its spline back, whatever match says.
    freeze=True: the spline values take no gradient. Each spline lives on the device of the module it replaces
    (its values stay float32). verbose prints the lines too.
    """
    fromWeights = afFile is not None and (isinstance(afFile, dict) or os.path.isdir(afFile))
    if fromWeights:
        saved = _savedSplines(afFile)
        missing = [name for name in saved if not _hasSubmodule(model, name)]
        if missing:
            raise ValueError(f"the saved splines' modules {', '.join(missing)} are not in this model; load the saved "
                             "folder into the class it was saved from")
        sites = list(saved)
        source = "saved"
    else:
        sites = _matchedSites(model, match)
        if not sites:
            raise ValueError(f"match={match!r} selects no module of this model; its parameter-free modules are: "
                             f"{_describeCandidates(model)}")
        if afFile is not None:
            fileValues, knots, kind = _fileMlpSplines(os.fspath(afFile), len(sites), sites)
            source = f"{os.path.basename(os.fspath(afFile))}, {kind}"
        else:
            source = f"init {init!r}"
    lines = []
    for index, name in enumerate(sites):
        old = model.get_submodule(name)
        # an activation module rarely has tensors of its own: then the model's first parameter tells the device
        anyTensor = next(itertools.chain(old.parameters(), old.buffers(), model.parameters()), torch.empty(0, device="cpu"))
        if fromWeights:
            values, knots = saved[name]
        elif afFile is not None:
            values = fileValues[index]
        if afFile is None:
            spline = Spline(nKnots=nKnots, knotRange=knotRange, init=init)
            spline.values.requires_grad_(not freeze)
        else:
            spline = Spline(channels=values.shape[0] if values.dim() == 2 else None)
            # own knots per module: save_pretrained refuses tensors shared between modules it does not know are tied
            spline.loadValues(values.float(), knots.clone(), freeze=freeze)
        spline.to(anyTensor.device)
        parentName, _, childName = name.rpartition(".")
        setattr(model.get_submodule(parentName), childName, spline)
        lines.append(f"{name}: {type(old).__name__} -> spline, {spline.nKnots} knots on "
                     f"[{-spline.knotRange:g}, {spline.knotRange:g}] ({source}), "
                     f"{'frozen' if freeze else 'trainable'}")
    if verbose:
        print("\n".join(lines))
    return lines


def _hasSubmodule(model, name):
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


__all__ = ["Spline", "SplinePerDim", "ReLU2", "SiLU", "Tanh", "ELU", "SELU", "Softplus", "PReLU", "Swish", "LGELU",
           "CRReLU", "Rational", "PolyReLU", "PolyNorm", "LearnableActivation", "MixtureOfActivations",
           "makeActivation", "splineActivation", "splineBackends", "splineReference", "uniformKnots",
           "splineInitValues", "splineSmoothness", "splineRoughness", "replaceActivations", "readAfFile",
           "AfFileError", "checkUniformKnots", "isLearnable", "evaluateOnGrid", "dictionaryActivations", "SPLINE_TYPES",
           "FIXED_TYPES", "LEARNABLE_TYPES", "MLP_INPUT_TYPES", "MIX_DICTIONARY"]
