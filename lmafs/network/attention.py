"""Attention under the LM-AFs mask (causal, same document, sliding window): FlexAttention on CUDA, SDPA with
the same dense mask elsewhere (FlexAttention has no CPU backward). Both compute the same function. Besides
softmax attention, the weights can come from softplus, sigmoid or a learned spline of the scores (SCORE_TYPES):
score modifications of FlexAttention on CUDA, an explicit computation from the scores elsewhere.

FlexAttention on a GPU runs as in the original research code: the block mask has inductor's default block
(FLEX_MASK_BLOCK = 128 positions) and flexBlockSize is the tile of the Triton kernels, passed as kernel options
(forward BLOCK_M/BLOCK_N, backward BLOCK_M1/BLOCK_N1/BLOCK_M2/BLOCK_N2). Inductor compiles only tiles that
divide the mask block ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N"): with a mask block of
flexBlockSize (32), none of the forward tiles its heuristics pick for an A100, RTX 30xx/40xx or H100 does.

Tiles and pipeline depth (num_stages) set the kernels' shared memory, which must fit one thread block: 163 KB
on an A100 (8.0), 99 KB on RTX 30xx/40xx (8.6/8.9), 227 KB on an H100 (9.0). Where inductor's num_stages would
not fit our tiles, the kernel options lower it; describeFlexAttention() reports the whole configuration for a
GPU that need not be present. flexSharedMemory() bounds the allocation from above: it was fitted to, and is at
or above, what Triton 3.9 allocates for the forward and backward kernels inductor (torch 2.13) generates,
compiled for sm_86 and sm_90 on a CPU: 432 kernels of tiles 16/32/64, head sizes 32/64/128, float32 with IEEE
and TF32 dots and bfloat16, 1-4 stages, and 30 of tile 128 (sm_80 and sm_89, checked at tile 32, allocate as
sm_86). With T = tile x head size (rounded up to a power of two) x element bytes, S = tile^2 x max(element
bytes, 2) and s stages:
    forward   3T + S, + 2T per stage beyond 2; on Hopper with tiles >= 64 at least (2s + 1)T from s = 2
    backward  4T + S, + max(S, T) at s = 2, + 2T (float32) or T per further stage; on Hopper with tiles >= 64
              at least 4T + max(S, T), then (2s + 2)T
and 1 KB per stage.
"""
import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F

FLEX_MASK_BLOCK = 128  # create_block_mask's default BLOCK_SIZE; every allowed tile divides it
FLEX_TILE_SIZES = (16, 32, 64, 128)
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Maximum shared memory of one thread block (opt-in), by compute capability: CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability". On a present GPU the device properties are read instead.
SHARED_MEMORY_PER_BLOCK = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024}


# ----------------------------------------------------------------------------------------------
# Attention masks: causal, same document, sliding window


def documentIds(tokens, tokenDocSep):
    """[..., T] -> document index of each position; a separator starts a new document."""
    if tokenDocSep < 0:
        return torch.zeros_like(tokens)
    return torch.cumsum((tokens == tokenDocSep).to(torch.int32), dim=-1)


