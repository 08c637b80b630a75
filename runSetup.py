"""What a run is built from: its token shards, their vocabulary and the data streams; the stacked model with its AFs
(from the flags, a phase-I ptAf file or a checkpoint), its frozen parts and its two optimizers. Functions of the
hyperparameters and this process's block of models (first, stop), for trainLmAf.py's Trainer."""
import random
from dataclasses import dataclass

import numpy as np
import torch

import checkpoints
import vocabulary
from afFiles import loadAfsIntoModel, splineKnots
from model import copyInitAcrossModels, permuteInitAcrossModels
from runPlan import ConfigError, buildModel, modelVocabSize
from stackedAdam import StackedAdam
from tokenShards import TokenStream, listShards, readShardHeader, validationSequences


def seedEverything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunData:
    trFiles: list
    vaFiles: list
    corpusVocabulary: object  # vocabulary.CorpusVocabulary of the shards, or None for GPT-2's
    vocabSize: int
    streams: list  # this process's TokenStreams: one per model, or one shared
    vaSequences: object  # [n, seqLength+1] numpy, or None without validation
    vaBytes: int  # UTF-8 bytes of the text the validation targets stand for (0 without validation)
    forced: list  # forced-value notes for the header


def loadData(hp, given, modelRange, dataParallel, resume):
    """The shards, their vocabulary and this process's streams; resume: the checkpoint a run continues, or None."""
    trFiles = listShards(hp.filesTokensTr, "--filesTokensTr")
    vaFiles = listShards(hp.filesTokensVa, "--filesTokensVa") if hp.filesTokensVa else []
    for path in trFiles + vaFiles:
        readShardHeader(path)
    corpusVocabulary = vocabulary.ofShards(trFiles + vaFiles)
    forced = adoptCorpusVocabulary(hp, given, corpusVocabulary) if corpusVocabulary else []
    if resume:
        checkpoints.checkResumeVocabulary(hp.resumeFrom, resume, corpusVocabulary)
    vocabSize = resume["vocabSize"] if resume else modelVocabSize(trFiles + vaFiles, corpusVocabulary)
    streamIndices = [0] if hp.sameDataAcrossModels or dataParallel else range(*modelRange)
    streams = [TokenStream(trFiles, hp.seqLength, hp.seed, i, hp.shuffleTrData) for i in streamIndices]
    vaSequences = validationSequences(vaFiles, hp.seqLength, hp.nTokensVa) if vaFiles else None
    vaBytes = int(vocabulary.tokenByteCounts(corpusVocabulary)[vaSequences[:, 1:]].sum()) if vaFiles else 0
    return RunData(trFiles, vaFiles, corpusVocabulary, vocabSize, streams, vaSequences, vaBytes, forced)


def adoptCorpusVocabulary(hp, given, corpusVocabulary):
    """Documents of a corpus vocabulary's shards are separated by its own <|endoftext|>; the forced-value note."""
    eot = corpusVocabulary.eotId
    if "tokenDocSep" in given and hp.tokenDocSep not in (eot, -1):
        raise ConfigError(f"--tokenDocSep {hp.tokenDocSep} contradicts the shards' vocabulary "
                          f"({corpusVocabulary.origin}), whose <|endoftext|> is id {eot}; drop the flag or give "
                          f"--tokenDocSep {eot} (-1: no separator)")
    if hp.tokenDocSep in (eot, -1):
        return []
    hp.tokenDocSep = eot
    return [f"tokenDocSep={eot} (<|endoftext|> of the shards' vocabulary)"]


def splineValues(model):
    """{id(spline): its values as a numpy copy} for every spline of model."""
    return {id(spline): spline.values.detach().float().cpu().numpy().copy() for spline in model.splines()}


def frozenParameters(model, freezeEmbeddings):
    """Parameters that freezeEmbeddings keeps fixed (weights only; AFs are governed by afLr)."""
    embed = [model.embed]
    head = [] if model.tieEmbeddings else [model.head]
    if freezeEmbeddings in (1, 2, 3):
        return {1: embed, 2: head, 3: embed + head}[freezeEmbeddings]
    if freezeEmbeddings < 0:
        keep = {-1: embed, -2: head, -3: embed + head}[freezeEmbeddings]
        keepIds = {id(p) for p in keep}
        return [p for p in model.weightParameters() if id(p) not in keepIds]
    return []


@dataclass
class RunModel:
    model: torch.nn.Module  # this process's models of the stacked GPT
    startValues: dict  # {id(spline): values} the AF plot draws as the start; empty when it came from a file
    afNotes: list  # what loading a ptAf file said, for the header
    afInputRange: float  # the splines' knot range (a phase-II spline keeps its file's)


def buildRunModel(hp, vocabSize, device, modelRange, resume):
    """Every process builds all N models from the same seed and keeps its own block: the same init as one
    process."""
    model = buildModel(hp, vocabSize, device)
    afNotes = []
    startValues = splineValues(model)  # the flags' init, which a resumed run rebuilds...
    if resume:
        model.load_state_dict(resume["model"])
        if hp.afFileToLoad:  # ...unless the start came from a file
            startValues = {}
    elif hp.afFileToLoad:
        afNotes = loadAfsIntoModel(model, hp.afFileToLoad, freeze=hp.afLr == 0)
        model.to(device)
        startValues = splineValues(model)
    if hp.nModels > 1 and not resume:
        if hp.sameInitAcrossModels:
            copyInitAcrossModels(model)
        else:
            permuteInitAcrossModels(model, torch.Generator().manual_seed(hp.seed))
    first, stop = modelRange
    model = model if stop - first == model.nModels else model.subModels(first, stop)
    for p in frozenParameters(model, hp.freezeEmbeddings):
        p.requires_grad_(False)
    for p in model.afParameters():
        p.requires_grad_(hp.afLr != 0)
    knots = splineKnots(model)
    return RunModel(model, startValues, afNotes, float(knots[-1]) if knots is not None else hp.afRange)


def buildOptimizers(model, hp):
    """StackedAdam on the trained weights of the stacked models; the AFs' Adam (afLr > 0) or SGD (afLr < 0), or None
    when no AF is trained."""
    weights = [p for p in model.weightParameters() if p.requires_grad]
    optimizer = StackedAdam(weights, model.nModels, betas=(hp.adamB1, hp.adamB2), weightDecay=hp.wtDecay)
    afParams = [p for p in model.afParameters() if p.requires_grad]
    if not afParams:
        return optimizer, None
    if hp.afLr > 0:
        return optimizer, torch.optim.Adam(afParams, lr=hp.afLr, betas=(hp.afAdamB1, hp.afAdamB2))
    return optimizer, torch.optim.SGD(afParams, lr=-hp.afLr)
