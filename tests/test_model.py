"""The stacked GPT: AF sharing, attention masks (FlexAttention = SDPA), permuted init, single-model extraction."""
import pytest
import torch

from lmafs.network.attention import denseAttentionMask, documentIds
from model import GPT, AfInputStatistics, afLayerGroups, permuteInitAcrossModels


def tinyGpt(**kwargs):
    args = dict(vocabSize=128, nLayers=4, nHeads=2, dimEmb=16, nModels=3, afMlp="spline", afAtt="spline",
                afLayerSpecific=1, tokenDocSep=0, contextSize=6, freezeEmbeddings=-3)
    args.update(kwargs)
    torch.manual_seed(0)
    return GPT(**args)


@pytest.mark.parametrize("afLayerSpecific, groups", [(0, [0, 0, 0, 0]), (1, [0, 1, 2, 3]), (2, [0, 1, 1, 2])])
def testAfSharingAcrossLayers(afLayerSpecific, groups):
    model = tinyGpt(afLayerSpecific=afLayerSpecific)
    assert afLayerGroups(4, afLayerSpecific) == groups
    for i in range(4):
        for j in range(4):
            sameMlp = model.mlpAf(i).values is model.mlpAf(j).values
            sameAtt = model.attAf(i).values is model.attAf(j).values
            assert sameMlp == sameAtt == (groups[i] == groups[j])
    assert len(model.afParameters()) == 2 * (max(groups) + 1)
    # The AF modules are not stacked: one set serves all models, and singleModel shares them.
    single = model.singleModel(2)
    assert all(single.mlpAf(i).values is model.mlpAf(i).values for i in range(4))
    assert all(p.shape[0] == 3 for p in model.weightParameters())


def testAfLayerSpecific2NeedsFourLayers():
    with pytest.raises(ValueError, match="at least 4 layers"):
        afLayerGroups(3, 2)


def testAttentionNoneHasNoPreQkvBlock():
    model = tinyGpt(afAtt="none")
    assert len(model.attAfs) == 0 and not hasattr(model.blocks[0].attn, "afScale")
    tokens = torch.randint(0, 128, (3, 1, 9))
    losses, _ = model(tokens[..., :-1], tokens[..., 1:])
    assert losses.shape == (3,) and torch.isfinite(losses).all()


def testMaskSemantics():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 9, 9, 9, 9, 9]])  # 0 = separator: documents start at 1 and 4
    docs = documentIds(tokens, 0)
    assert docs.tolist() == [[0, 1, 1, 1, 2, 2, 2, 2, 2, 2]]
    mask = denseAttentionMask(docs, contextSize=3)[0, 0]
    for q in range(10):
        for k in range(10):
            expected = k <= q and q - k < 3 and docs[0, q] == docs[0, k]
            assert bool(mask[q, k]) == expected
    assert documentIds(tokens, -1).eq(0).all()


def testFlexAttentionEqualsSdpa():
    torch.manual_seed(0)
    sdpa = tinyGpt(attention="sdpa", contextSize=5, flexBlockSize=16)
    flex = tinyGpt(attention="flex", contextSize=5, flexBlockSize=16)
    flex.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 6, (3, 2, 40))  # many separators (0): many documents
    with torch.no_grad():
        expected = sdpa.logits(tokens)
        try:
            got = flex.logits(tokens)
        except Exception as err:  # FlexAttention's CPU forward needs a recent PyTorch
            pytest.skip(f"FlexAttention forward unavailable on CPU here: {err}")
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


def testPermutedInit():
    model = tinyGpt(freezeEmbeddings=0)
    permuteInitAcrossModels(model, torch.Generator().manual_seed(0))
    for name, p in model.namedWeightParameters():
        first = p[0].reshape(-1).sort().values
        for m in range(1, 3):
            torch.testing.assert_close(p[m].reshape(-1).sort().values, first)  # same elements
        if name.endswith("lambdas"):
            assert torch.equal(p[1], p[0]) and p[0].tolist() == [1.0, 0.0]
        elif p[0].numel() > 4 and p[0].std() > 0:
            assert not torch.equal(p[1], p[0])  # a different arrangement
    assert model.blocks[0].mlp.proj.abs().sum() == 0  # zero-initialised matrices stay zero


def testSingleModelIsTheNEquals1Case():
    model = tinyGpt()
    permuteInitAcrossModels(model, torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 128, (3, 2, 12))
    losses, accs = model(tokens[..., :-1], tokens[..., 1:])
    for i in range(3):
        single = model.singleModel(i)
        loss, acc = single(tokens[i:i + 1, :, :-1], tokens[i:i + 1, :, 1:])
        torch.testing.assert_close(loss[0], losses[i])
        torch.testing.assert_close(acc[0], accs[i])
    # A prefix of the models runs alone, with the same results for those models.
    prefixLosses, _ = model(tokens[:2, :, :-1], tokens[:2, :, 1:])
    torch.testing.assert_close(prefixLosses, losses[:2])


def testActivationStatistics():
    model = tinyGpt(freezeEmbeddings=0)
    tokens = torch.randint(0, 128, (3, 1, 9))
    stats = AfInputStatistics(knotRange=15.0)
    model(tokens[..., :-1], tokens[..., 1:], stats=stats)
    result = AfInputStatistics.results(stats.table(), 15.0)
    # The original's order: per layer, the attention site, then the MLP site.
    assert model.afSiteNames() == [f"{kind} {i}" for i in range(4) for kind in ("att", "MLP")]
    assert len(result["mean"]) == 8 and all(hi >= lo >= 0 for lo, hi in zip(result["mean"], result["max"]))
    # At init the attention AF reads the RMS-normalised stream (mean |x| ~ 0.8), the MLP AF a 0.02-scaled matmul of it.
    assert all(0.7 < m < 0.9 for m in result["mean"][0::2]) and all(m < 0.3 for m in result["mean"][1::2])
    assert result["counts"] == [8 * 16, 8 * 64] * 4  # model 0's 8 tokens x channels
    assert tinyGpt(afAtt="none").afSiteNames() == ["MLP 0", "MLP 1", "MLP 2", "MLP 3"]


def testLossFallsOnAnOverfitBatch():
    torch.manual_seed(0)
    model = GPT(vocabSize=64, nLayers=2, nHeads=2, dimEmb=32, nModels=1, afMlp="spline", afAtt="spline",
                tokenDocSep=-1, contextSize=16)
    tokens = torch.randint(0, 64, (1, 2, 17))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, _ = model(tokens[..., :-1], tokens[..., 1:])
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    assert float(loss.detach()) < 0.5 * first


def testChunkedLossEqualsPlainCrossEntropy(monkeypatch):
    import model
    monkeypatch.setattr(model, "LOSS_CHUNK_ROWS", 5)  # several chunks per model
    torch.manual_seed(0)
    x = torch.randn(3, 12, 8, requires_grad=True)
    weight = torch.randn(3, 20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (3, 12))
    losses, accuracies = model.linearCrossEntropy(x, weight, targets)
    logits = torch.bmm(x, weight.transpose(1, 2))
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), targets.reshape(-1),
                                                  reduction="none").view(3, -1).mean(1)
    torch.testing.assert_close(losses, reference)
    torch.testing.assert_close(accuracies, (logits.argmax(-1) == targets).float().mean(1))
    upstream = torch.randn(3)
    got = torch.autograd.grad((losses * upstream).sum(), (x, weight))
    expected = torch.autograd.grad((reference * upstream).sum(), (x, weight))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model.linearCrossEntropy(x, weight, targets)[0], reference.detach())