def denseAttentionMask(docs, contextSize):
    """Boolean [nB, 1, T, T]: True where query q may attend key k."""
    T = docs.shape[-1]
    q = torch.arange(T, device=docs.device)[:, None]
    k = torch.arange(T, device=docs.device)[None, :]
    allowed = (k <= q) & (q - k < contextSize)
    return (allowed[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]


def flexBlockMask(docs, contextSize):
    from torch.nn.attention.flex_attention import create_block_mask

    def maskMod(b, h, q, k):
        return (k <= q) & (q - k < contextSize) & (docs[b, q] == docs[b, k])

    nB, T = docs.shape
    return create_block_mask(maskMod, nB, None, T, T, device=docs.device, BLOCK_SIZE=FLEX_MASK_BLOCK)


def keyCounts(docs, contextSize):
    """[nB, T] -> how many keys each query may attend under the mask: itself and the earlier positions of its
    document, at most contextSize (the row sums of denseAttentionMask, without building it)."""
    T = docs.shape[-1]
    positions = torch.arange(T, device=docs.device)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    documentStart = torch.where(starts, positions, 0).cummax(dim=-1).values
    return (positions - documentStart + 1).clamp(max=contextSize)


# ----------------------------------------------------------------------------------------------
# The score nonlinearity: what turns the scores s = q.k / sqrt(headDim) of a query row into its weights.
#
#   softmax   w_j = exp(s_j) / sum_k exp(s_k)                       today's attention
#   softplus  w_j = softplus(l s_j) / sum_k softplus(l s_k),  l = log(n) / log(headDim)
#             LSSA, "Length-Scaled Softplus Attention" (Gao & Spratling, arXiv 2501.13428): the softmax split into a
#             positive map and an l1 normalisation, the map replaced by softplus, the scores scaled by log_d(N) from
#             entropy invariance, d the head size and N the tokens attended. Under our causal + document + window
#             mask N is the row's own count n (the paper's causal rows attend their prefix, so its N is per row
#             too). The paper's second stage (re-weighting, LSSAR) is not implemented.
#   sigmoid   w_j = sigmoid(s_j - log n), no normalisation (Ramapuram et al., "Theory, Analysis, and Best Practices
#             for Sigmoid Self-Attention", arXiv 2409.04431: b = -log n, which keeps sum_j w_j near 1 while the
#             scores are small). The paper takes n as the sequence length, which is the number of keys every
#             query attends without a mask; with ours, n is each row's count, so that property holds per row.
#   spline    w_j = exp(phi(s_j)) / sum_k exp(phi(s_k)), phi a learned linear spline on [-sqrt(headDim),
#             sqrt(headDim)]: q and k are RMS-normalised per head, so |q.k| <= headDim and every score lies in
#             that range. phi starts as the identity, i.e. as softmax attention.
# n counts the query itself, so n >= 1 (a row of one key: softplus weight 1, sigmoid weight sigmoid(s)).
#
# Any positive map phi with an l1 normalisation is a softmax of log(phi(s)), so FlexAttention runs softplus and
# the spline as score modifications. Sigmoid weights are not normalised: FlexAttention runs them as softmax of
# logsigmoid(s + b), whose output is sum_j sigmoid(.) v_j / sum_k sigmoid(.), and multiplies it by the row's
# exp(logsumexp) = sum_k sigmoid(.), which FlexAttention returns and differentiates.

SCORE_TYPES = ("softmax", "softplus", "sigmoid", "spline")


def scoreRowTerms(score, counts, headDim):
    """The per-query quantity of a score transform, float32 [nB, T]: the LSSA scale log(n)/log(headDim) (softplus)
    or the bias -log(n) (sigmoid), from the keys each query attends, counts [nB, T]."""
    logCounts = counts.float().log()
    return logCounts / math.log(headDim) if score == "softplus" else -logCounts


def splineOfScores(score, lefts, slopes, knotMin, invStep):
    """The linear spline of activationFunctions (uniform knots, constant outside) in plain tensor operations, for
    FlexAttention's score_mod, which traces it on scalars into its kernels and derives its gradient to the captured
    tensors; splineActivation is a custom operator that cannot be traced there. From splineIntervals(): lefts [K-1]
    and slopes [K-1], each interval's left value and rise (inductor's flex backward takes one indexing of each
    captured tensor that needs a gradient: values[i] with values[i + 1] would be two of one), and the grid as 0-dim
    tensors knotMin and invStep = 1 / knot spacing (Python floats captured by a score_mod become symbolic once a
    second spline is traced, which FlexAttention's tracing rejects)."""
    nIntervals = lefts.shape[0]
    u = ((score.float() - knotMin) * invStep).clamp(0.0, nIntervals)
    index = u.floor().clamp(max=nIntervals - 1)
    weight = u - index
    index = index.to(torch.int64)
    return lefts[index] + weight * slopes[index]


def splineIntervals(spline):
    """(lefts, slopes, knotMin, invStep) of a Spline for splineOfScores."""
    values, knots = spline.values, spline.knots
    return (values[:-1], values[1:] - values[:-1], knots[0],
            (values.shape[-1] - 1) / (knots[-1] - knots[0]))


def scoreModFor(score, rowTerms=None, scoreAf=None):
    """FlexAttention's score_mod for a score transform (see SCORE_TYPES): the scores whose softmax gives its
    weights (sigmoid: before the multiplication by the row sum)."""
    if score == "softplus":
        return lambda s, b, h, q, k: torch.log(F.softplus(s * rowTerms[b, q]))
    if score == "sigmoid":
        return lambda s, b, h, q, k: F.logsigmoid(s + rowTerms[b, q])
    intervals = splineIntervals(scoreAf)
    return lambda s, b, h, q, k: splineOfScores(s, *intervals)


def explicitAttention(q, k, v, allowed, score, rowTerms=None, scoreAf=None):
    """Attention with a score transform computed from the explicit scores [nB, H, T, T] (the CPU path, and the CUDA
    path when FlexAttention fails); allowed: the dense mask [nB, 1, T, T]; rowTerms [nB, T] from scoreRowTerms."""
    s = (q @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32)) * q.shape[-1] ** -0.5
    if score == "spline":
        weights = torch.softmax(scoreAf(s).masked_fill(~allowed, float("-inf")), dim=-1)
    elif score == "softplus":
        weights = F.softplus(s * rowTerms[:, None, :, None]).masked_fill(~allowed, 0.0)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        weights = torch.sigmoid(s + rowTerms[:, None, :, None]).masked_fill(~allowed, 0.0)
    return weights.to(v.dtype) @ v


