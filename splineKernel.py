"""Triton kernels for the shared linear-spline activation: forward values and backward gradients to inputs and knots."""

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # Triton builds without Gluon keep the portable tl backward
    gluon = None

MAX_KNOTS = 256
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUM_WARPS = 4
_FORWARD_BLOCK = 2048  # 16 elements per thread: two 16-byte vector loads of bf16 per thread
_GLUON_VEC = 8  # elements per thread per tile: one 16-byte bf16 load of x and of gradOut
_ONE_HOT_ENTRIES = 8192  # [SUB, KP] one-hot tile size of the tl backward: 64 fp32 registers per thread at 4 warps
_HIST_SMEM_BUDGET = 160 * 1024  # of an H100 SM's 228 KB, what co-resident Gluon programs' histograms may take
# 8 programs x 4 warps keep enough loads in flight to stream at HBM bandwidth and fit the register file (~56/thread)
_MAX_PROGRAMS_PER_SM = 8
_INTERPRETER_PROGRAMS = 4  # few programs on CPU so every program runs the persistent loop several times


@triton.jit
def _locate(x, knotMin, invStep, K: tl.constexpr):
    uRaw = (x - knotMin) * invStep
    # a NaN input keeps a NaN weight, so NaN reaches y and the knot gradients as in the PyTorch fallback...
    u = tl.clamp(uRaw, 0.0, K - 1.0, propagate_nan=tl.PropagateNan.ALL)
    # ...while its index comes from maximum, which returns the non-NaN operand: knot 0, never an out-of-range gather.
    # Truncation is floor because the clamped u is >= 0.
    i = tl.minimum(tl.maximum(u, 0.0).to(tl.int32), K - 2)
    return uRaw, i, u - i.to(tl.float32)


@triton.jit
def _tileGradients(gradOutPtr, xPtr, valuesPtr, gradXPtr, offs, mask, knotMin, invStep, K: tl.constexpr):
    # masked lanes load x = g = 0: a valid interval with zero contributions, so callers need not mask the knot sums
    x = tl.load(xPtr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gradOutPtr + offs, mask=mask, other=0.0).to(tl.float32)
    uRaw, i, w = _locate(x, knotMin, invStep, K)
    v0 = tl.load(valuesPtr + i)
    v1 = tl.load(valuesPtr + i + 1)
    inside = (uRaw >= 0.0) & (uRaw <= K - 1.0)
    gradX = tl.where(inside, g * (v1 - v0) * invStep, 0.0)
    tl.store(gradXPtr + offs, gradX.to(gradXPtr.dtype.element_ty), mask=mask)
    return i, g * (1.0 - w), g * w


