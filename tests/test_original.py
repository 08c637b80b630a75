"""The same numbers as the original code: default model size and first loss, the staggered LR schedule and start
steps, the validation set and its timing, data streams, gradient clipping, head init, the log line for line and the
AF CSV byte for byte."""
import os
import re
import time

import numpy as np
import pytest
import torch

from lmafs.network.afFiles import loadAfsIntoModel, saveAfFiles
from conftest import UPSTREAM, randomDocuments, tinyFlags
from model import GPT
from lmafs.data.tokenShards import TokenStream, writeShard
from lmafs.data.tokenShards import validationSequences
from lmafs.run import forwardPasses
from lmafs.run.runOutputs import SEPARATOR, hyperparameterLines
from lmafs.run.gradients import clipGlobalNorm
from lmafs.run.flagChecks import checkFlags
from lmafs.run.runPlan import lrFactor, modelLrFactors, modelStartSteps
from lmafs.run.runSetup import buildModel
from trainLmAf import Trainer, parseArgs

GPT2_VOCAB = 50304  # GPT-2's 50,257 ids rounded up to a multiple of 128


# ---------------------------------------------------------------- model size and first loss

@pytest.mark.parametrize("afType, afLayerSpecific, expected", [("gelu;att-linear", 1, 16_026_134),
                                                               ("spline;att-spline", 0, 16_026_262)])
def testDefaultSizeHasTheAuthorsParameterCountAndFirstLoss(afType, afLayerSpecific, expected):
    hp, _ = parseArgs(["--afType", afType, "--afLayerSpecific", str(afLayerSpecific), "--contextSize", "128"])
    torch.manual_seed(0)
    model = buildModel(hp, GPT2_VOCAB, "cpu")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    tokens = torch.from_numpy(randomDocuments(np.random.default_rng(0), 257, vocab=50257))[None, None]
    with torch.no_grad():
        loss, _ = model(tokens[..., :-1], tokens[..., 1:])
    # The authors' first losses are 15.30 (baseline) and 15.15 (phase I): without a norm before the head the
    # tied head sees 3x the normalised embedding (two U-Net skips) and predicts the input token at logit ~15.
    # Ours would be 10.8 with a final RMSNorm.
    assert 14.8 < float(loss) < 15.5


def testNoNormBeforeTheHead():
    torch.manual_seed(0)
    model = GPT(vocabSize=256, nLayers=4, nHeads=2, dimEmb=32, tokenDocSep=-1, contextSize=16)
    tokens = torch.randint(0, 256, (1, 2, 16))
    with torch.no_grad():
        hidden = model.hidden(tokens)
        logits = model.logits(tokens)
        # zero-initialised projections: the stream is x0, doubled and tripled by the decoder's two skips
        x0 = torch.nn.functional.layer_norm(model.embed[0][tokens[0]], (32,))
    torch.testing.assert_close(hidden[0], 3 * x0)
    torch.testing.assert_close(logits, hidden @ model.embed[0].t())


# ---------------------------------------------------------------- staggered starts

def referenceTrap(step, nSteps=20000, warmup=2000, cooldown=10000):
    return min((step + 1) / warmup, 1.0, (nSteps - step) / cooldown)


@pytest.mark.parametrize("step", [0, 999, 1000, 5500, 10000, 12345, 18999, 19000, 19500, 19999])
def testStaggeredStarts2UsesTheGlobalScheduleAtEachModelsOwnStep(step):
    hp, _ = parseArgs(["--nModels", "20", "--staggeredStarts", "2"])
    starts = modelStartSteps(hp)
    assert starts == [1000 * i for i in range(20)]
    factors = modelLrFactors(hp, step, starts)
    for i, start in enumerate(starts):
        if step >= start:  # a model that has not started takes no step, so its factor is not used
            assert factors[i] == pytest.approx(referenceTrap(step - start), abs=1e-12)


def testStartStepsAreTheOriginalsRoundedLinspace():
    for nSteps in (7, 100, 101, 999, 20000, 20001):
        for nModels in range(2, 41):
            hp, _ = parseArgs(["--nModels", str(nModels), "--nSteps", str(nSteps), "--staggeredStarts", "1"])
            expected = np.round(np.linspace(0, nSteps, nModels, endpoint=False)).astype(int).tolist()
            assert modelStartSteps(hp) == expected, (nSteps, nModels)
    # a float tie broken by rounding: 15 * (100 / 24) is 62.50000000000001, not 62.5 (round-half-even: 62)
    hp, _ = parseArgs(["--nModels", "24", "--nSteps", "100"])
    assert modelStartSteps(hp)[15] == 63 and round(15 * 100 / 24) == 62