# ----------------------------------------------------------------------------------------------
# FlexAttention kernel configuration per GPU


def flexSharedMemory(kind, tile, headDim, dtype, numStages, capability):
    """Bytes of shared memory a FlexAttention kernel (kind 'forward' or 'backward') takes on a GPU of this
    capability: an upper envelope of Triton's allocation (module docstring), float32 covering IEEE and TF32
    dots; None for architectures other than 8.x and 9.x, where it was not measured."""
    if capability[0] not in (8, 9):
        return None
    T = tile * (1 << (headDim - 1).bit_length()) * dtype.itemsize
    S = tile * tile * max(dtype.itemsize, 2)
    hopper = capability[0] == 9 and tile >= 64  # warpgroup MMA there keeps each stage's operands in shared memory
    if kind == "forward":
        allocated = 3 * T + S + 2 * T * max(0, numStages - 2)
        if hopper and numStages >= 2:
            allocated = max(allocated, (2 * numStages + 1) * T)
    else:
        perStage = 2 * T if dtype.itemsize == 4 else T
        allocated = 4 * T + S + (max(S, T) if numStages >= 2 else 0) + perStage * max(0, numStages - 2)
        if hopper:
            allocated = max(allocated, 4 * T + max(S, T) if numStages == 1 else (2 * numStages + 2) * T)
    return allocated + 1024 * numStages


def flexTileOptions(tile):
    """Kernel options making `tile` the tile of FlexAttention's forward and backward kernels."""
    return {name: tile for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}


@dataclasses.dataclass
class FlexKernelConfig:
    """One kernel configuration inductor would try: its tiles ((BLOCK_M, BLOCK_N) forward, (BLOCK_M1, BLOCK_N1,
    BLOCK_M2, BLOCK_N2) backward) after our kernel options, flexSharedMemory() of it (None where unmeasured) and
    whether inductor accepts it."""
    tiles: tuple
    numStages: int
    numWarps: int
    sharedBytes: int | None
    usable: bool
    reason: str = ""


