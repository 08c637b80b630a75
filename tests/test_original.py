"""The same numbers as the original code: default model size and first loss, the staggered LR schedule, the
validation set, data streams, gradient clipping, head init, the log line for line and the AF CSV byte for byte."""
import os
import re
import time

import numpy as np
import pytest
import torch

from afFiles import loadAfsIntoModel, saveAfFiles
from conftest import UPSTREAM, randomDocuments, tinyFlags
from model import GPT
from tokenShards import TokenStream, writeShard
from trainLmAf import Trainer, buildModel, lrFactor, modelLrFactors, modelStartSteps, parseArgs

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


def testModelIStartsReadingAtShardIPlusSeed(tmp_path):
    for i in range(3):  # shard i holds token i only, so a sequence names its shard
        writeShard(str(tmp_path / f"fineweb_train_{i + 1:06d}.bin"), np.full(200, i))
    writeShard(str(tmp_path / "fineweb_val_000000.bin"), np.arange(300) % 7)
    for seed in (0, 1, 5):
        hp, given = parseArgs(tinyFlags(tmp_path, tmp_path / "results", seed=seed, nModels=4,
                                        afType="spline;att-spline"))
        trainer = Trainer(hp, given).setup()
        assert [int(s.next()[0]) for s in trainer.streams] == [(i + seed) % 3 for i in range(4)]


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
    trainer.clipGradients(3, trainer.model.afParameters())
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
    validate = trainer.validate

    def slowValidation():  # validation must not count as training time
        time.sleep(1.0)
        return validate()

    trainer.validate = slowValidation
    assert trainer.train() == 0
    kinds = []
    for line in (tmp_path / "log-cadence.txt").read_text().splitlines():
        for kind, pattern in PATTERNS.items():
            if match := re.match(pattern, line):
                kinds.append((int(match.group(1)), kind))
        if line.startswith("Step ") and " model " not in line:
            assert any(re.match(p, line) for p in PATTERNS.values()), line
    report = ["train", "act2", "act3", "inputs"]
    assert kinds == ([(1, k) for k in ["val"] + report] + [(5, k) for k in report]
                     + [(6, k) for k in ["memory"] + report] + [(7, "val")] + [(9, k) for k in report]
                     + [(11, "memory")] + [(13, k) for k in ["val", "memory"] + report])
    assert "Step 6/13   Peak CUDA memory usage: 1.500 GB" in (tmp_path / "log-cadence.txt").read_text()
    assert trainer.trainSeconds < 2.5  # three one-second validations happened while training ran
    # The attention site comes first in each layer: it reads the RMS-normalised stream (mean |x| ~ 0.8 at init).
    first = [float(v) for v in next(line for line in (tmp_path / "log-cadence.txt").read_text().splitlines()
                                    if line.startswith("Step 1/13   Activation magnitudes (2)")).split(":")[1].split()]
    assert all(0.6 < v < 1.0 for v in first[0::2]) and all(v < 0.5 for v in first[1::2])


def testFirstValidationIsTheInitialModel(tinyData, tmp_path):
    hp, given = parseArgs(tinyFlags(tinyData, tmp_path, runName="init", nSteps=4, nStepsWarmup=1, nStepsCooldown=1,
                                    valEvery=2))
    trainer = Trainer(hp, given).setup()
    expected = trainer.validate()
    assert trainer.train() == 0
    assert trainer.history["val"][0] == (1, pytest.approx(expected[0]), pytest.approx(expected[1]))


# ---------------------------------------------------------------- the AF CSV

def testOurCsvOfTheAuthorsAfsIsTheirFileByteForByte(tmp_path):
    theirs = os.path.join(UPSTREAM, "ptAf-optimizedMlpAtt-layerShared-phase1-step20000.csv")
    model = GPT(vocabSize=128, nLayers=4, nHeads=2, dimEmb=16, afMlp="spline", afAtt="spline", afLayerSpecific=1)
    loadAfsIntoModel(model, theirs, freeze=True)
    _, ours = saveAfFiles(str(tmp_path / "ptAf-copy"), model, {}, 20000)
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