@triton.jit
def _splineForwardKernel(xPtr, valuesPtr, yPtr, n, knotMin, invStep, K: tl.constexpr, BLOCK: tl.constexpr):
    # 64-bit block base keeps offsets valid past 2**31 elements while per-lane offsets stay 32-bit
    base = tl.program_id(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    mask = lanes < n - base
    x = tl.load(xPtr + base + lanes, mask=mask, other=0.0).to(tl.float32)
    _, i, w = _locate(x, knotMin, invStep, K)
    v0 = tl.load(valuesPtr + i)
    v1 = tl.load(valuesPtr + i + 1)
    tl.store(yPtr + base + lanes, (v0 + w * (v1 - v0)).to(yPtr.dtype.element_ty), mask=mask)


@triton.jit
def _splineBackwardKernel(gradOutPtr, xPtr, valuesPtr, gradXPtr, gradValuesPtr, n, knotMin, invStep,
                          K: tl.constexpr, KP: tl.constexpr, SUB: tl.constexpr):
    lanes = tl.arange(0, SUB)
    knots = tl.arange(0, KP)
    knotSums = tl.zeros([KP], dtype=tl.float32)
    # persistent loop: each program folds many sub-tiles into one [KP] partial sum, so atomics scale with programs
    for tile in range(tl.program_id(0), tl.cdiv(n, SUB), tl.num_programs(0)):
        base = tl.cast(tile, tl.int64) * SUB  # tl.cast: the interpreter hands the loop index over as a Python int
        i, left, right = _tileGradients(gradOutPtr + base, xPtr + base, valuesPtr, gradXPtr + base, lanes,
                                        lanes < n - base, knotMin, invStep, K)
        knotSums += tl.sum(tl.where(i[:, None] == knots[None, :], left[:, None], 0.0)
                           + tl.where(i[:, None] + 1 == knots[None, :], right[:, None], 0.0), axis=0)
    tl.atomic_add(gradValuesPtr + knots, knotSums, mask=knots < K)


if gluon is not None:

    @gluon.jit
    def _splineBackwardGluonKernel(gradOutPtr, xPtr, valuesPtr, gradXPtr, gradValuesPtr, n, knotMin, invStep,
                                   K: gl.constexpr, KP: gl.constexpr, VEC: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        TILE: gl.constexpr = VEC * 32 * NW
        elementLayout: gl.constexpr = gl.BlockedLayout([VEC], [32], [NW], [0])
        rowLayout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [NW, 1], [1, 0])
        # knot-major histogram with one column per lane: word knot*32 + lane sits in bank `lane`, so a warp's
        # scatter never has two lanes on one bank whatever the data; warps of the program share it atomically
        hist = gl.allocate_shared_memory(gl.float32, [KP * 32], gl.SwizzledSharedLayout(1, 1, 1, [0]),
                                         gl.zeros([KP * 32], gl.float32, gl.BlockedLayout([1], [32], [NW], [0])))
        gl.barrier()
        lanes = gl.arange(0, TILE, layout=elementLayout)
        column = (lanes // VEC) % 32  # the lane that holds each element under elementLayout
        for tile in range(gl.program_id(0), gl.cdiv(n, TILE), gl.num_programs(0)):
            base = tile.to(gl.int64) * TILE
            i, left, right = _tileGradients(gradOutPtr + base, xPtr + base, valuesPtr, gradXPtr + base, lanes,
                                            lanes < n - base, knotMin, invStep, K)
            slot = i * 32 + column
            # both shares in one scatter (right: same lane column, next knot's row), because the compiler fences
            # every shared-memory scatter with a CTA barrier: one scatter per tile is one barrier per tile
            shares = gl.join(left, right).reshape([2 * TILE])
            hist.atomic_scatter_add(shares, gl.join(slot, slot + 32).reshape([2 * TILE]), 0)
        gl.barrier()
        knots = gl.arange(0, KP, layout=gl.SliceLayout(1, rowLayout))
        knotSums = gl.sum(hist.reshape([KP, 32]).load(rowLayout), axis=1)
        gl.atomic_add(gradValuesPtr + knots, knotSums, mask=knots < K)


def _checkInputs(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # float64 would silently lose precision in the float32 kernels: it belongs on the PyTorch path
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if values.dim() != 1 or values.dtype != torch.float32 or not 2 <= values.numel() <= MAX_KNOTS:
        raise ValueError(f"values must be a float32 vector of 2..{MAX_KNOTS} knots, got {values.dtype} "
                         f"{tuple(values.shape)}")
    if values.device != x.device:
        raise ValueError(f"values on {values.device} but x on {x.device}")
    return values.contiguous()


@functools.lru_cache(maxsize=None)
def _smCount(deviceIndex: int) -> int:
    return torch.cuda.get_device_properties(deviceIndex).multi_processor_count


def _programCount(device: torch.device, tiles: int, perSm: int) -> int:
    if device.type != "cuda":
        return min(tiles, _INTERPRETER_PROGRAMS)
    return min(tiles, _smCount(device.index if device.index is not None else torch.cuda.current_device()) * perSm)


def backwardBackends(device: torch.device) -> tuple[str, ...]:
    """Backward implementations that can run on device, fastest first."""
    gluonRuns = gluon is not None and device.type == "cuda" and torch.version.hip is None
    return ("gluon", "tl") if gluonRuns and not triton.knobs.runtime.interpret else ("tl",)


def splineForwardTriton(x: torch.Tensor, values: torch.Tensor, knotMin: float, invStep: float) -> torch.Tensor:
    """Spline activation of x (float32, bfloat16 or float16, any shape); returns y with x's shape and dtype."""
    values = _checkInputs(x, values)
    xFlat = x.contiguous().view(-1)
    y = torch.empty_like(xFlat)
    n = xFlat.numel()
    if n:
        _splineForwardKernel[(triton.cdiv(n, _FORWARD_BLOCK),)](
            xFlat, values, y, n, float(knotMin), float(invStep), K=values.numel(), BLOCK=_FORWARD_BLOCK,
            num_warps=_NUM_WARPS, enable_fp_fusion=True)
    return y.view(x.shape)


def splineBackwardTriton(gradOut: torch.Tensor, x: torch.Tensor, values: torch.Tensor, knotMin: float,
                         invStep: float, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (gradX like x, gradValues float32 [K]) of the spline activation for upstream gradient gradOut.

    backend: "gluon" (shared-memory histogram, NVIDIA GPUs) or "tl" (portable one-hot reduction, also the one the
    Triton interpreter runs); None picks gluon where it can run.
    """
    values = _checkInputs(x, values)
    if gradOut.shape != x.shape or gradOut.dtype not in _INPUT_DTYPES or gradOut.device != x.device:
        raise ValueError(f"gradOut ({gradOut.dtype} {tuple(gradOut.shape)} on {gradOut.device}) does not fit x "
                         f"({x.dtype} {tuple(x.shape)} on {x.device})")
    backends = backwardBackends(x.device)
    backend = backends[0] if backend is None else backend
    if backend not in backends:
        raise ValueError(f"backend {backend!r} cannot run on {x.device}; available: {backends}")
    gradOutFlat = gradOut.contiguous().view(-1)
    xFlat = x.contiguous().view(-1)
    gradX = torch.empty_like(xFlat)
    numKnots = values.numel()
    gradValues = torch.zeros(numKnots, dtype=torch.float32, device=x.device)
    n = xFlat.numel()
    if n:
        knotsPadded = triton.next_power_of_2(numKnots)
        args = (gradOutFlat, xFlat, values, gradX, gradValues, n, float(knotMin), float(invStep))
        if backend == "gluon":
            histBytes = knotsPadded * 32 * 4
            perSm = max(1, min(_MAX_PROGRAMS_PER_SM, _HIST_SMEM_BUDGET // histBytes))
            grid = (_programCount(x.device, triton.cdiv(n, _GLUON_VEC * 32 * _NUM_WARPS), perSm),)
            _splineBackwardGluonKernel[grid](*args, K=numKnots, KP=knotsPadded, VEC=_GLUON_VEC,
                                             num_warps=_NUM_WARPS, enable_fp_fusion=True)
        else:
            sub = max(32, _ONE_HOT_ENTRIES // knotsPadded)
            grid = (_programCount(x.device, triton.cdiv(n, sub), _MAX_PROGRAMS_PER_SM),)
            _splineBackwardKernel[grid](*args, K=numKnots, KP=knotsPadded, SUB=sub, num_warps=_NUM_WARPS,
                                        enable_fp_fusion=True)
    return gradX.view(x.shape), gradValues