@dataclasses.dataclass
class FlexPlan:
    """What FlexAttention will run for one GPU, dtype and head size: see describeFlexAttention()."""
    capability: tuple
    dtype: torch.dtype
    headDim: int
    flexBlockSize: int
    maskBlockSize: int
    kernelOptions: dict
    sharedMemoryPerBlock: int
    forward: list
    backward: list

    @property
    def compiles(self):
        """Whether a usable forward and a usable backward configuration fit the shared memory of one block; None
        when inductor's heuristics, the limit or the allocation on this architecture are unknown."""
        configs = self.forward + self.backward
        if not (self.forward and self.backward and self.sharedMemoryPerBlock) or \
                any(c.sharedBytes is None for c in configs):
            return None
        return all(any(c.usable and c.sharedBytes <= self.sharedMemoryPerBlock for c in kernel)
                   for kernel in (self.forward, self.backward))

    def lines(self):
        """The configuration as text, one line per config (the preflight prints it)."""
        limit = f"{self.sharedMemoryPerBlock / 1024:.0f} KB" if self.sharedMemoryPerBlock else "unknown"
        verdict = {True: "compiles", False: "WILL NOT COMPILE", None: "unknown whether it compiles"}[self.compiles]
        rows = [f"capability {self.capability[0]}.{self.capability[1]}, {str(self.dtype).removeprefix('torch.')}, "
                f"head size {self.headDim}, flexBlockSize {self.flexBlockSize}: mask block {self.maskBlockSize}, "
                f"shared memory per block {limit} -> {verdict}",
                f"  kernel options {self.kernelOptions}"]
        for kind, configs in (("forward", self.forward), ("backward", self.backward)):
            for c in configs:
                size = "shared memory unknown" if c.sharedBytes is None else f"~{c.sharedBytes / 1024:.1f} KB"
                if c.sharedBytes and self.sharedMemoryPerBlock and c.sharedBytes > self.sharedMemoryPerBlock:
                    size += " (too much)"
                state = "ok" if c.usable else f"rejected: {c.reason}"
                rows.append(f"  {kind:8s} tiles {'x'.join(map(str, c.tiles)):15s} stages {c.numStages} "
                            f"warps {c.numWarps}  {size}  {state}")
        if not self.forward:
            rows.append("  (this torch's inductor does not expose its FlexAttention heuristics)")
        return rows


@contextlib.contextmanager
def _reportedCapability(capability):
    """Inductor's CUDA heuristics ask torch.cuda.get_device_capability(); answer `capability` meanwhile, so they
    can be asked about a GPU that is not present."""
    original = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: tuple(capability)
    try:
        yield
    finally:
        torch.cuda.get_device_capability = original


def inductorFlexConfigs(capability, dtype, headDim):
    """(forward, backward) configs of inductor's own heuristics for a CUDA GPU of this capability, as the
    FlexAttention lowering receives them (FlexConfig / FlexBwDConfig lists), or None where this torch's inductor
    does not offer them to ask (torch 2.13 does)."""
    from torch._inductor.virtualized import V
    choices = V.choices
    if not hasattr(choices, "get_flex_attention_bwd_configs"):
        return None
    with _reportedCapability(capability):
        return (choices.get_flex_attention_fwd_configs(headDim, dtype, "cuda"),
                choices.get_flex_attention_bwd_configs(headDim, dtype, "cuda"))


def _option(options, kind, name, default):
    # the lowering keeps fwd_X (bwd_X) for its own kernel as X, drops the other's, and lets options beat configs
    prefixed = f"{'fwd' if kind == 'forward' else 'bwd'}_{name}"
    return options.get(prefixed, options.get(name, default))


def _forwardConfig(conf, options, maskBlock, dtype, headDim, capability):
    tiles = tuple(_option(options, "forward", name, value) for name, value in (("BLOCK_M", conf.block_m),
                                                                               ("BLOCK_N", conf.block_n)))
    stages = _option(options, "forward", "num_stages", conf.num_stages)
    usable = maskBlock % tiles[0] == 0 and maskBlock % tiles[1] == 0
    return FlexKernelConfig(tiles, stages, _option(options, "forward", "num_warps", conf.num_warps),
                            flexSharedMemory("forward", max(tiles), headDim, dtype, stages, capability), usable,
                            "" if usable else f"tiles do not divide the mask block {maskBlock}")


def _backwardConfig(conf, options, maskBlock, dtype, headDim, capability):
    own = (conf.block_m1, conf.block_n1, conf.block_m2, conf.block_n2)
    tiles = tuple(_option(options, "backward", name, value)
                  for name, value in zip(("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"), own))
    stages = _option(options, "backward", "num_stages", conf.num_stages)
    reason = ""
    # the lowering skips a config whose own tiles do not divide the mask block, even when options replace them
    if any(maskBlock % t for t in own):
        reason = f"config tiles {own} do not divide the mask block {maskBlock}"
    elif any(maskBlock % t for t in tiles):
        reason = f"tiles do not divide the mask block {maskBlock}"
    elif tiles[1] % tiles[0] or tiles[2] % tiles[3]:
        reason = "the kernel needs BLOCK_N1 % BLOCK_M1 == 0 and BLOCK_M2 % BLOCK_N2 == 0"
    return FlexKernelConfig(tiles, stages, _option(options, "backward", "num_warps", conf.num_warps),
                            flexSharedMemory("backward", max(tiles), headDim, dtype, stages, capability), not reason,
                            reason)


