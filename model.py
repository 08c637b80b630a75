"""The GPT of LM-AFs, written once for N models stacked along a leading model dimension (N=1: one model).

Every weight tensor has shape [nModels, ...]; a forward pass over models f..f+n-1 uses the views
weight[f:f+n] (no copy), so in phase I the models that have not started yet cost nothing, and the
active models run in one batched pass (or, to bound memory, a few passes of several models each). Activation-function (AF) modules are not stacked: one module is
applied to the activations of all models, so its gradient is the sum over the models that ran.

Architecture (modded-nanogpt style; attention kernels and masks in attention.py): token embedding -> LayerNorm ->
U-Net of blocks (encoder blocks push their output, decoder blocks add skipWeight * pop) -> head (float32 logits).
As in the original there is no norm before the head: the residual stream goes to it as it is.
Block: x = l0*x + l1*x0; x += attn(rmsNorm(x)); x += mlp(rmsNorm(x)).
Attention: h = h + af(a*h + b) (unless the attention AF is 'none'); q,k,v; value residual with the
first block's v; per-head RMS-normalised q,k; rotary; causal + same-document + sliding-window mask; weights from
the scores by softmax or another score transform (attention.SCORE_TYPES; `spline`: a learned AF, shared like the
others).
MLP: dim -> 4*dim -> AF -> dim; or gated (geglu/swiglu/reglu: af(x Wg) * (x Wv), parameter-matched width),
or two KAN layers (kan).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from activationFunctions import MLP_INPUT_TYPES, Spline, makeActivation, splineSmoothness
from lmafs.network.attention import AttentionKernel, documentIds

# ----------------------------------------------------------------------------------------------
# Stacked building blocks


def stackedNormal(nModels, *shape, std=0.02):
    return nn.Parameter(torch.randn(nModels, *shape) * std)


def modelsOf(param, first, n):
    """param[first:first + n], the models of one pass; param itself when the pass runs all models, so autograd
    adds no zero-filled slice gradient."""
    return param if first == 0 and n == param.shape[0] else param[first:first + n]


def stackedMatmul(x, weight, first):
    """x [n, ..., in] @ weight[first:first+n] [n, out, in]^T -> [n, ..., out] (one batched matmul for all models)."""
    n = x.shape[0]
    flat = x.reshape(n, -1, x.shape[-1])
    out = torch.bmm(flat, modelsOf(weight, first, n).transpose(1, 2).to(flat.dtype))
    return out.view(*x.shape[:-1], weight.shape[1])


def perModel(param, x, first):
    """Broadcast a per-model parameter [N, ...] of models first..first+n-1 over activations x [n, B, T, ...]."""
    n = x.shape[0]
    p = modelsOf(param, first, n)
    return p.view(n, *([1] * (x.dim() - p.dim())), *p.shape[1:])


def rmsNorm(x, weight, first, eps=1e-5):
    y = F.rms_norm(x, (x.shape[-1],), eps=eps)
    return y * perModel(weight, y, first).to(y.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (base 10000), rotating the two halves of each head dimension."""

    def __init__(self, headDim, base=10000.0):
        super().__init__()
        self.register_buffer("invFreq", 1.0 / base ** (torch.arange(0, headDim, 2, dtype=torch.float32) / headDim),
                             persistent=False)

    def forward(self, x):  # x [nB, T, H, hd]
        positions = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        angles = torch.outer(positions, self.invFreq)
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(x)