def testLateModelsNeverReachTheCooldown():
    hp, _ = parseArgs(["--nModels", "20", "--staggeredStarts", "2"])
    factors = modelLrFactors(hp, 19500, modelStartSteps(hp))
    assert factors[0] == pytest.approx(0.05)  # model 0 is at the end of the global cooldown
    assert factors[10] == 1.0  # 9,500 steps in: flat
    assert factors[19] == pytest.approx(501 / 2000)  # 500 steps in: still warming up
    hp1, _ = parseArgs(["--nModels", "20", "--staggeredStarts", "1"])
    assert modelLrFactors(hp1, 19500, modelStartSteps(hp1)) == [lrFactor(19500, 20000, 2000, 10000, "trap")] * 20


# ---------------------------------------------------------------- data

def testValidationHasNTokensVaOverSeqLengthSequences(tmp_path):
    writeShard(str(tmp_path / "fineweb_val_000000.bin"), np.arange(5000) % 500)
    writeShard(str(tmp_path / "fineweb_train_000001.bin"), np.arange(5000) % 500)
    hp, given = parseArgs(tinyFlags(tmp_path, tmp_path / "results", seqLength=32, nTokensVa=1024))
    trainer = Trainer(hp, given).setup()
    assert trainer.vaSequences.shape == (1024 // 32, 33)
    np.testing.assert_array_equal(trainer.vaSequences[:, :-1].reshape(-1), np.arange(1024) % 500)


def testModelIStartsReadingAtShardIPlusSeedOrAtShardIWithoutShuffling(tmp_path):
    for i in range(3):  # shard i holds token i only, so a sequence names its shard
        writeShard(str(tmp_path / f"fineweb_train_{i + 1:06d}.bin"), np.full(200, i))
    writeShard(str(tmp_path / "fineweb_val_000000.bin"), np.arange(300) % 7)
    for seed in (0, 1, 5):
        for shuffle in (0, 1):
            hp, given = parseArgs(tinyFlags(tmp_path, tmp_path / "results", seed=seed, nModels=4,
                                            afType="spline;att-spline", shuffleTrData=shuffle))
            trainer = Trainer(hp, given).setup()
            # shuffleTrData 0: the original ignores the seed, model m starts at shard m
            assert [int(s.next()[0]) for s in trainer.streams] == [(i + seed * shuffle) % 3 for i in range(4)]


# ---------------------------------------------------------------- optimisation details

def testGradientClippingIsOneGlobalNormOverModelsAndAfs(tinyData, tmp_path):
    hp, given = parseArgs(tinyFlags(tinyData, tmp_path, nModels=3, afType="spline;att-spline",
                                    gradientClipping=0.5, staggeredStarts=0))
    trainer = Trainer(hp, given).setup()
    torch.manual_seed(0)
    params = trainer.optimizer.params + trainer.model.afParameters()
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    norm = torch.cat([g.reshape(-1) for g in before]).norm()
    clipGlobalNorm(trainer.optimizer.params, trainer.model.afParameters(), 3, hp.gradientClipping, trainer.dist,
                   trainer.dataParallel, trainer.device)
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * (0.5 / (norm + 1e-6)))


@pytest.mark.parametrize("freezeEmbeddings", [0, -2, -3])
def testAnUntiedTrainedHeadStartsAtZero(freezeEmbeddings):
    torch.manual_seed(0)
    model = GPT(vocabSize=128, nLayers=2, nHeads=2, dimEmb=16, tieEmbeddings=False, freezeEmbeddings=freezeEmbeddings)
    assert model.head.abs().sum() == 0


def testAFrozenUntiedHeadIsTheEmbeddingShuffled():
    torch.manual_seed(0)
    model = GPT(vocabSize=128, nLayers=2, nHeads=2, dimEmb=16, tieEmbeddings=False, freezeEmbeddings=-1)
    assert sorted(model.head[0].sum(1).tolist()) == pytest.approx(sorted(model.embed[0].sum(1).tolist()))


# ---------------------------------------------------------------- the log

STEP = r"^Step (\d+)/13   "
PATTERNS = {"val": STEP + r"lossVa \d+\.\d{4}   accVa \d+\.\d$",
            "bpb": STEP + r"bpbVa \d+\.\d{4}$",  # ours, right after the original's validation line
            "train": STEP + r"lossTr \d+\.\d{4}   accTr \d+\.\d   \d+s = \d+\.\d\ds/step$",
            "act2": STEP + r"Activation magnitudes \(2\):( \d+\.\d\d){8}$",
            "act3": STEP + r"Activation magnitudes \(3\):( \d+\.\d\d){8}$",
            "memory": STEP + r"Peak CUDA memory usage: \d+\.\d{3} GB$",
            "inputs": STEP + r"AF inputs out of range:( \d+\.\d\d%){8}$"}  # ours, after the original's lines


