"""Tests for activationFunctions.replaceActivations on Hugging Face transformers models built from tiny configs (no
download): GPT-2's GPT2MLP.act and Llama's gated MLP act_fn get fresh splines or the MLP splines of ptAf .pt/.csv
files; the output at the knots, what training moves, and the save_pretrained / from_pretrained round trip."""
import pytest
import torch
import torch.nn as nn

from lmafs.network import afFiles
from activationFunctions import Spline, replaceActivations, splineInitValues
from model import GPT

transformers = pytest.importorskip("transformers")
from transformers.activations import NewGELUActivation, SiLUActivation  # noqa: E402


def tinyGpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tinyLlama(nLayers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=nLayers, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=100, bos_token_id=0,
                                      eos_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def ptAfFile(folder, afLayerSpecific, nLayers=2):
    """A ptAf .pt and .csv of one of our models with distinctive MLP (and attention) spline values."""
    ours = GPT(vocabSize=128, nLayers=nLayers, nHeads=2, dimEmb=16, afMlp="spline", afAtt="spline",
               afLayerSpecific=afLayerSpecific)
    generator = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for af in list(ours.mlpAfs) + list(ours.attAfs):
            af.values.copy_(torch.randn(af.values.shape, generator=generator, device="cpu"))
    return afFiles.saveAfFiles(str(folder / f"ptAf-layer{afLayerSpecific}-step0001"), ours, {}, 1)


def sites(model, cls):
    return [name for name, module in model.named_modules() if isinstance(module, cls)]


@pytest.mark.parametrize("build, actClass, attribute", [(tinyGpt2, NewGELUActivation, "mlp.act"),
                                                         (tinyLlama, SiLUActivation, "mlp.act_fn")])
@pytest.mark.parametrize("suffix", [".pt", ".csv"])
def test_fileSplinesPerLayerEqualTheFileAtTheKnots(tmp_path, build, actClass, attribute, suffix):
    ptPath, csvPath = ptAfFile(tmp_path, afLayerSpecific=1)
    data = afFiles.readAfFile(ptPath)
    model = build()
    names = sites(model, actClass)
    lines = replaceActivations(model, afFile=ptPath if suffix == ".pt" else csvPath, match=actClass, verbose=False)
    assert len(lines) == 2 and [line.split(":")[0] for line in lines] == names
    assert all(name.endswith(attribute) for name in names)
    for layer, name in enumerate(names):
        spline = model.get_submodule(name)
        assert isinstance(spline, Spline) and not spline.values.requires_grad
        assert torch.equal(spline.knots, data["knots"])
        # the layers differ, so each module got its own layer's spline, in module order
        # float32 knot positions: within 1e-4 of the values (slopes of a few units per knot)
        assert torch.allclose(spline(data["knots"]), data["mlpValues"][layer], atol=1e-4)
    assert not torch.allclose(data["mlpValues"][0], data["mlpValues"][1])
    assert model(torch.randint(0, 100, (1, 12))).logits.isfinite().all()


def test_oneSharedSplineFillsAnyNumberOfModules(tmp_path):
    ptPath, csvPath = ptAfFile(tmp_path, afLayerSpecific=0)
    shared = afFiles.readAfFile(ptPath)["mlpValues"][0]
    for path in (ptPath, csvPath):
        model = tinyLlama(nLayers=3)
        lines = replaceActivations(model, afFile=path, match=SiLUActivation, verbose=False)
        assert len(lines) == 3 and all("shared" in line for line in lines)
        splines = [model.get_submodule(name.split(":")[0]) for name in lines]
        knots = splines[0].knots
        for spline in splines:
            assert torch.allclose(spline(knots), shared, atol=1e-4)
        assert len({id(spline.values) for spline in splines}) == 3  # copies, so save_pretrained sees no shared tensors


def test_countThatDoesNotFitTheFileIsOneClearError(tmp_path):
    ptPath, csvPath = ptAfFile(tmp_path, afLayerSpecific=1, nLayers=2)
    for path in (ptPath, csvPath):
        model = tinyLlama(nLayers=3)
        with pytest.raises(ValueError, match="3") as info:
            replaceActivations(model, afFile=path, match=SiLUActivation, verbose=False)
        assert "\n" not in str(info.value) and "model.layers.0.mlp.act_fn" in str(info.value)
        assert sites(model, SiLUActivation)  # nothing was swapped


def test_matchThatSelectsNothingNamesTheCandidates():
    model = tinyGpt2()
    with pytest.raises(ValueError, match="NewGELUActivation x2 \\(transformer.h.0.mlp.act") as info:
        replaceActivations(model)  # the default match, nn.GELU, is not what GPT-2 uses
    assert str(info.value).endswith('e.g. match="NewGELUActivation"')
    assert sites(model, NewGELUActivation)  # nothing was swapped


def test_aClassNameSelectsLikeTheClass():
    byName, byClass = tinyLlama(), tinyLlama()
    assert replaceActivations(byName, match="SiLUActivation", verbose=False) == \
        replaceActivations(byClass, match=SiLUActivation, verbose=False)
    assert not sites(byName, SiLUActivation) and len(sites(byName, Spline)) == 2


def test_freshSplinesByNamePatternWithAFixedAfsInit():
    model = tinyGpt2()
    lines = replaceActivations(model, match=r"mlp\.act$", init="gelu", nKnots=33, knotRange=6.0, freeze=False,
                               verbose=False)
    assert len(lines) == 2
    spline = model.transformer.h[1].mlp.act
    assert spline.nKnots == 33 and spline.knotRange == 6.0 and spline.values.requires_grad
    assert torch.allclose(spline.values, splineInitValues("gelu", spline.knots))
    x = torch.linspace(-6, 6, 101)
    # a 33-knot spline of GELU is within a few hundredths of GELU itself
    assert (spline(x) - nn.functional.gelu(x)).abs().max() < 0.03


@pytest.mark.parametrize("freeze", [True, False])
def test_trainingMovesOnlyWhatIsNotFrozen(freeze):
    model = tinyLlama().train()
    replaceActivations(model, match=SiLUActivation, init="silu", freeze=freeze, verbose=False)
    splines = [m for m in model.modules() if isinstance(m, Spline)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")
    for _ in range(3):
        optimizer.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    splineNames = [name for name in after if name.endswith(".values")]
    assert len(splineNames) == len(splines) == 2
    for name in splineNames:
        assert torch.equal(before[name], after[name].detach()) == freeze
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_savePretrainedFromPretrainedRoundTrip(tmp_path):
    ptPath, _ = ptAfFile(tmp_path, afLayerSpecific=1)
    model = tinyGpt2()
    replaceActivations(model, afFile=ptPath, match=NewGELUActivation, verbose=False)
    tokens = torch.randint(0, 100, (1, 20), generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")
    with torch.no_grad():
        expected = model(tokens).logits
    model.save_pretrained(tmp_path / "saved")
    # what the README documents: the base class rebuilds its GELUs, replaceActivations puts the saved splines back
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert not torch.allclose(loaded(tokens).logits, expected, atol=1e-3)
    lines = replaceActivations(loaded, afFile=str(tmp_path / "saved"), verbose=False)
    assert [line.split(":")[0] for line in lines] == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)
    for name in ("transformer.h.0.mlp.act", "transformer.h.1.mlp.act"):
        assert torch.equal(loaded.get_submodule(name).values, model.get_submodule(name).values)


def test_plainModelRoundTripsThroughLoadStateDict(tmp_path):
    ptPath, _ = ptAfFile(tmp_path, afLayerSpecific=1)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 2))

    model = build()
    replaceActivations(model, afFile=ptPath, verbose=False)  # the default match, nn.GELU
    saved = model.state_dict()
    fresh = build()
    replaceActivations(fresh, nKnots=8, verbose=False)  # other knots: loading adopts the saved ones
    fresh.load_state_dict(saved)
    x = torch.randn(5, 4, generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")
    assert fresh[1].nKnots == 64 and torch.equal(fresh(x), model(x))
    again = build()
    replaceActivations(again, afFile=saved, verbose=False)
    assert torch.equal(again(x), model(x))
