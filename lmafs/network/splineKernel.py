"""Triton kernels for the shared linear-spline activation: forward values and backward gradients to inputs and knots.

Which kernels this Triton can build is decided at import by probing for the language features each one uses
(`MISSING_FEATURES`), not by version numbers: Triton 3.7.1, for one, ships Gluon without
`shared_memory_descriptor.atomic_scatter_add`, so only the portable tl backward is offered there.
`kernelBackends(device)` lists, per kernel, the implementations that can run on a device, fastest first.
"""

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # Triton builds without Gluon keep the portable tl backward
    gluon = gl = None

MAX_KNOTS = 256
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUM_WARPS = 4
_FORWARD_BLOCK = 2048  # 16 elements per thread: two 16-byte vector loads of bf16 per thread
_GLUON_VEC = 8  # elements per thread per tile: one 16-byte bf16 load of x and of gradOut
_GLUON_TILE = _GLUON_VEC * 32 * _NUM_WARPS
_ONE_HOT_ENTRIES = 8192  # [SUB, KP] one-hot tile size of the tl backward: 64 fp32 registers per thread at 4 warps
_HIST_SMEM_BUDGET = 160 * 1024  # of an H100 SM's 228 KB, what co-resident Gluon programs' histograms may take
# 8 programs x 4 warps keep enough loads in flight to stream at HBM bandwidth and fit the register file (~56/thread)
_MAX_PROGRAMS_PER_SM = 8
_INTERPRETER_PROGRAMS = 4  # few programs on CPU so every program runs the persistent loop several times


def _missingFeatures(features):
    """Dotted names of the (owner, attributes) entries this Triton lacks; an owner of None is one it does not have."""
    missing = []
    for ownerName, owner, attributes in features:
        if owner is None:
            missing.append(f"{ownerName} (missing)")
        else:
            missing += [f"{ownerName}.{name}" for name in attributes if not hasattr(owner, name)]
    return missing


# every Triton function, type and method the kernels below use; the two tl kernels share one list
_TL_FEATURES = [("tl", tl, ("arange", "atomic_add", "cast", "cdiv", "clamp", "constexpr", "float32", "int32", "int64",
                            "load", "minimum", "num_programs", "program_id", "PropagateNan", "store", "sum",
                            "where", "zeros"))]
_GLUON_FEATURES = _TL_FEATURES + [
    ("gluon", gluon, ("jit",)),
    ("gl", gl, ("allocate_shared_memory", "arange", "atomic_add", "barrier", "BlockedLayout", "constexpr", "float32",
                "join", "num_programs", "num_warps", "program_id", "shared_memory_descriptor", "SliceLayout", "sum",
                "SwizzledSharedLayout", "zeros")),
    ("gl.shared_memory_descriptor", getattr(gl, "shared_memory_descriptor", None),
     ("atomic_scatter_add", "load", "reshape"))]
# kernel -> the probed features the installed Triton lacks; a kernel is offered only when its list is empty
MISSING_FEATURES = {"triton-tl": _missingFeatures(_TL_FEATURES), "triton-gluon": _missingFeatures(_GLUON_FEATURES)}
FORWARD_KERNELS = ("triton-tl",)  # fastest first
BACKWARD_KERNELS = ("triton-gluon", "triton-tl")


@triton.jit
def _tileCount(n, TILE: tl.constexpr):
    # n arrives as int32 below 2**31, where cdiv's n + TILE - 1 would wrap for the last TILE - 1 sizes: widen first
    return tl.cdiv(tl.cast(n, tl.int64), TILE)


@triton.jit
def _tileStart(tile, TILE: tl.constexpr):
    # tl.cast, not .to: the interpreter hands loop indices over as Python ints
    return tl.cast(tile, tl.int64) * TILE


@triton.jit
def _locate(x, knotMin, invStep, K: tl.constexpr):
    uRaw = (x - knotMin) * invStep
    # a NaN input keeps a NaN weight, so NaN reaches y and the knot gradients as in the PyTorch fallback...
    u = tl.clamp(uRaw, 0.0, K - 1.0, propagate_nan=tl.PropagateNan.ALL)
    # ...while its index is knot 0's, never an out-of-range gather. An explicit NaN test, not tl.maximum(u, 0.0):
    # whether maximum drops a NaN differs between backends (Triton 3.7.1's interpreter keeps it).
    # Truncation is floor because the clamped u is >= 0.
    i = tl.minimum(tl.where(u == u, u, 0.0).to(tl.int32), K - 2)
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
    # the grid's block count comes from the host, so only the 64-bit block base is needed past 2**31 elements;
    # per-lane offsets stay 32-bit
    base = _tileStart(tl.program_id(0), BLOCK)
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
    for tile in range(tl.program_id(0), _tileCount(n, SUB), tl.num_programs(0)):
        base = _tileStart(tile, SUB)
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
        for tile in range(gl.program_id(0), _tileCount(n, TILE), gl.num_programs(0)):
            base = _tileStart(tile, TILE)
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