# ----------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    def __init__(self, nModels, dimEmb, nHeads, hasPreAf, zeroInit):
        super().__init__()
        self.nHeads, self.headDim = nHeads, dimEmb // nHeads
        self.hasPreAf = hasPreAf
        if hasPreAf:  # h + af(a*h + b), a=1, b=0
            self.afScale = nn.Parameter(torch.ones(nModels))
            self.afShift = nn.Parameter(torch.zeros(nModels))
        self.qkv = stackedNormal(nModels, 3 * dimEmb, dimEmb)
        self.valueLambda = nn.Parameter(torch.full((nModels,), 0.5))
        self.proj = nn.Parameter(torch.zeros(nModels, dimEmb, dimEmb)) if zeroInit else stackedNormal(nModels, dimEmb, dimEmb)
        self.rotary = Rotary(self.headDim)

    def forward(self, x, vFirst, af, kernel, mask, stats, first, scoreAf=None):  # x [n, B, T, D]
        n, B, T, D = x.shape
        if self.hasPreAf:
            preAf = perModel(self.afScale, x, first) * x + perModel(self.afShift, x, first)
            recordMagnitudes(stats, preAf)
            x = x + af(preAf)
        q, k, v = stackedMatmul(x, self.qkv, first).view(n * B, T, 3 * self.nHeads, self.headDim).chunk(3, dim=2)
        if vFirst is None:
            vFirst = v
        lam = modelsOf(self.valueLambda, first, n).repeat_interleave(B).view(n * B, 1, 1, 1).to(v.dtype)
        v = (1 - lam) * v + lam * vFirst
        # QK normalisation with F.rms_norm's default eps (the dtype's machine epsilon), as the original
        q, k = self.rotary(F.rms_norm(q, (self.headDim,))), self.rotary(F.rms_norm(k, (self.headDim,)))
        q, k = q.to(v.dtype), k.to(v.dtype)  # CUDA autocast runs rms_norm in float32; attention wants one dtype
        y = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scoreAf)  # [nB, H, T, hd]
        y = y.transpose(1, 2).reshape(n, B, T, D)
        return stackedMatmul(y, self.proj, first), vFirst


class Mlp(nn.Module):
    """dim -> 4*dim -> af -> dim; afTakesInput: the AF also reads the MLP input (af(h, x), as `moa` does)."""

    def __init__(self, nModels, dimEmb, zeroInit, afTakesInput=False):
        super().__init__()
        self.afTakesInput = afTakesInput
        self.fc = stackedNormal(nModels, 4 * dimEmb, dimEmb)
        self.proj = nn.Parameter(torch.zeros(nModels, dimEmb, 4 * dimEmb)) if zeroInit \
            else stackedNormal(nModels, dimEmb, 4 * dimEmb)

    def forward(self, x, af, stats, first):
        h = stackedMatmul(x, self.fc, first)
        recordMagnitudes(stats, h)
        return stackedMatmul(af(h, x) if self.afTakesInput else af(h), self.proj, first)


def gatedHiddenWidth(dimEmb):
    """Hidden width of a gated MLP with the plain MLP's parameter count: 3*D*H ~ 8*D^2, H a multiple of 64."""
    return max(64, round(8 * dimEmb / 3 / 64) * 64)


class GatedMlp(nn.Module):
    """dim -> (gate, value) -> af(gate) * value -> dim (GLU variants, Shazeer 2020); af is GELU/SiLU/ReLU for
    GEGLU/SwiGLU/ReGLU. Two input projections stored as one [2H, D] matrix so both take one matmul."""

    def __init__(self, nModels, dimEmb, hidden, zeroInit):
        super().__init__()
        self.fc = stackedNormal(nModels, 2 * hidden, dimEmb)
        self.proj = nn.Parameter(torch.zeros(nModels, dimEmb, hidden)) if zeroInit \
            else stackedNormal(nModels, dimEmb, hidden)

    def forward(self, x, af, stats, first):
        gate, value = stackedMatmul(x, self.fc, first).chunk(2, dim=-1)  # [n, B, T, H] each
        recordMagnitudes(stats, gate)
        return stackedMatmul(af(gate) * value, self.proj, first)


def bSplineBasis(x, grid, order):
    """[..., in] -> [..., in, len(grid) - 1 - order]: B-spline basis of degree `order` on the knots `grid`
    (Cox-de Boor recursion from the interval indicators); zero outside [grid[0], grid[-1])."""
    x = x.unsqueeze(-1)
    bases = ((x >= grid[:-1]) & (x < grid[1:])).to(x.dtype)
    for p in range(1, order + 1):
        left = (x - grid[:-(p + 1)]) / (grid[p:-1] - grid[:-(p + 1)]) * bases[..., :-1]
        right = (grid[p + 1:] - x) / (grid[p + 1:] - grid[1:-p]) * bases[..., 1:]
        bases = left + right
    return bases