def describeFlexAttention(capability, dtype, headDim, flexBlockSize, sharedMemoryPerBlock=None):
    """The FlexAttention configuration for a CUDA GPU of `capability` ((major, minor)), activations of `dtype`,
    head size `headDim` and tile `flexBlockSize`: mask block, kernel options, the forward and backward configs
    inductor's heuristics yield under those options (with estimated shared memory) and whether it will compile.
    Needs no GPU. sharedMemoryPerBlock (bytes) defaults to SHARED_MEMORY_PER_BLOCK[capability] (0 if unknown)."""
    if flexBlockSize not in FLEX_TILE_SIZES:
        raise ValueError(f"flexBlockSize must be one of {FLEX_TILE_SIZES}, got {flexBlockSize}")
    capability = tuple(capability)
    limit = sharedMemoryPerBlock or SHARED_MEMORY_PER_BLOCK.get(capability, 0)
    options = flexTileOptions(flexBlockSize)
    fwdConfs, bwdConfs = inductorFlexConfigs(capability, dtype, headDim) or ([], [])
    # Inductor's num_stages suit its own tiles; with ours they may overflow a consumer GPU's 99 KB, so each
    # kernel gets the deepest pipeline up to inductor's that fits (none fitting: it will not compile). Only where
    # the limit and the allocation are known; elsewhere inductor's choice stands.
    for kind, confs in (("forward", fwdConfs), ("backward", bwdConfs)):
        stages = max((c.num_stages for c in confs), default=0)  # one config unless max_autotune adds candidates
        needed = [flexSharedMemory(kind, flexBlockSize, headDim, dtype, s, capability) for s in range(1, stages + 1)]
        if limit and needed and None not in needed:
            fitting = [s for s, size in enumerate(needed, 1) if size <= limit]
            if fitting and fitting[-1] < stages:
                options[f"{'fwd' if kind == 'forward' else 'bwd'}_num_stages"] = fitting[-1]
    return FlexPlan(capability, dtype, headDim, flexBlockSize, FLEX_MASK_BLOCK, options, limit,
                    [_forwardConfig(c, options, FLEX_MASK_BLOCK, dtype, headDim, capability) for c in fwdConfs],
                    [_backwardConfig(c, options, FLEX_MASK_BLOCK, dtype, headDim, capability) for c in bwdConfs])


# ----------------------------------------------------------------------------------------------
# The kernel