def _oneHotRows(knotsPadded: int) -> int:
    """Elements per sub-tile of the tl backward: its [SUB, KP] one-hot tile stays at _ONE_HOT_ENTRIES."""
    return max(32, _ONE_HOT_ENTRIES // knotsPadded)


def _interpreting() -> bool:
    return bool(getattr(getattr(getattr(triton, "knobs", None), "runtime", None), "interpret", False))


def kernelBackends(device: torch.device) -> dict[str, tuple[str, ...]]:
    """Per kernel ("forward", "backward"), the implementations this Triton can build and run on device, fastest first.

    tl kernels run on CUDA and ROCm GPUs and, under TRITON_INTERPRET=1, on CPU tensors; the Gluon backward is written
    for NVIDIA GPUs (32-lane warps, shared-memory atomics) and the interpreter does not run Gluon.
    """
    device = torch.device(device)
    runs = {"triton-tl": device.type == "cuda" or (device.type == "cpu" and _interpreting()),
            "triton-gluon": device.type == "cuda" and torch.version.hip is None and not _interpreting()}
    offered = {name: runs[name] and not MISSING_FEATURES[name] for name in runs}
    return {"forward": tuple(name for name in FORWARD_KERNELS if offered[name]),
            "backward": tuple(name for name in BACKWARD_KERNELS if offered[name])}


def splineForwardTriton(x: torch.Tensor, values: torch.Tensor, knotMin: float, invStep: float) -> torch.Tensor:
    """Spline activation of x (float32, bfloat16 or float16, any shape); returns y with x's shape and dtype."""
    values = _checkInputs(x, values)
    if not kernelBackends(x.device)["forward"]:
        raise ValueError(f"the forward kernel cannot run on {x.device} with this Triton")
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

    backend: "triton-gluon" (shared-memory histogram, NVIDIA GPUs) or "triton-tl" (portable one-hot reduction, also
    the one the Triton interpreter runs); None picks the first of kernelBackends(x.device)["backward"].
    """
    values = _checkInputs(x, values)
    if gradOut.shape != x.shape or gradOut.dtype not in _INPUT_DTYPES or gradOut.device != x.device:
        raise ValueError(f"gradOut ({gradOut.dtype} {tuple(gradOut.shape)} on {gradOut.device}) does not fit x "
                         f"({x.dtype} {tuple(x.shape)} on {x.device})")
    backends = kernelBackends(x.device)["backward"]
    backend = backends[0] if backend is None and backends else backend
    if backend not in backends:
        raise ValueError(f"backward kernel {backend!r} cannot run on {x.device} with this Triton; "
                         f"available: {backends}")
    gradOutFlat = gradOut.contiguous().view(-1)
    xFlat = x.contiguous().view(-1)
    gradX = torch.empty_like(xFlat)
    numKnots = values.numel()
    gradValues = torch.zeros(numKnots, dtype=torch.float32, device=x.device)
    n = xFlat.numel()
    if n:
        knotsPadded = triton.next_power_of_2(numKnots)
        args = (gradOutFlat, xFlat, values, gradX, gradValues, n, float(knotMin), float(invStep))
        if backend == "triton-gluon":
            histBytes = knotsPadded * 32 * 4
            perSm = max(1, min(_MAX_PROGRAMS_PER_SM, _HIST_SMEM_BUDGET // histBytes))
            grid = (_programCount(x.device, triton.cdiv(n, _GLUON_TILE), perSm),)
            _splineBackwardGluonKernel[grid](*args, K=numKnots, KP=knotsPadded, VEC=_GLUON_VEC,
                                             num_warps=_NUM_WARPS, enable_fp_fusion=True)
        else:
            sub = _oneHotRows(knotsPadded)
            grid = (_programCount(x.device, triton.cdiv(n, sub), _MAX_PROGRAMS_PER_SM),)
            _splineBackwardKernel[grid](*args, K=numKnots, KP=knotsPadded, SUB=sub, num_warps=_NUM_WARPS,
                                        enable_fp_fusion=True)
    return gradX.view(x.shape), gradValues


def compileForTarget(kernel: str, backend: str, capability: int, dtype: str, numKnots: int):
    """Compile one kernel ("forward"/"backward", backend "triton-tl"/"triton-gluon") for an NVIDIA GPU of compute
    capability `capability` (80, 89, 90, ...) and inputs of Triton type `dtype` ("fp32", "bf16", "fp16"), with the
    ptxas bundled with Triton: no GPU is needed. Returns the compiled kernel; raises when it does not build.

    After a first (uncached) Gluon compile, Triton's bindings report leaked nanobind objects when Python exits;
    the report is Triton's and harmless.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    knotsPadded = triton.next_power_of_2(numKnots)
    target = GPUTarget("cuda", capability, 32)
    options = {"num_warps": _NUM_WARPS, "enable_fp_fusion": True}
    if kernel == "forward":
        signature = {"xPtr": f"*{dtype}", "valuesPtr": "*fp32", "yPtr": f"*{dtype}", "n": "i32", "knotMin": "fp32",
                     "invStep": "fp32", "K": "constexpr", "BLOCK": "constexpr"}
        source = ASTSource(_splineForwardKernel, signature,
                           {"K": numKnots, "BLOCK": _FORWARD_BLOCK})
        return triton.compile(source, target=target, options=options)
    signature = {"gradOutPtr": f"*{dtype}", "xPtr": f"*{dtype}", "valuesPtr": "*fp32", "gradXPtr": f"*{dtype}",
                 "gradValuesPtr": "*fp32", "n": "i32", "knotMin": "fp32", "invStep": "fp32", "K": "constexpr",
                 "KP": "constexpr"}
    if backend == "triton-tl":
        source = ASTSource(_splineBackwardKernel, {**signature, "SUB": "constexpr"},
                           {"K": numKnots, "KP": knotsPadded, "SUB": _oneHotRows(knotsPadded)})
    else:
        from triton.experimental.gluon._runtime import GluonASTSource
        source = GluonASTSource(_splineBackwardGluonKernel, {**signature, "VEC": "constexpr"},
                                {"K": numKnots, "KP": knotsPadded, "VEC": _GLUON_VEC})
    return triton.compile(source, target=target, options=options)