class KanLayer(nn.Module):
    """in -> out KAN layer (Liu et al. 2024) for nModels stacked models: a learned function per edge,
    y_o = sum_i baseWeight[o, i] * silu(x_i) + sum_i sum_j splineWeight[o, i, j] * B_j(x_i),
    B_j the gridSize + splineOrder B-splines of a uniform grid on [-gridRange, gridRange] (extended by
    splineOrder knots each side, so every point of the range is covered by a full set of bases)."""

    def __init__(self, nModels, inDim, outDim, gridSize, splineOrder, gridRange, zeroInit):
        super().__init__()
        step = 2.0 * gridRange / gridSize
        knots = torch.arange(-splineOrder, gridSize + splineOrder + 1, dtype=torch.float32) * step - gridRange
        self.register_buffer("grid", knots)
        self.splineOrder = splineOrder
        nBases = gridSize + splineOrder
        if zeroInit:
            self.baseWeight = nn.Parameter(torch.zeros(nModels, outDim, inDim))
            self.splineWeight = nn.Parameter(torch.zeros(nModels, outDim, inDim * nBases))
        else:
            self.baseWeight = stackedNormal(nModels, outDim, inDim)
            self.splineWeight = stackedNormal(nModels, outDim, inDim * nBases)

    def forward(self, x, af, first):  # x [n, B, T, in]; af: the base branch's function (SiLU)
        # The basis is built in float32 at least: the recursion divides by knot spacings.
        bases = bSplineBasis(x.to(torch.promote_types(x.dtype, torch.float32)), self.grid, self.splineOrder)
        bases = bases.to(x.dtype).flatten(-2)  # [n, B, T, in * nBases], input-major like splineWeight's columns
        return stackedMatmul(af(x), self.baseWeight, first) + stackedMatmul(bases, self.splineWeight, first)


def kanHiddenWidth(dimEmb, gridSize, splineOrder):
    """Hidden width of a KAN MLP with about the plain MLP's parameters: 2*D*H*(G+k+1) ~ 8*D^2, H a multiple of 16."""
    return max(16, round(4 * dimEmb / (gridSize + splineOrder + 1) / 16) * 16)


class KanMlp(nn.Module):
    """The MLP as two KAN layers dim -> hidden -> dim; the second starts at zero like the plain MLP's projection.
    Inputs are RMS-normalised, so the grid [-2, 2] covers ~95% of them; the SiLU branch carries the rest."""

    def __init__(self, nModels, dimEmb, hidden, gridSize, splineOrder, zeroInit, gridRange=2.0):
        super().__init__()
        self.fc = KanLayer(nModels, dimEmb, hidden, gridSize, splineOrder, gridRange, zeroInit=False)
        self.proj = KanLayer(nModels, hidden, dimEmb, gridSize, splineOrder, gridRange, zeroInit)

    def forward(self, x, af, stats, first):
        h = self.fc(x, af, first)
        recordMagnitudes(stats, h)
        return self.proj(h, af, first)


# The AF module each MLP variant applies: the gate's function (gated MLPs) or the KAN base branch's.
MLP_VARIANT_AFS = {"geglu": "gelu", "swiglu": "silu", "reglu": "relu", "kan": "silu"}


def makeMlp(afMlp, nModels, dimEmb, zeroInit, kanGridSize=5, kanSplineOrder=3):
    """The MLP that afMlp asks for: gated (geglu/swiglu/reglu), KAN (kan) or the plain one."""
    if afMlp in ("geglu", "swiglu", "reglu"):
        return GatedMlp(nModels, dimEmb, gatedHiddenWidth(dimEmb), zeroInit)
    if afMlp == "kan":
        if kanGridSize < 1 or kanSplineOrder < 0:
            raise ValueError(f"kan needs gridSize >= 1 and splineOrder >= 0, got {kanGridSize} and {kanSplineOrder}")
        return KanMlp(nModels, dimEmb, kanHiddenWidth(dimEmb, kanGridSize, kanSplineOrder), kanGridSize,
                      kanSplineOrder, zeroInit)
    return Mlp(nModels, dimEmb, zeroInit, afTakesInput=afMlp in MLP_INPUT_TYPES)


