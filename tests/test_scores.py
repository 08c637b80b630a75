"""The attention-score nonlinearity (afType ...;score-SCORE): softmax stays today's attention bit for bit; softplus
and sigmoid weights against a hand computation under the causal, document and window masks; the score spline starts
as softmax attention and learns through both paths; its ptAf rows; phase II freezing; FlexAttention = explicit path."""
import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lmafs.network import attention
from activationFunctions import Spline, splineActivation
from lmafs.network.afFiles import AfFileError, loadAfsIntoModel, readAfFile, saveAfFiles
from lmafs.network.attention import AttentionKernel, denseAttentionMask, documentIds, explicitAttention, keyCounts, scoreModFor
from conftest import runTrainer, tinyFlags
from model import GPT
from lmafs.run.flagChecks import ConfigError, checkFlags, splitAfType, splitScoreType
from trainLmAf import Hyperparameters

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

# Positions 0..9 with a separator (0) at 4: documents [0-3] and [4-9]; window 3.
TOKENS = torch.tensor([[5, 7, 8, 9, 0, 6, 6, 7, 8, 9]])
CONTEXT = 3


def allowedKeys(query, docs):
    return [k for k in range(query + 1) if query - k < CONTEXT and docs[k] == docs[query]]


def tinyQkv(headDim=4, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    T = TOKENS.shape[1]
    q, k = (F.rms_norm(torch.randn(1, 2, T, headDim, generator=generator, dtype=dtype), (headDim,)) for _ in range(2))
    v = torch.eye(T, dtype=dtype).expand(1, 2, T, T)  # out = weights: row i of head h is the weights of query i
    return q, k, v


def handWeights(score, q, k):
    """The weights [H, T, T] computed with Python floats from their definitions."""
    docs = documentIds(TOKENS, 0)[0].tolist()
    H, T, headDim = q.shape[1], q.shape[2], q.shape[3]
    result = torch.zeros(H, T, T, dtype=torch.float64)
    for h in range(H):
        for i in range(T):
            keys = allowedKeys(i, docs)
            n = len(keys)
            s = {j: sum(float(q[0, h, i, c]) * float(k[0, h, j, c]) for c in range(headDim)) / math.sqrt(headDim)
                 for j in keys}
            if score == "softplus":
                scale = math.log(n) / math.log(headDim)
                raw = {j: math.log1p(math.exp(scale * s[j])) for j in keys}
                total = sum(raw.values())
                for j in keys:
                    result[h, i, j] = raw[j] / total
            else:
                for j in keys:
                    result[h, i, j] = 1.0 / (1.0 + math.exp(-(s[j] - math.log(n))))
    return result


def flexForward(kernel, q, k, v, mask, scoreAf=None):
    """FlexAttention's forward, which runs eagerly on a CPU (its backward does not)."""
    try:
        with torch.no_grad():
            return kernel(q, k, v, mask, scoreAf)
    except Exception as err:  # FlexAttention's CPU forward needs a recent PyTorch
        pytest.skip(f"FlexAttention forward unavailable on CPU here: {err}")


# ----------------------------------------------------------------------------------------------
# afType syntax


def testAfTypeScorePart():
    for afType, expected in (("gelu;att-linear", ("gelu", "linear", "softmax")),
                             ("spline", ("spline", "linear", "softmax")),
                             ("spline;att-spline;score-spline", ("spline", "spline", "spline")),
                             ("gelu;att-none;score-sigmoid", ("gelu", "none", "sigmoid")),
                             ("relu2;score-softplus", ("relu2", "linear", "softplus"))):
        assert splitAfType(afType) + (splitScoreType(afType)[1],) == expected
    for bad, message in (("gelu;att-linear;score-cosine", "unknown attention score 'score-cosine'"),
                         ("gelu;score-sigmoid;att-linear", "must look like")):
        with pytest.raises(ConfigError, match=message):
            checkFlags(Hyperparameters(afType=bad, filesTokensTr="x"))
    hp, _ = checkFlags(Hyperparameters(afType="gelu;att-linear;score-spline", filesTokensTr="x"))
    assert hp.afLr == 0.1 and hp.saveAfEvery == 0  # the score spline is learned and written like the others
    fixed = Hyperparameters(afType="gelu;att-linear;score-sigmoid", filesTokensTr="x")
    assert "afLr=0 and afLayerSpecific=0 (no learnable AF)" in checkFlags(fixed)[1]


# ----------------------------------------------------------------------------------------------
# softmax: today's attention, bit for bit


def testSoftmaxIsTodaysAttentionBitForBit():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8) for _ in range(3))
    docs = documentIds(torch.randint(0, 6, (2, 40)), 0)
    sdpa = AttentionKernel("sdpa", 5, 16, 8)
    mask = sdpa.mask(docs)
    assert torch.equal(mask, denseAttentionMask(docs, 5))
    assert torch.equal(sdpa(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # FlexAttention receives exactly today's call: no score_mod, no auxiliary outputs
    flex = AttentionKernel("flex", 5, 16, 8)
    received = {}
    flex.flexAttention = lambda *args, **kwargs: received.update(args=args, kwargs=kwargs)
    flex(q, k, v, flex.mask(docs))
    assert set(received["kwargs"]) == {"block_mask", "kernel_options"} and len(received["args"]) == 3
    # and a model without a score part is the model with score-softmax
    default, explicit, tokens = sameInitModels(1, 16, afScore="softmax")
    assert torch.equal(default.logits(tokens), explicit.logits(tokens))
    assert len(default.scoreAfs) == 0 and len(default.afParameters()) == len(explicit.afParameters())


def sameInitModels(seed, dimEmb, **second):
    """A tiny default GPT, the same GPT built from the same seed with the arguments `second`, and tokens for both."""
    args = dict(vocabSize=64, nLayers=2, nHeads=2, dimEmb=dimEmb, tokenDocSep=0, contextSize=5, freezeEmbeddings=-3)
    torch.manual_seed(seed)
    first = GPT(**args)
    torch.manual_seed(seed)
    return first, GPT(**args, **second), torch.randint(0, 6, (1, 2, 41))


# ----------------------------------------------------------------------------------------------
# softplus and sigmoid against a hand computation


def testKeyCountsAreTheMaskRowSums():
    docs = documentIds(torch.randint(0, 4, (3, 50)), 0)
    for contextSize in (1, 4, 50):
        assert torch.equal(keyCounts(docs, contextSize), denseAttentionMask(docs, contextSize)[:, 0].sum(-1))


@pytest.mark.parametrize("score", ["softplus", "sigmoid"])
@pytest.mark.parametrize("implementation", ["sdpa", "flex"])
def testWeightsAgainstAHandComputation(score, implementation):
    q, k, v = tinyQkv()
    kernel = AttentionKernel(implementation, CONTEXT, 16, 4, score)
    mask = kernel.mask(documentIds(TOKENS, 0))
    got = kernel(q, k, v, mask) if implementation == "sdpa" else flexForward(kernel, q, k, v, mask)
    expected = handWeights(score, q, k)
    torch.testing.assert_close(got[0].double(), expected, atol=2e-6, rtol=1e-5)
    rows = got[0].sum(-1)
    if score == "softplus":
        torch.testing.assert_close(rows, torch.ones_like(rows))
    else:  # not normalised: the first key of each document gets sigmoid(s) alone, the window rows sum to about 1
        assert not torch.allclose(rows, torch.ones_like(rows), atol=1e-2)


# ----------------------------------------------------------------------------------------------
# the score spline


def identitySpline(headDim, nKnots=64):
    return Spline(nKnots=nKnots, knotRange=math.sqrt(headDim), init=-1)


def testIdentityScoreSplineEqualsSoftmaxAttention():
    torch.manual_seed(0)
    headDim = 16
    q, k = (F.rms_norm(torch.randn(2, 2, 40, headDim), (headDim,)) for _ in range(2))
    v = torch.randn(2, 2, 40, headDim)
    docs = documentIds(torch.randint(0, 6, (2, 40)), 0)
    mask = denseAttentionMask(docs, 7)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    spline = identitySpline(headDim)
    scores = q @ k.transpose(-2, -1) / math.sqrt(headDim)
    assert float(scores.abs().max()) <= math.sqrt(headDim) * (1 + 1e-6)  # the knots cover every score
    torch.testing.assert_close(spline(scores), scores, atol=2e-6, rtol=0)  # identity up to float rounding
    torch.testing.assert_close(explicitAttention(q, k, v, mask, "spline", scoreAf=spline), expected,
                               atol=2e-6, rtol=1e-5)
    flex = AttentionKernel("flex", 7, 16, headDim, "spline")
    torch.testing.assert_close(flexForward(flex, q, k, v, flex.mask(docs), spline), expected, atol=2e-6, rtol=1e-5)
    # a whole model: score-spline at init computes what score-softmax computes
    softmax, withSpline, tokens = sameInitModels(3, 32, afScore="spline")
    torch.testing.assert_close(withSpline.logits(tokens), softmax.logits(tokens), atol=1e-5, rtol=1e-5)


def testScoreSplineModules():
    model = GPT(vocabSize=64, nLayers=4, nHeads=2, dimEmb=32, nModels=3, afScore="spline", afLayerSpecific=2,
                afNAnchors=33, afInit=0.01)
    assert len(model.scoreAfs) == 3 and [model.scoreAfIndex[i] for i in range(4)] == [0, 1, 1, 2]
    assert model.scoreAf(1) is model.scoreAf(2) and model.scoreAf(0) is not model.scoreAf(1)
    spline = model.scoreAf(0)
    assert spline.nKnots == 33 and spline.knotRange == pytest.approx(4.0)  # sqrt(32 / 2), not afRange
    assert torch.equal(spline.values.detach(), spline.knots)  # the identity, whatever afInit
    ids = {id(p) for p in model.afParameters()}
    assert all(id(m.values) in ids for m in model.scoreAfs)
    assert model.singleModel(1).scoreAf(3) is model.scoreAf(3)  # shared by the models of phase I
    assert "score" not in " ".join(model.afSiteNames())


def testScoreSplineGradcheck():
    torch.manual_seed(0)
    headDim = 4
    q, k = (F.rms_norm(torch.randn(1, 1, 10, headDim, dtype=torch.float64), (headDim,)) for _ in range(2))
    v = torch.randn(1, 1, 10, headDim, dtype=torch.float64)
    mask = denseAttentionMask(documentIds(TOKENS, 0), CONTEXT)
    knotMin, knotStep = -2.0, 4.0 / 8
    values = (torch.linspace(-2, 2, 9, dtype=torch.float64) + 0.3 * torch.randn(9, dtype=torch.float64))
    values.requires_grad_()

    def attentionOfValues(values, q, k, v):
        spline = lambda s: splineActivation(s, values, knotMin, knotStep)  # noqa: E731
        return explicitAttention(q, k, v, mask, "spline", scoreAf=spline)

    assert torch.autograd.gradcheck(attentionOfValues, (values, q.requires_grad_(), k.requires_grad_(),
                                                        v.requires_grad_()))


def bypassFlexCpuCheck(monkeypatch):
    """FlexAttention refuses a backward on a CPU at its entry; behind that check its autograd function, the joint
    graph of the score_mod (with the gradients to captured tensors) and a dense backward of the same graph all run
    on a CPU. On CUDA the same graph goes to the Triton backward kernel."""
    import torch.nn.attention.flex_attention as flexModule
    monkeypatch.setattr(flexModule, "_validate_device", lambda q, k, v: None)


@pytest.mark.parametrize("score", ["spline", "softplus", "sigmoid"])
def testFlexGradientsEqualTheExplicitPath(monkeypatch, score):
    bypassFlexCpuCheck(monkeypatch)
    torch.manual_seed(0)
    headDim = 8
    q, k = (F.rms_norm(torch.randn(2, 2, 40, headDim), (headDim,)).requires_grad_() for _ in range(2))
    v = torch.randn(2, 2, 40, headDim, requires_grad=True)
    docs = documentIds(torch.randint(0, 6, (2, 40)), 0)
    spline = identitySpline(headDim, nKnots=17)
    with torch.no_grad():
        spline.values.add_(0.5 * torch.randn(17))
    upstream = torch.randn(2, 2, 40, headDim)
    results = []
    for implementation in ("flex", "sdpa"):
        kernel = AttentionKernel(implementation, 7, 16, headDim, score)
        out = kernel(q, k, v, kernel.mask(docs), spline)
        inputs = (q, k, v) + ((spline.values,) if score == "spline" else ())
        results.append((out,) + torch.autograd.grad((out * upstream).sum(), inputs))
    for flexValue, explicitValue in zip(*results):
        torch.testing.assert_close(flexValue, explicitValue, atol=2e-5, rtol=1e-4)
    assert results[0][-1].abs().sum() > 0  # spline: the gradient reaches the values captured by the score_mod


def flexJointGraphs(monkeypatch, score):
    """The joint graphs (score_mod forward and its gradients) FlexAttention builds for a training step with this
    score type, as inductor's GPU lowering receives them."""
    hop = importlib.import_module("torch._higher_order_ops.flex_attention")  # the package attribute is the operator
    createFwBwGraph, graphs = hop.create_fw_bw_graph, []

    def recording(*args, **kwargs):
        scoreMod, jointGraph = createFwBwGraph(*args, **kwargs)
        graphs.append(jointGraph)
        return scoreMod, jointGraph

    monkeypatch.setattr(hop, "create_fw_bw_graph", recording)
    bypassFlexCpuCheck(monkeypatch)
    torch.manual_seed(0)
    headDim = 8
    q, k = (F.rms_norm(torch.randn(1, 2, 40, headDim), (headDim,)).requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, 40, headDim, requires_grad=True)
    kernel = AttentionKernel("flex", 7, 16, headDim, score)
    out = kernel(q, k, v, kernel.mask(documentIds(torch.randint(0, 6, (1, 40)), 0)), identitySpline(headDim, 17))
    out.sum().backward()
    return graphs


@pytest.mark.parametrize("score", ["spline", "softplus", "sigmoid"])
def testEveryScoreModPassesInductorsJointGraphValidation(monkeypatch, score):
    # inductor's flex backward lowering runs this check on CUDA before it generates the kernel; the score spline's
    # values[i] and values[i + 1] failed it ("multiple indexing operations on the same tensor that requires
    # gradients"), so a score-spline run fell back to T x T scores
    try:
        from torch._inductor.kernel.flex.flex_attention import validate_joint_graph
    except ImportError:  # torch < 2.9 keeps it one package up
        from torch._inductor.kernel.flex_attention import validate_joint_graph
    graphs = flexJointGraphs(monkeypatch, score)
    assert graphs
    for graph in graphs:
        graph.graph.eliminate_dead_code()  # as the lowering does first
        validate_joint_graph(graph.graph)
    if score == "spline":  # and the gradient reaches the two tensors the score_mod reads from the spline's values
        scatters = [n for n in graphs[0].graph.nodes if "zeros_and_scatter" in str(n.target)]
        assert len(scatters) == 2


def testFlexKernelFollowsItsDeviceNotTheMachine(monkeypatch):
    # a CPU model where a GPU exists runs FlexAttention eagerly, as without one: compiling it would hand CPU tensors
    # to inductor's CPU flex, which fails
    from torch.nn.attention.flex_attention import flex_attention
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kernel = AttentionKernel("flex", 7, 16, 8, "spline")
    assert kernel.flexAttention is flex_attention and kernel.kernelOptions[torch.float32] == {
        name: 16 for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}
    assert GPT(vocabSize=64, nLayers=1, nHeads=2, dimEmb=16, attention="flex").kernel.flexAttention is flex_attention


def testSplineScoreModIsTheSpline():
    torch.manual_seed(0)
    spline = identitySpline(16, nKnots=9)
    with torch.no_grad():
        spline.values.copy_(torch.randn(9))
    s = torch.linspace(-6, 6, 301)  # also outside the knots, where the spline is constant
    mod = scoreModFor("spline", scoreAf=spline)
    torch.testing.assert_close(torch.stack([mod(x, 0, 0, 0, 0) for x in s]), spline(s).detach(), atol=1e-6, rtol=0)
    assert attention.SCORE_TYPES == ("softmax", "softplus", "sigmoid", "spline")


# ----------------------------------------------------------------------------------------------
# ptAf files and phase II


def scoreModel(afLayerSpecific=1, seed=0):
    torch.manual_seed(seed)
    model = GPT(vocabSize=64, nLayers=3, nHeads=2, dimEmb=32, afMlp="spline", afAtt="linear", afScore="spline",
                afLayerSpecific=afLayerSpecific, afRange=10.0, afNAnchors=16)
    with torch.no_grad():
        for p in model.afParameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("suffix", [".pt", ".csv"])
@pytest.mark.parametrize("afLayerSpecific", [0, 1])
def testPtAfRoundTripWithScoreRows(tmp_path, suffix, afLayerSpecific):
    source = scoreModel(afLayerSpecific)
    saveAfFiles(str(tmp_path / "ptAf-x"), source, {"afType": "spline;att-linear;score-spline"}, 5)
    lines = (tmp_path / "ptAf-x.csv").read_text().splitlines()
    assert len(lines) == 2 * 3 * 2  # 3 MLP then 3 score splines, a line of knots and one of values each
    assert [float(x) for x in lines[0].split(",")][-1] == 10.0
    assert float(lines[-2].split(",")[-1]) == pytest.approx(4.0)  # score rows carry their own knots: sqrt(16)
    data = readAfFile(str(tmp_path / "ptAf-x.pt"))
    assert data["afTypeScore"] == "spline" and len(data["scoreValues"]) == 3
    assert float(data["scoreKnots"][-1]) == pytest.approx(4.0) and float(data["knots"][-1]) == 10.0
    target = scoreModel(afLayerSpecific, seed=1)
    notes = loadAfsIntoModel(target, str(tmp_path / f"ptAf-x{suffix}"), freeze=True)
    assert any("attention-score splines" in note and "frozen" in note for note in notes)
    for layer in range(3):
        for kind in ("mlpAf", "scoreAf"):
            got, expected = getattr(target, kind)(layer), getattr(source, kind)(layer)
            assert torch.equal(got.values, expected.values.detach()) and torch.equal(got.knots, expected.knots)
            assert not got.values.requires_grad
    assert target.scoreAf(0).knotRange == pytest.approx(4.0) and target.mlpAf(0).knotRange == 10.0


def testOldFilesAndMissingScoreRows(tmp_path):
    torch.manual_seed(0)
    old = GPT(vocabSize=64, nLayers=3, nHeads=2, dimEmb=32, afMlp="spline", afAtt="spline")
    saveAfFiles(str(tmp_path / "ptAf-old"), old, {}, 5)
    data = torch.load(tmp_path / "ptAf-old.pt", weights_only=True)
    for key in ("afTypeScore", "scoreKnots", "scoreValues"):
        del data[key]  # as written before score splines existed
    torch.save(data, tmp_path / "ptAf-old.pt")
    read = readAfFile(str(tmp_path / "ptAf-old.pt"))
    assert read["scoreValues"] == [] and read["afTypeScore"] == "softmax" and len(read["mlpValues"]) == 3
    wanting = GPT(vocabSize=64, nLayers=3, nHeads=2, dimEmb=32, afMlp="spline", afAtt="spline", afScore="spline")
    for suffix in (".pt", ".csv"):
        with pytest.raises(AfFileError) as err:
            loadAfsIntoModel(wanting, str(tmp_path / f"ptAf-old{suffix}"), freeze=True)
        assert "\n" not in str(err.value) and ("score" in str(err.value))
    # a file with score splines feeds a model without them, which says it does not use them
    saveAfFiles(str(tmp_path / "ptAf-new"), scoreModel(), {}, 5)
    plain = GPT(vocabSize=64, nLayers=3, nHeads=2, dimEmb=32, afMlp="spline", afAtt="linear", afRange=10.0,
                afNAnchors=16)
    notes = loadAfsIntoModel(plain, str(tmp_path / "ptAf-new.pt"), freeze=True)
    assert any("attention-score AFs are not used" in note for note in notes)


def testPhase1ThenPhase2FrozenScoreSpline(tinyData, tmp_path):
    phase1 = tmp_path / "phase1"
    result = runTrainer(tinyFlags(tinyData, phase1, nModels=2, afType="spline;att-spline;score-spline",
                                  afLayerSpecific=0, afLr=0.1, runName="s1", plottingLevel=1, plotEvery=4))
    assert result.returncode == 0, result.stderr
    learned = torch.load(phase1 / "ptAf-s1-step0008.pt", weights_only=True)
    assert len(learned["scoreValues"]) == 2 and torch.equal(learned["scoreValues"][0], learned["scoreValues"][1])
    assert not torch.equal(learned["scoreValues"][0], learned["scoreKnots"])  # phase I moved it off the identity
    assert (phase1 / "af-s1-step000008.png").is_file()
    log = (phase1 / "log-s1.txt").read_text()
    assert "Attention weights: softmax(phi(s)), phi a learned spline on [-sqrt(16), sqrt(16)]" in log
    phase2 = tmp_path / "phase2"
    result = runTrainer(tinyFlags(tinyData, phase2, afType="spline;att-spline;score-spline", afLayerSpecific=1,
                                  afLr=0, runName="s2", saveModelEvery=0,
                                  afFileToLoad=str(phase1 / "ptAf-s1-step0008.pt")))
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(phase2 / "pt-s2-step0008.pt", weights_only=True)
    for layer in range(2):  # frozen: the file's values after 8 steps, in every layer
        assert torch.equal(checkpoint["model"][f"scoreAfs.{layer}.values"], learned["scoreValues"][0])
        assert torch.equal(checkpoint["afValuesScore"][layer], learned["scoreValues"][0])
    assert not list(phase2.glob("ptAf-*"))
    assert "loaded attention-score splines" in (phase2 / "log-s2.txt").read_text()


@pytest.mark.parametrize("score, backend", [("spline", "eager"), ("spline", "aot_eager"), ("softplus", "aot_eager"),
                                            ("sigmoid", "aot_eager")])
def testCompiledFlexModelEqualsTheExplicitPath(monkeypatch, score, backend):
    """The whole model as CUDA runs it, up to the kernels: compiled (dynamo + AOTAutograd with the aot_eager backend),
    FlexAttention's forward and backward operators in its graph with the captured score tensors as inputs; the same
    losses and gradients (the score spline's included) as the explicit path. The score spline's captured tensors are
    computed from its values inside the graph, and the CPU stand-in of FlexAttention's backward that aot_eager runs
    (not inductor's GPU kernel) returns no gradient for such tensors: there aot_eager checks the forward, and dynamo
    with eager autograd ('eager') the gradients."""
    bypassFlexCpuCheck(monkeypatch)
    args = dict(vocabSize=64, nLayers=2, nHeads=2, dimEmb=16, nModels=2, afMlp="spline", afAtt="spline",
                afLayerSpecific=0, tokenDocSep=0, contextSize=5, flexBlockSize=16, afScore=score, freezeEmbeddings=-3)
    models = []
    for implementation in ("flex", "sdpa"):
        torch.manual_seed(0)
        model = GPT(attention=implementation, **args)
        with torch.no_grad():
            for spline in model.scoreAfs:
                spline.values.add_(torch.linspace(-1, 1, spline.nKnots) ** 2)
        models.append(model)
    tokens = torch.randint(0, 6, (2, 2, 40), generator=torch.Generator().manual_seed(0))
    withGradients = not (score == "spline" and backend == "aot_eager")
    torch._dynamo.reset()
    results = []
    for model in (torch.compile(models[0], backend=backend), models[1]):
        with torch.set_grad_enabled(withGradients):
            losses, _ = model(tokens[..., :-1], tokens[..., 1:])
        if withGradients:
            losses.sum().backward()
        results.append(losses.detach())
    torch.testing.assert_close(results[0], results[1])
    if not withGradients:
        return
    for (name, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    if score == "spline":
        assert models[0].scoreAfs[0].values.grad.abs().sum() > 0
