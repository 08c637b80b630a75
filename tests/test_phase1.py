"""Phase I: LR schedules, staggered starts, the AF gradient average, and the batched pass against a loop
of single models with their own optimizers (identical math)."""
import copy
import dataclasses
import math

import pytest
import torch

from conftest import tinyFlags
from model import GPT
from lmafs.data.tokenShards import TokenStream
from lmafs.run.runPlan import activeModels, lrFactor, modelLrFactors, modelStartSteps
from trainLmAf import Trainer, parseArgs


def makeTrainer(dataDir, resultsDir, **overrides):
    hp, given = parseArgs(tinyFlags(dataDir, resultsDir, **overrides))
    return Trainer(hp, given).setup()


def testTrapezoidSchedule():
    factors = [lrFactor(s, 10, 2, 3, "trap") for s in range(11)]
    assert factors == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0.05])


def testWarmupSchedule():
    assert [lrFactor(s, 10, 4, 3, "warmup") for s in (0, 1, 3, 9)] == pytest.approx([0.25, 0.5, 1, 1])


def testCosineSchedule():
    assert lrFactor(0, 10, 2, 3, "cos") == pytest.approx(0.5)
    assert lrFactor(2, 10, 2, 3, "cos") == pytest.approx(1.0)
    assert lrFactor(6, 10, 2, 3, "cos") == pytest.approx(5e-4 + 0.5 * (1 - 5e-4) * (1 + math.cos(math.pi * 0.5)))
    assert lrFactor(10, 10, 2, 3, "cos") == pytest.approx(5e-4)


def testStaggeredStarts(tinyData, tmp_path):
    hp, _ = parseArgs(tinyFlags(tinyData, tmp_path, nModels=20, nSteps=20000, staggeredStarts=1))
    starts = modelStartSteps(hp)
    assert starts == [1000 * i for i in range(20)]
    assert activeModels(0, starts) == 1 and activeModels(999, starts) == 1 and activeModels(1000, starts) == 2
    assert modelLrFactors(hp, 5000, starts) == [lrFactor(5000, 20000, 2, 3, "trap")] * 20
    hp = dataclasses.replace(hp, staggeredStarts=2)
    own = modelLrFactors(hp, 5000, starts)
    assert own[5] == pytest.approx(lrFactor(0, 20000, 2, 3, "trap"))  # model 5 starts at 5000: its first step
    assert own[0] == pytest.approx(lrFactor(5000, 20000, 2, 3, "trap"))
    assert modelStartSteps(dataclasses.replace(hp, staggeredStarts=0)) == [0] * 20


def testAfGradientIsTheAverageOverModelsThatRan():
    torch.manual_seed(0)
    model = GPT(vocabSize=64, nLayers=2, nHeads=2, dimEmb=16, nModels=3, afMlp="spline", afAtt="spline",
                afLayerSpecific=0, afInit=-1, tokenDocSep=-1, contextSize=8, freezeEmbeddings=-3)
    tokens = torch.randint(0, 64, (3, 1, 9))
    losses, _ = model(tokens[:2, :, :-1], tokens[:2, :, 1:])  # models 0 and 1 ran, model 2 not yet
    losses.sum().backward()
    batched = [p.grad / 2 for p in model.afParameters()]
    perModel = []
    for i in range(2):
        single = model.singleModel(i)
        single.mlpAfs, single.attAfs = copy.deepcopy(model.mlpAfs), copy.deepcopy(model.attAfs)
        loss, _ = single(tokens[i:i + 1, :, :-1], tokens[i:i + 1, :, 1:])
        loss.sum().backward()
        perModel.append([p.grad for p in single.afParameters()])
    for g, g0, g1 in zip(batched, *perModel):
        torch.testing.assert_close(g, (g0 + g1) / 2, atol=1e-6, rtol=1e-5)
        assert g.abs().sum() > 0