def testLogLinesComeInTheOriginalsOrderAndCadence(tinyData, tmp_path, monkeypatch):
    hp, given = parseArgs(tinyFlags(tinyData, tmp_path, runName="cadence", nLayers=4, nSteps=13, nStepsWarmup=2,
                                    nStepsCooldown=4, valEvery=6, plotEvery=4, plottingLevel=2,
                                    afType="spline;att-spline", afLayerSpecific=0))
    trainer = Trainer(hp, given).setup()
    # Only the CUDA memory query is mocked: the lines are the trainer's own.
    trainer.tracksCudaMemory = True
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1.5 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    validation = forwardPasses.Passes.validation

    def slowValidation(passes, sequences):  # validation must not count as training time
        time.sleep(1.0)
        return validation(passes, sequences)

    monkeypatch.setattr(forwardPasses.Passes, "validation", slowValidation)
    assert trainer.train() == 0
    kinds = []
    for line in (tmp_path / "log-cadence.txt").read_text().splitlines():
        for kind, pattern in PATTERNS.items():
            if match := re.match(pattern, line):
                kinds.append((int(match.group(1)), kind))
        if line.startswith("Step ") and " model " not in line:
            assert any(re.match(p, line) for p in PATTERNS.values()), line
    report = ["train", "act2", "act3", "inputs"]
    assert kinds == ([(1, k) for k in ["val", "bpb"] + report] + [(5, k) for k in report]
                     + [(6, k) for k in ["memory"] + report] + [(7, "val"), (7, "bpb")] + [(9, k) for k in report]
                     + [(11, "memory")] + [(13, k) for k in ["val", "bpb", "memory"] + report])
    assert "Step 6/13   Peak CUDA memory usage: 1.500 GB" in (tmp_path / "log-cadence.txt").read_text()
    assert trainer.state.trainSeconds < 2.5  # three one-second validations happened while training ran
    # The attention site comes first in each layer: it reads the RMS-normalised stream (mean |x| ~ 0.8 at init).
    first = [float(v) for v in next(line for line in (tmp_path / "log-cadence.txt").read_text().splitlines()
                                    if line.startswith("Step 1/13   Activation magnitudes (2)")).split(":")[1].split()]
    assert all(0.6 < v < 1.0 for v in first[0::2]) and all(v < 0.5 for v in first[1::2])