class Block(nn.Module):
    def __init__(self, nModels, dimEmb, nHeads, hasPreAf, zeroInit, mlp):
        super().__init__()
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]).repeat(nModels, 1))
        self.attnNorm = nn.Parameter(torch.ones(nModels, dimEmb))
        self.mlpNorm = nn.Parameter(torch.ones(nModels, dimEmb))
        self.attn = Attention(nModels, dimEmb, nHeads, hasPreAf, zeroInit)
        self.mlp = mlp

    def forward(self, x, x0, vFirst, attAf, mlpAf, kernel, mask, stats, first, scoreAf=None):
        lam = perModel(self.lambdas, x[..., :1], first)
        x = lam[..., 0:1] * x + lam[..., 1:2] * x0
        attnOut, vFirst = self.attn(rmsNorm(x, self.attnNorm, first), vFirst, attAf, kernel, mask, stats, first,
                                    scoreAf)
        x = x + attnOut
        x = x + self.mlp(rmsNorm(x, self.mlpNorm, first), mlpAf, stats, first)
        return x, vFirst


def recordMagnitudes(stats, x):
    """Hand the first model's AF inputs x[0] to stats (an AfInputStatistics) when the caller asked for them."""
    if stats is not None:
        stats.record(x[0].detach())


class AfInputStatistics:
    """What the AF inputs of one forward pass look like, site by site in the order of GPT.afSiteNames(): mean and
    max |x|, the share outside the spline's knot range [-knotRange, knotRange] (where a spline is constant), and a
    histogram over HISTOGRAM_SPAN times that range, to choose --afRange. record() and table() are tensor operations
    on the inputs' device (GPT.afInputTable compiles them with the model); results() reads the table on the host."""

    HISTOGRAM_SPAN = 1.5
    HISTOGRAM_BINS = 90

    def __init__(self, knotRange):
        self.knotRange = float(knotRange)
        self.sites = []  # per site: tensor [4 + HISTOGRAM_BINS]: mean, max, share outside, count, histogram

    def record(self, x):
        a = x.float().reshape(-1)
        limit = self.HISTOGRAM_SPAN * self.knotRange
        histogram = torch.histc(a.clamp(-limit, limit), bins=self.HISTOGRAM_BINS, min=-limit, max=limit)
        magnitude = a.abs()
        outside = (magnitude > self.knotRange).float().mean()
        count = a.new_full((), a.numel())  # on a's device: stack refuses to mix devices
        self.sites.append(torch.cat((torch.stack((magnitude.mean(), magnitude.max(), outside, count)), histogram)))

    def table(self):
        """[sites, 4 + HISTOGRAM_BINS] on the inputs' device."""
        return torch.stack(self.sites)

    @classmethod
    def results(cls, table, knotRange):
        """{'mean', 'max', 'outside', 'counts'} lists per site, 'histograms' [sites, bins] (the edge bins hold what
        lies beyond the span) and their bin 'edges', from a table()."""
        table = table.cpu()
        limit = cls.HISTOGRAM_SPAN * float(knotRange)
        return {"mean": table[:, 0].tolist(), "max": table[:, 1].tolist(), "outside": table[:, 2].tolist(),
                "counts": table[:, 3].tolist(), "histograms": table[:, 4:].numpy(),
                "edges": torch.linspace(-limit, limit, cls.HISTOGRAM_BINS + 1, device="cpu").numpy()}


# ----------------------------------------------------------------------------------------------
# AF sharing across layers


def afLayerGroups(nLayers, afLayerSpecific):
    """Index of the AF module each layer uses: 0 shared by all; 1 one per layer; 2 first/last own, middle shared."""
    if afLayerSpecific == 0:
        return [0] * nLayers
    if afLayerSpecific == 1:
        return list(range(nLayers))
    if afLayerSpecific == 2:
        if nLayers < 4:
            raise ValueError(f"afLayerSpecific 2 needs at least 4 layers, got nLayers={nLayers}")
        return [0] + [1] * (nLayers - 2) + [2]
    raise ValueError(f"afLayerSpecific must be 0, 1 or 2, got {afLayerSpecific!r}")