def testBatchedEqualsLoopOfSingleModels(tinyData, tmp_path):
    flags = dict(nModels=3, nSteps=6, staggeredStarts=2, nStepsWarmup=1, nStepsCooldown=2, afType="spline;att-spline",
                 afLayerSpecific=0, afInit=-1, afLr=0.05, lr=0.01, wtDecay=0.1, batchSize=2)
    trainer = makeTrainer(tinyData, tmp_path, **flags)
    hp, model = trainer.hp, trainer.model
    assert trainer.startSteps == [0, 2, 4]
    # The loop: every model alone through the N=1 path, its own AdamW; one Adam on a copy of the shared AFs.
    mlpAfs, attAfs = copy.deepcopy(model.mlpAfs), copy.deepcopy(model.attAfs)
    singles = []
    for i in range(3):
        single = model.singleModel(i)
        single.mlpAfs, single.attAfs = mlpAfs, attAfs
        singles.append(single)
    optimizers = [torch.optim.AdamW(s.weightParameters(), lr=1.0, betas=(hp.adamB1, hp.adamB2), weight_decay=hp.wtDecay)
                  for s in singles]
    afParams = list(mlpAfs.parameters()) + list(attAfs.parameters())
    afOptimizer = torch.optim.Adam(afParams, lr=hp.afLr, betas=(hp.afAdamB1, hp.afAdamB2))
    streams = [TokenStream(trainer.trFiles, hp.seqLength, hp.seed, i, hp.shuffleTrData) for i in range(3)]
    for step in range(5):
        nActive, batchedLosses, _ = trainer.trainStep()
        trainer.state.step += 1
        loopLosses = []
        for i in range(activeModels(step, trainer.startSteps)):
            total = 0.0
            for _ in range(hp.batchSize):
                tokens = torch.from_numpy(streams[i].next())[None, None].to(trainer.device)
                loss, _ = singles[i](tokens[..., :-1], tokens[..., 1:])
                (loss.sum() / hp.batchSize).backward()
                total += float(loss.detach()) / hp.batchSize
            loopLosses.append(total)
        for p in afParams:
            p.grad /= len(loopLosses)
        for i, factor in enumerate(modelLrFactors(hp, step, trainer.startSteps)[:len(loopLosses)]):
            for group in optimizers[i].param_groups:
                group["lr"] = hp.lr * factor
            optimizers[i].step()
            optimizers[i].zero_grad()
        for group in afOptimizer.param_groups:
            group["lr"] = hp.afLr * lrFactor(step, hp.nSteps, hp.nStepsWarmup, hp.nStepsCooldown, hp.lrSchedule)
        afOptimizer.step()
        afOptimizer.zero_grad()
        assert nActive == len(loopLosses)
        torch.testing.assert_close(batchedLosses.tolist(), loopLosses, atol=1e-5, rtol=1e-5)
    for i, single in enumerate(singles):
        for (name, p), (_, q) in zip(model.namedWeightParameters(), single.namedWeightParameters()):
            # Adam turns float32 rounding of near-zero gradients into differences of ~1e-4 lr; a real mismatch is ~lr.
            torch.testing.assert_close(p[i], q[0], atol=2e-4, rtol=1e-3, msg=f"model {i} {name}")
    for p, q in zip(model.afParameters(), afParams):
        torch.testing.assert_close(p, q, atol=2e-4, rtol=1e-3)
    # Model 2 started at step 4: it took exactly one step; models not started are untouched.
    assert trainer.optimizer.stepCounts.tolist() == [5, 3, 1]


def testSameDataAndSameInit(tinyData, tmp_path):
    trainer = makeTrainer(tinyData, tmp_path, nModels=2, staggeredStarts=0, sameDataAcrossModels=1,
                          sameInitAcrossModels=1, afType="spline;att-spline", afLr=0.05)
    nActive, losses, _ = trainer.trainStep()
    assert nActive == 2 and len(trainer.streams) == 1
    torch.testing.assert_close(losses[0], losses[1])
    for _, p in trainer.model.namedWeightParameters():
        torch.testing.assert_close(p[0], p[1])