def testStep1ValidationIsTheModelAfterOneUpdate(tinyData, tmp_path):
    hp, given = parseArgs(tinyFlags(tinyData, tmp_path, runName="one", nSteps=4, nStepsWarmup=1, nStepsCooldown=1,
                                    valEvery=2, lr=0.01, wtDecay=0.1))
    trainer = Trainer(hp, given).setup()
    # By hand: the same model from the same seed, one AdamW step on stream 0's first sequence, then validated.
    torch.manual_seed(hp.seed)
    model = buildModel(hp, trainer.vocabSize, "cpu")
    weights = [p for p in model.weightParameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(weights, lr=hp.lr * lrFactor(0, hp.nSteps, hp.nStepsWarmup, hp.nStepsCooldown,
                                                                 hp.lrSchedule),
                                  betas=(hp.adamB1, hp.adamB2), weight_decay=hp.wtDecay)
    tokens = torch.from_numpy(TokenStream(trainer.trFiles, hp.seqLength, hp.seed, 0, hp.shuffleTrData).next())
    loss, _ = model(tokens[None, None, :-1], tokens[None, None, 1:])
    loss.sum().backward()
    sequences = torch.from_numpy(validationSequences(trainer.vaFiles, hp.seqLength, hp.nTokensVa))[None]

    def validation():
        with torch.no_grad():
            losses, accs = model(sequences[..., :-1], sequences[..., 1:])
        return float(losses[0]), float(accs[0])

    initial = validation()
    optimizer.step()
    afterOne = validation()
    assert abs(afterOne[0] - initial[0]) > 1e-2  # one update moves it far more than the tolerance below
    assert trainer.train() == 0
    step, lossVa, accVa = trainer.state.history["val"][0]
    assert step == 1 and lossVa == pytest.approx(afterOne[0], abs=1e-4) and accVa == pytest.approx(afterOne[1])
    assert [s for s, _, _ in trainer.state.history["val"]] == [1, 3, 4]


def testHyperparametersPrintAsInTheAuthorsLog():
    theirs = open(os.path.join(UPSTREAM, "log-baseline-gelu.txt")).read().splitlines()
    original = [line for line in theirs[:theirs.index(SEPARATOR)]
                if not line.startswith("  filesTokensTe = ")]  # a flag the original never reads; not one of ours
    hp, _ = parseArgs(["--seed", "0", "--afType", "gelu;att-linear", "--runName", "baseline-gelu"])  # README's
    settled, _ = checkFlags(hp)
    ours = hyperparameterLines(settled, hp)
    assert ours[:len(original)] == original
    assert [line.split(" = ")[0].strip() for line in ours[len(original):]] == [
        "afSmoothness", "kanGridSize", "kanSplineOrder", "plotAfZoom", "device", "modelsPerPass", "compileBackend",
        "plotShow", "resumeFrom", "tracker", "preflight", "preflightGpu"]


def testValuesPrintAsGiven():
    hp, _ = parseArgs(["--afRange", "7", "--plotMaxLoss", "12.0", "--lr", "1e-3", "--afInit", "-1", "--dtype",
                       "bfloat16", "--afType", "relu2;att-none;score-spline", "--filesTokensVa", ""])
    lines = hyperparameterLines(hp)
    for line in ("  afRange = 7", "  plotMaxLoss = 12.0", "  lr = 0.001", "  afInit = -1", "  dtype = torch.bfloat16",
                 "  afType = ['relu2', 'none', 'score-spline']", '  filesTokensVa = ""'):
        assert line in lines


def testHeaderAndSavingLinesAreTheOriginalsThenOurs(tinyData, tmp_path):
    # The original's form of each kind of value, for this run: written here as its log would show it.
    excerpt = f"""Hyperparameters:
  runName = "fmt"
  plotMaxLoss = 15.0
  dtype = torch.float32
  tieEmbeddings = True
  afType = ['spline', 'spline']
  afRange = 15
  afInit = 0.01
  dirResults = "{tmp_path}"
  gradientClipping = 0
  lrSchedule = "trap"
  plottingLevel = 2""".splitlines()
    hp, given = parseArgs(tinyFlags(tinyData, tmp_path, runName="fmt", nSteps=4, nStepsWarmup=1, nStepsCooldown=1,
                                    valEvery=2, afType="spline;att-spline", saveAfEvery=0, saveModelEvery=0,
                                    plottingLevel=2))
    trainer = Trainer(hp, given).setup()
    assert trainer.train() == 0
    lines = (tmp_path / "log-fmt.txt").read_text().splitlines()
    block = lines[:lines.index(SEPARATOR)]
    assert block[0] == "Hyperparameters:" and [line for line in block if line in excerpt] == excerpt
    assert block.index("  plottingLevel = 2") < block.index("  afSmoothness = 0.0")  # ours after the original's
    # our own header lines between the separator and a second one, right before the first step line
    ours = lines[len(block) + 1:]
    assert ours.index(SEPARATOR) == next(i for i, line in enumerate(ours) if line.startswith("Step ")) - 1
    assert any(line.startswith("Vocabulary size: ") for line in ours[:ours.index(SEPARATOR)])
    stem, lossVa = os.path.join(str(tmp_path), "%s-fmt-step"), trainer.state.history["val"][-1][1]
    saving = [f"Saving AF: {stem % 'ptAf'}0004.pt", f"Saving AF (CSV): {stem % 'ptAf'}0004.csv",
              f"Saving model: {stem % 'pt'}0004.pt", f"Saving plot (loss/acc): {stem % 'tr'}000004-lossVa{lossVa:.4f}.png",
              f"Saving plot (AF): {stem % 'af'}000004.png", f"Saving plot (act): {stem % 'act'}000004.png"]
    assert lines[-len(saving):] == saving and lines[-len(saving) - 1].startswith("Step 4/4   ")
    assert len([line for line in lines if line.startswith("Saving ")]) == len(saving)  # none at earlier refreshes
    for line in saving:
        assert os.path.isfile(line.split(": ", 1)[1]), line
    theirs = open(os.path.join(UPSTREAM, "log-baseline-gelu.txt")).read().splitlines()[-3:]
    assert [line.split(": ")[0] for line in theirs] == [line.split(": ")[0] for line in saving[-3:]]


# ---------------------------------------------------------------- the AF CSV

def testOurCsvOfTheAuthorsAfsIsTheirFileByteForByte(tmp_path):
    theirs = os.path.join(UPSTREAM, "ptAf-optimizedMlpAtt-layerShared-phase1-step20000.csv")
    model = GPT(vocabSize=128, nLayers=4, nHeads=2, dimEmb=16, afMlp="spline", afAtt="spline", afLayerSpecific=1)
    loadAfsIntoModel(model, theirs, freeze=True)
    _, ours = saveAfFiles(str(tmp_path / "ptAf-copy"), model, {}, 20000)
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