def compiledFlexAttention(backend="inductor"):
    """FlexAttention compiled on its own, for a model that is not compiled as a whole (--compileBackend none): its
    batch dimension becomes dynamic at the second batch size, so the passes of 1..N models, validation and the
    AF-input statistics share two graphs. With static shapes each would compile its own, and past dynamo's
    recompile limit (8) FlexAttention would run eagerly, with dense [T, T] scores."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, backend=backend, dynamic=None)


class AttentionKernel:
    """Scaled dot-product attention under the LM-AFs mask, by FlexAttention or by SDPA with a dense mask.

    Both compute the same function; FlexAttention is the fast path on CUDA (it has no CPU backward). Should
    FlexAttention still fail on a GPU (inductor or Triton cannot build it there), fallBackToSdpa() switches the
    kernel to SDPA: `implementation` becomes 'sdpa' and `flexFailure` says why.
    """

    def __init__(self, implementation, contextSize, flexBlockSize, headDim, score="softmax", device="cpu"):
        if implementation not in ("flex", "sdpa"):
            raise ValueError(f"attention implementation must be 'flex' or 'sdpa', got {implementation!r}")
        if flexBlockSize not in FLEX_TILE_SIZES:
            raise ValueError(f"flexBlockSize must be one of {FLEX_TILE_SIZES}, got {flexBlockSize}")
        if score not in SCORE_TYPES:
            raise ValueError(f"attention score must be one of {', '.join(SCORE_TYPES)}, got {score!r}")
        self.implementation = implementation
        self.contextSize = contextSize
        self.score, self.headDim = score, headDim
        self.flexFailure = None  # why FlexAttention was given up, once it was
        if implementation == "flex":
            from torch.nn.attention.flex_attention import flex_attention
            device = torch.device(device)
            if device.type == "cuda":
                capability = torch.cuda.get_device_capability(device)
                limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
                # per dtype, because autocast decides the activations' dtype only when the model runs
                self.kernelOptions = {dtype: describeFlexAttention(capability, dtype, headDim, flexBlockSize,
                                                                   limit).kernelOptions for dtype in FLEX_DTYPES}
                self.flexAttention = compiledFlexAttention()
            else:  # FlexAttention runs eagerly on a CPU, where tiles mean nothing, but it takes the same options
                self.kernelOptions = {dtype: flexTileOptions(flexBlockSize) for dtype in FLEX_DTYPES}
                self.flexAttention = flex_attention

    def mask(self, docs):
        """The mask for docs [nB, T]; with softplus and sigmoid scores, (mask, scoreRowTerms [nB, T])."""
        mask = flexBlockMask(docs, self.contextSize) if self.implementation == "flex" else \
            denseAttentionMask(docs, self.contextSize)
        if self.score in ("softplus", "sigmoid"):
            return mask, scoreRowTerms(self.score, keyCounts(docs, self.contextSize), self.headDim)
        return mask

    def __call__(self, q, k, v, mask, scoreAf=None):  # [nB, H, T, hd]; scoreAf: the spline of spline scores
        if self.score == "softmax":
            if self.implementation == "flex":
                return self.flexAttention(q, k, v, block_mask=mask, kernel_options=self.kernelOptions.get(q.dtype))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        mask, rowTerms = mask if isinstance(mask, tuple) else (mask, None)
        if self.implementation != "flex":
            return explicitAttention(q, k, v, mask, self.score, rowTerms, scoreAf)
        scoreMod = scoreModFor(self.score, rowTerms, scoreAf)
        options = self.kernelOptions.get(q.dtype)
        if self.score != "sigmoid":
            return self.flexAttention(q, k, v, score_mod=scoreMod, block_mask=mask, kernel_options=options)
        from torch.nn.attention.flex_attention import AuxRequest
        out, aux = self.flexAttention(q, k, v, score_mod=scoreMod, block_mask=mask, kernel_options=options,
                                      return_aux=AuxRequest(lse=True))
        return (out.float() * aux.lse.exp()[..., None]).to(out.dtype)  # the row sums of sigmoid(s + b)

    def describeScore(self):
        """How the weights are made from the scores s, for the log header."""
        formula = {"softmax": "softmax(s)",
                   "softplus": f"softplus(s log(n)/log({self.headDim})) / sum (LSSA), n = keys attended",
                   "sigmoid": "sigmoid(s - log n), n = keys attended, not normalised",
                   "spline": f"softmax(phi(s)), phi a learned spline on [-sqrt({self.headDim}), sqrt({self.headDim})]",
                   }[self.score]
        if self.score == "softmax":
            return formula
        return formula + (" (FlexAttention score_mod)" if self.implementation == "flex" else " (explicit scores)")

    def fallBackToSdpa(self, error):
        """After `error` from a step run with FlexAttention, switch this kernel to SDPA and return the line to
        print; re-raises `error` when FlexAttention was not in use (then it was not the cause). Masks made
        before the switch are block masks: the caller reruns the whole step, and a torch.compile'd model
        retraces because its guards see `implementation` change."""
        if self.implementation != "flex":
            raise error
        self.implementation = "sdpa"
        root = error
        while root.__cause__ is not None:  # dynamo and inductor wrap the error that names the problem
            root = root.__cause__
        message = str(root).strip().splitlines()
        self.flexFailure = f"{type(root).__name__}: {message[0] if message else ''}"[:300]
        return f"FlexAttention failed on this GPU ({self.flexFailure}); continuing with SDPA and the same mask"