# ----------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """nModels GPTs with stacked weights and shared AF modules.

    forward(tokens [n, B, T], targets [n, B, T], firstModel=f) runs models f..f+n-1 and returns per-model mean loss
    [n] and token accuracy [n]; logits(tokens) returns float32 logits [n, B, T, vocab]. device: where the model will
    run (the caller moves it there); FlexAttention's compilation and kernel options follow it.
    """

    def __init__(self, vocabSize, nLayers=4, nHeads=4, dimEmb=256, nModels=1, afMlp="gelu", afAtt="linear",
                 afLayerSpecific=1, afRange=15.0, afNAnchors=64, afInit=0.01, tieEmbeddings=True,
                 freezeEmbeddings=0, contextSize=1024, tokenDocSep=50256, attention="sdpa", flexBlockSize=32,
                 kanGridSize=5, kanSplineOrder=3, afScore="softmax", afInitAtt=None, device="cpu"):
        super().__init__()
        self.config = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        if dimEmb % nHeads or (dimEmb // nHeads) % 2:
            raise ValueError(f"dimEmb ({dimEmb}) must be divisible by nHeads ({nHeads}) into an even head size")
        self.nModels, self.nLayers, self.vocabSize = nModels, nLayers, vocabSize
        self.tieEmbeddings = tieEmbeddings
        self.tokenDocSep = tokenDocSep
        self.afMlpName, self.afAttName, self.afScoreName = afMlp, afAtt, afScore
        headDim = dimEmb // nHeads
        self.kernel = AttentionKernel(attention, contextSize, flexBlockSize, headDim, afScore, device)
        zeroInit = freezeEmbeddings >= 0  # training only embeddings through frozen zero matrices would learn nothing

        self.embed = stackedNormal(nModels, vocabSize, dimEmb)
        self.embedNormWeight = nn.Parameter(torch.ones(nModels, dimEmb))
        self.embedNormBias = nn.Parameter(torch.zeros(nModels, dimEmb))
        hasPreAf = afAtt != "none"
        self.blocks = nn.ModuleList(
            Block(nModels, dimEmb, nHeads, hasPreAf, zeroInit,
                  makeMlp(afMlp, nModels, dimEmb, zeroInit, kanGridSize, kanSplineOrder)) for _ in range(nLayers))
        self.nEncoder = math.ceil(nLayers / 2)
        self.skipWeights = nn.Parameter(torch.ones(nModels, nLayers - self.nEncoder))
        if not tieEmbeddings:
            headFrozen = freezeEmbeddings in (2, 3, -1)
            if headFrozen:  # a frozen zero head would block all learning: use the embedding's rows, shuffled
                head = self.embed.detach()[:, torch.randperm(vocabSize)].clone()
            else:  # a trained head starts at zero, also when only the embeddings train (-2/-3), as the original
                head = torch.zeros(nModels, vocabSize, dimEmb)
            self.head = nn.Parameter(head)

        self.mlpAfIndex = afLayerGroups(nLayers, afLayerSpecific)
        self.attAfIndex = self.mlpAfIndex if hasPreAf else []
        mlpAfName = MLP_VARIANT_AFS.get(afMlp, afMlp)
        self.mlpAfs = nn.ModuleList(makeActivation(mlpAfName, 4 * dimEmb, afNAnchors, afRange, afInit, inputDim=dimEmb)
                                    for _ in range(max(self.mlpAfIndex) + 1))
        attInit = afInit if afInitAtt is None else afInitAtt
        self.attAfs = nn.ModuleList(makeActivation(afAtt, dimEmb, afNAnchors, afRange, attInit)
                                    for _ in range(max(self.attAfIndex) + 1)) if hasPreAf else nn.ModuleList()
        # The score spline's knots span every possible score (|s| <= sqrt(headDim), see attention.py); it starts
        # as the identity, i.e. as softmax attention, whatever afInit says about the other splines.
        self.scoreAfIndex = self.mlpAfIndex if afScore == "spline" else []
        self.scoreAfs = nn.ModuleList(Spline(nKnots=afNAnchors, knotRange=math.sqrt(headDim), init=-1)
                                      for _ in range(max(self.scoreAfIndex) + 1)) if self.scoreAfIndex \
            else nn.ModuleList()

    # -- AF access ---------------------------------------------------------------------------

    def mlpAf(self, layer):
        return self.mlpAfs[self.mlpAfIndex[layer]]

    def attAf(self, layer):
        return self.attAfs[self.attAfIndex[layer]] if self.attAfIndex else None

    def scoreAf(self, layer):
        return self.scoreAfs[self.scoreAfIndex[layer]] if self.scoreAfIndex else None

    def afParameters(self):
        return [p for afs in (self.mlpAfs, self.attAfs, self.scoreAfs) for p in afs.parameters()]

    def splines(self):
        """Every spline AF module (MLP, attention, score sites), each once."""
        return [af for afs in (self.mlpAfs, self.attAfs, self.scoreAfs) for af in afs if isinstance(af, Spline)]

    def learnedSmoothness(self):
        """S, the sum of splineSmoothness over the learned splines (the smoothness prior's penalty is
        afSmoothness * S)."""
        return sum(splineSmoothness(spline) for spline in self.splines() if spline.values.requires_grad)

    def weightParameters(self):
        afIds = {id(p) for p in self.afParameters()}
        return [p for p in self.parameters() if id(p) not in afIds]

    def namedWeightParameters(self):
        afIds = {id(p) for p in self.afParameters()}
        return [(name, p) for name, p in self.named_parameters() if id(p) not in afIds]

    def afSiteNames(self):
        """Names of the AF sites in the order of the activation statistics (the original's): per layer, the
        attention site, then the MLP site. Score splines are not among them: their inputs, the attention scores,
        lie in their knot range by construction, and recording them would need the [T, T] scores FlexAttention
        never materialises."""
        return [name for i in range(self.nLayers) for name in ((f"att {i}",) if self.attAfIndex else ()) + (f"MLP {i}",)]

    def subModels(self, start, stop):
        """Models start..stop-1 as a GPT of their own (copies of their weights) sharing these AF modules."""
        part = GPT(**{**self.config, "nModels": stop - start})
        with torch.no_grad():
            for (_, p), (_, q) in zip(self.namedWeightParameters(), part.namedWeightParameters()):
                q.copy_(p[start:stop])
                q.requires_grad_(p.requires_grad)
        part.mlpAfs, part.attAfs, part.scoreAfs = self.mlpAfs, self.attAfs, self.scoreAfs
        return part.to(self.embed.device)

    def singleModel(self, index):
        """Model `index` alone: the N=1 case."""
        return self.subModels(index, index + 1)

    # -- forward ---------------------------------------------------------------------------

    def hidden(self, tokens, stats=None, firstModel=0, embed=None):
        """Final hidden states [n, B, T, D] (the residual stream the head reads) of models firstModel..firstModel+n-1
        for tokens [n, B, T]; embed: those models' embeddings, when the caller has them already."""
        n, B, T = tokens.shape
        first = firstModel
        embed = modelsOf(self.embed, first, n) if embed is None else embed
        offsets = (torch.arange(n, device=tokens.device) * self.vocabSize).view(n, 1, 1)
        x = F.embedding(tokens + offsets, embed.reshape(n * self.vocabSize, -1))
        x = (F.layer_norm(x, (x.shape[-1],)) * perModel(self.embedNormWeight, x, first)
             + perModel(self.embedNormBias, x, first))
        x0 = x
        docs = documentIds(tokens.reshape(n * B, T), self.tokenDocSep)
        mask = self.kernel.mask(docs)
        skips, vFirst = [], None
        for i, block in enumerate(self.blocks):
            if i >= self.nEncoder:
                x = x + perModel(self.skipWeights[:, i - self.nEncoder], x[..., 0], first)[..., None] * skips.pop()
            x, vFirst = block(x, x0, vFirst, self.attAf(i), self.mlpAf(i), self.kernel, mask, stats, first,
                              self.scoreAf(i))
            if i < self.nEncoder:
                skips.append(x)
        return x

    def afInputTable(self, tokens, knotRange, firstModel=0):
        """AfInputStatistics.table() of model firstModel's AF inputs for tokens [1, B, T]: a function of tensors alone,
        so torch.compile makes it one graph like the training and validation passes."""
        stats = AfInputStatistics(knotRange)
        self.hidden(tokens, stats, firstModel)  # the AF sites only: the output head would double the cost
        return stats.table()

    def logits(self, tokens, firstModel=0):
        x = self.hidden(tokens, firstModel=firstModel)
        return stackedMatmul(x, self.embed if self.tieEmbeddings else self.head, firstModel).float()

    def forward(self, tokens, targets, stats=None, firstModel=0):
        """Per-model mean cross-entropy [n] and token accuracy [n] of models firstModel..firstModel+n-1 for tokens
        and targets [n, B, T]; stats (an AfInputStatistics) receives the first of them's inputs of every AF site
        when given, in the order of afSiteNames()."""
        n = tokens.shape[0]
        # one slice of a tied embedding for both of its uses: autograd then adds the two gradients at the size of
        # the pass, and makes one full-size slice gradient instead of two
        embed = modelsOf(self.embed, firstModel, n)
        x = self.hidden(tokens, stats, firstModel, embed)
        head = embed if self.tieEmbeddings else modelsOf(self.head, firstModel, n)
        return linearCrossEntropy(x.reshape(n, -1, x.shape[-1]), head, targets.reshape(n, -1))


# ----------------------------------------------------------------------------------------------
# Output head + loss without materialising every model's logits


LOSS_CHUNK_ROWS = 1024  # a [1024, 50304] float32 logits chunk is 0.2 GB; a 4096-row one held 1.2 GB more at the peak


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy and accuracy of logits = x @ weight^T (float32), per model.

    The logits of all models at once would be n x rows x vocab floats (16 GB for 20 models of 4096
    tokens), three times over with softmax and its gradient. Here they exist one chunk of rows at a
    time: the forward pass also computes the gradients w.r.t. x and weight, which backward scales.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, needGrad):  # x [n, N, D], weight [n, V, D], targets [n, N]
        n, rows, _ = x.shape
        losses = torch.zeros(n, dtype=torch.float32, device=x.device)
        correct = torch.zeros(n, dtype=torch.float32, device=x.device)
        gradX = torch.empty(x.shape, dtype=torch.float32, device=x.device) if needGrad else None
        gradW = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if needGrad else None
        for m in range(n):
            w = weight[m]
            for start in range(0, rows, LOSS_CHUNK_ROWS):
                xs, t = x[m, start:start + LOSS_CHUNK_ROWS], targets[m, start:start + LOSS_CHUNK_ROWS]
                logits = (xs @ w.t()).float()  # [c, V]; autocast picks the matmul dtype
                logSumExp = torch.logsumexp(logits, dim=-1)
                losses[m] += (logSumExp - logits.gather(1, t[:, None]).squeeze(1)).sum()
                correct[m] += (logits.argmax(-1) == t).sum()
                if needGrad:
                    probs = logits.sub_(logSumExp[:, None]).exp_()
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    probs /= rows
                    g = probs.to(xs.dtype if xs.dtype == w.dtype else torch.float32)
                    gradX[m, start:start + LOSS_CHUNK_ROWS] = g @ w.to(g.dtype)
                    gradW[m] += g.t() @ xs.to(g.dtype)
        ctx.save_for_backward(gradX, gradW)
        ctx.dtypes = (x.dtype, weight.dtype)
        return losses / rows, correct / rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gradLoss, gradAccuracy):
        gradX, gradW = ctx.saved_tensors
        scale = gradLoss.float().view(-1, 1, 1)
        # scaled in place: the head's gradient is as large as the embedding, a copy would double it at the peak
        return gradX.mul_(scale).to(ctx.dtypes[0]), gradW.mul_(scale).to(ctx.dtypes[1]), None, None


@torch.compiler.disable
def linearCrossEntropy(x, weight, targets):
    """(losses [n], accuracies [n]) of logits x @ weight^T against targets, computed chunk by chunk."""
    needGrad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(x, weight, targets, needGrad)


# ----------------------------------------------------------------------------------------------
# Initialisation of the phase-I copies


@torch.no_grad()
def permuteInitAcrossModels(model, generator):
    """Give models 1..N-1 a permutation of model 0's elements in every weight (same distribution,
    different init); the block mixing scalars lambda are left as they are."""
    for name, p in model.namedWeightParameters():
        if name.endswith("lambdas"):
            continue
        first = p[0].reshape(-1)
        for m in range(1, p.shape[0]):
            p[m].view(-1).copy_(first[torch.randperm(first.numel(), generator=generator)])


@torch.no_grad()
def copyInitAcrossModels(model):
    for _, p in model.namedWeightParameters():
        p[1:] = p[0]
