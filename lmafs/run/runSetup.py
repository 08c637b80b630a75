"""What a run is built from: the device and the compile backend; its token shards, their vocabulary and the data
streams; the stacked model with its AFs (from the flags, a phase-I ptAf file or a checkpoint; the flags' afType and
afInit as GPT's constructor arguments), its frozen parts and its two optimizers. Functions of the settled
hyperparameters and this process's block of models (first, stop), for trainLmAf.py's Trainer and the scripts that
load a model."""
import random
from dataclasses import dataclass

import numpy as np
import torch

from lmafs.data import vocabulary
from lmafs.network.afFiles import loadAfsIntoModel, splineKnots
from lmafs.run.flagChecks import ConfigError, splitAfInit, splitAfType, splitScoreType
from model import GPT, copyInitAcrossModels, permuteInitAcrossModels
from lmafs.network.stackedAdam import StackedAdam
from lmafs.data.tokenShards import ShardError, TokenStream, listShards, maxTokenId, readShardHeader, validationSequences


# ----------------------------------------------------------------------------------------------
# Device, vocabulary size, model and compile backend


def pickDevice(name="auto"):
    """The device --device names; auto: CUDA if present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def roundUpVocab(maxId):
    return (maxId + 1 + 127) // 128 * 128


def modelVocabSize(files, corpusVocabulary):
    """The model's vocabulary: GPT-2 shards (corpusVocabulary None) the largest id in them + 1, a corpus vocabulary
    its size, each rounded up to a multiple of 128. ShardError when the shards hold an id the vocabulary lacks."""
    largest = maxTokenId(files)
    if corpusVocabulary is None:
        return roundUpVocab(largest)
    if largest >= corpusVocabulary.size:
        raise ShardError(f"the shards hold token id {largest}, but {corpusVocabulary.origin} has only "
                         f"{corpusVocabulary.size:,} ids; re-run preprocessFineweb.py --vocabSize N")
    return roundUpVocab(corpusVocabulary.size - 1)



def modelArguments(hp, vocabSize, device, nModels=None):
    """GPT's constructor arguments for these hyperparameters (a dict or Hyperparameters) on device."""
    get = hp.get if isinstance(hp, dict) else lambda name, default=None: getattr(hp, name, default)
    mlp, att = splitAfType(get("afType"))
    mlpInit, attInit = splitAfInit(get("afInit"))
    return dict(vocabSize=vocabSize, nLayers=get("nLayers"), nHeads=get("nHeads"), dimEmb=get("dimEmb"),
                nModels=nModels or get("nModels"), afMlp=mlp, afAtt=att, afLayerSpecific=get("afLayerSpecific"),
                afRange=get("afRange"), afNAnchors=get("afNAnchors"), afInit=mlpInit, afInitAtt=attInit,
                tieEmbeddings=get("tieEmbeddings"), freezeEmbeddings=get("freezeEmbeddings"),
                contextSize=get("contextSize"), tokenDocSep=get("tokenDocSep"),
                attention="flex" if torch.device(device).type == "cuda" else "sdpa", device=str(device),
                flexBlockSize=get("flexBlockSize"), kanGridSize=get("kanGridSize", 5),
                kanSplineOrder=get("kanSplineOrder", 3), afScore=splitScoreType(get("afType"))[1])


def buildModel(hp, vocabSize, device, nModels=None):
    """The stacked GPT for these hyperparameters (a dict or Hyperparameters), on device."""
    return GPT(**modelArguments(hp, vocabSize, device, nModels)).to(device)


def compileBackend(hp, device):
    """The torch.compile backend of the run, or None for eager; raises ConfigError for a backend that cannot train
    this model on device."""
    if hp.compileBackend == "auto":
        return "inductor" if device.type == "cuda" else None
    if hp.compileBackend == "aot_eager" and device.type == "cuda" and splitScoreType(hp.afType)[1] == "spline":
        # under aot_autograd, FlexAttention's dense backward returns None for the spline's captured knot values:
        # the first backward fails, and the fallback to explicit [T, T] scores does not fit at the default size
        raise ConfigError("--compileBackend aot_eager cannot train score-spline on CUDA (FlexAttention's backward "
                          "under aot_eager gives the score spline no gradient); use inductor (auto) or none")
    return None if hp.compileBackend == "none" else hp.compileBackend


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


def loadData(hp, modelRange, dataParallel, resume):
    """The shards, their vocabulary and this process's streams; resume: the checkpoint a run continues, or None."""
    trFiles = listShards(hp.filesTokensTr, "--filesTokensTr")
    vaFiles = listShards(hp.filesTokensVa, "--filesTokensVa") if hp.filesTokensVa else []
    for path in trFiles + vaFiles:
        readShardHeader(path)
    corpusVocabulary = vocabulary.ofShards(trFiles + vaFiles)
    vocabSize = resume["vocabSize"] if resume else modelVocabSize(trFiles + vaFiles, corpusVocabulary)
    streamIndices = [0] if hp.sameDataAcrossModels or dataParallel else range(*modelRange)
    streams = [TokenStream(trFiles, hp.seqLength, hp.seed, i, hp.shuffleTrData) for i in streamIndices]
    vaSequences = validationSequences(vaFiles, hp.seqLength, hp.nTokensVa) if vaFiles else None
    vaBytes = int(vocabulary.tokenByteCounts(corpusVocabulary)[vaSequences[:, 1:]].sum()) if vaFiles else 0
    return RunData(trFiles, vaFiles, corpusVocabulary, vocabSize, streams, vaSequences, vaBytes)


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
