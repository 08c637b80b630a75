"""The run plan: the flags' checks (ConfigError, the one-line user error of bad flags), which models train at each
step and with which LR (schedules, staggered starts), how many tokens they have seen, when each report and output is
due, in which batched passes and compiled graphs, on which device and backend, and the model they build
(afType/afInit parsed into GPT's constructor arguments). Pure functions of the hyperparameters and the step."""
import datetime
import math
import os

import numpy as np
import torch

import trackers
from activationFunctions import FIXED_TYPES, LEARNABLE_TYPES, MLP_INPUT_TYPES, SPLINE_TYPES
from attention import FLEX_MASK_BLOCK, FLEX_TILE_SIZES, SCORE_TYPES
from model import GPT, MLP_VARIANT_AFS
from tokenShards import ShardError, maxTokenId


class ConfigError(Exception):
    """Bad flags or inputs; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# The flags' checks


def isLearnableAf(name):
    """Whether the AF has parameters of its own (trained with afLr); gated and KAN MLPs' are ordinary weights."""
    return name in SPLINE_TYPES + LEARNABLE_TYPES + MLP_INPUT_TYPES


def checkFlags(hp):
    """Check every flag; apply the forced values of SPEC §2. Raises ConfigError."""
    mlp, att = splitAfType(hp.afType)
    score = splitScoreType(hp.afType)[1]
    hasSpline = mlp in SPLINE_TYPES or att in SPLINE_TYPES or score == "spline"
    if score not in SCORE_TYPES:
        raise ConfigError(f"--afType: unknown attention score 'score-{score}'; choose score-X with X from "
                          f"{', '.join(SCORE_TYPES)}")
    attChoices = SPLINE_TYPES + FIXED_TYPES + LEARNABLE_TYPES + ("none",)
    mlpOnly = MLP_INPUT_TYPES + tuple(MLP_VARIANT_AFS)
    mlpChoices = attChoices[:-1] + mlpOnly
    if mlp not in mlpChoices:
        raise ConfigError(f"--afType: unknown MLP activation {mlp!r}; choose from {', '.join(mlpChoices)}")
    if att in mlpOnly:
        raise ConfigError(f"--afType: 'att-{att}' exists only in the MLP (it reshapes or gates the MLP); before QKV "
                          f"choose from {', '.join(attChoices)}")
    if att not in attChoices:
        raise ConfigError(f"--afType: unknown attention activation 'att-{att}'; choose att-X with X from "
                          f"{', '.join(attChoices)}")
    positive = ("nLayers", "nHeads", "dimEmb", "batchSize", "seqLength", "contextSize", "nSteps", "nModels",
                "nTokensVa", "plotEvery", "flexBlockSize")
    if hp.flexBlockSize not in FLEX_TILE_SIZES:
        raise ConfigError(f"--flexBlockSize must be one of {', '.join(map(str, FLEX_TILE_SIZES))} (it is FlexAttention's "
                          f"tile, which must divide its {FLEX_MASK_BLOCK}-position mask block), got {hp.flexBlockSize}")
    if hp.modelsPerPass < 0:
        raise ConfigError(f"--modelsPerPass must be >= 0 (0: chosen from the GPU's free memory), got {hp.modelsPerPass}")
    for name in positive:
        if getattr(hp, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(hp, name)}")
    for name in ("nStepsWarmup", "nStepsCooldown"):
        if getattr(hp, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(hp, name)}")
    if hp.dimEmb % hp.nHeads or (hp.dimEmb // hp.nHeads) % 2:
        raise ConfigError(f"--dimEmb {hp.dimEmb} must split into --nHeads {hp.nHeads} heads of even size")
    if hp.contextSize > hp.seqLength:
        raise ConfigError(f"--contextSize {hp.contextSize} must be <= --seqLength {hp.seqLength}")
    if hp.nStepsWarmup + hp.nStepsCooldown >= hp.nSteps:
        raise ConfigError(f"--nStepsWarmup + --nStepsCooldown ({hp.nStepsWarmup} + {hp.nStepsCooldown}) must be "
                          f"< --nSteps {hp.nSteps}")
    if hp.tieEmbeddings and hp.freezeEmbeddings in (1, 2, -1, -2):
        raise ConfigError(f"--freezeEmbeddings {hp.freezeEmbeddings} freezes one of two tied embeddings; use 3/-3 "
                          "or --tieEmbeddings 0")
    if hp.afLayerSpecific == 2 and hp.nLayers < 4:
        raise ConfigError(f"--afLayerSpecific 2 needs --nLayers >= 4, got {hp.nLayers}")
    if hp.afNAnchors < 2 or not hp.afRange > 0:
        raise ConfigError(f"--afNAnchors must be >= 2 and --afRange > 0, got {hp.afNAnchors} and {hp.afRange}")
    if hp.kanGridSize < 1 or hp.kanSplineOrder < 0:
        raise ConfigError(f"--kanGridSize must be >= 1 and --kanSplineOrder >= 0, got {hp.kanGridSize} and "
                          f"{hp.kanSplineOrder}")
    if os.sep in hp.runName or (os.altsep and os.altsep in hp.runName):
        raise ConfigError(f"--runName {hp.runName!r} must not contain a path separator (use --dirResults)")
    if hp.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
    if hp.afFileToLoad and not hasSpline:
        raise ConfigError(f"--afFileToLoad needs a spline afType (spline or splinePerDim, or score-spline), got "
                          f"{hp.afType!r}")
    if not hp.filesTokensTr:
        raise ConfigError("--filesTokensTr is empty: give the glob of the training token shards")
    splitAfInit(hp.afInit)
    if not hp.afSmoothness >= 0:
        raise ConfigError(f"--afSmoothness must be >= 0, got {hp.afSmoothness}")
    if trackers.missingPackage(hp.tracker):
        raise ConfigError(trackers.missingPackage(hp.tracker))
    forced = []
    if not (isLearnableAf(mlp) or isLearnableAf(att) or score == "spline") and (hp.afLr != 0 or
                                                                                 hp.afLayerSpecific != 0):
        hp.afLr, hp.afLayerSpecific = 0, 0
        forced.append("afLr=0 and afLayerSpecific=0 (no learnable AF)")
    if hp.afSmoothness and not (hasSpline and hp.afLr != 0):  # so that one flag set serves phase I, phase II and fixed AFs alike
        hp.afSmoothness = 0.0
        forced.append("afSmoothness=0 (no spline is learned)")
    if hp.afLr == 0 and hp.saveAfEvery != -1:
        hp.saveAfEvery = -1
        forced.append("saveAfEvery=-1 (AFs frozen)")
    elif not hasSpline and hp.saveAfEvery != -1:
        hp.saveAfEvery = -1
        forced.append("saveAfEvery=-1 (ptAf files hold splines; other learned AFs are in the model checkpoint)")
    if not hp.runName:
        hp.runName = datetime.datetime.now().strftime("%y%m%d%H%M")
    return forced


# ----------------------------------------------------------------------------------------------
# The AF specification (--afType, --afInit)


def parseNumber(text):
    """A float flag's value; written without a point or exponent it stays an int, as the original's whole-number
    values (its log prints afRange = 15)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def parseAfInit(text):
    """--afInit: a number stays a number (as the original's float flag); an AF name or 'MLP;att-ATT' stays text."""
    try:
        return parseNumber(text)
    except ValueError:
        return text.strip()


def splitScoreType(afType):
    """'MLP;att-ATT;score-SCORE' -> ('MLP;att-ATT', SCORE); an afType without a score part -> (afType, 'softmax')."""
    parts = afType.split(";")
    if len(parts) > 1 and parts[-1].strip().startswith("score-"):
        return ";".join(parts[:-1]), parts[-1].strip()[len("score-"):]
    return afType, "softmax"


def splitAfType(afType):
    """'MLP;att-ATT' -> (MLP, ATT); 'MLP' -> (MLP, 'linear'); a last ';score-SCORE' part is left to splitScoreType."""
    afType = splitScoreType(afType)[0]
    parts = afType.split(";")
    mlp = parts[0].strip()
    if len(parts) == 1:
        return mlp, "linear"
    if len(parts) != 2 or not parts[1].strip().startswith("att-"):
        raise ConfigError(f"--afType {afType!r} must look like 'MLP', 'MLP;att-ATT' or 'MLP;att-ATT;score-SCORE' "
                          "(e.g. 'spline;att-spline')")
    return mlp, parts[1].strip()[len("att-"):]


def splitAfInit(afInit):
    """--afInit -> (MLP sites' init, attention sites' init), each a number or a fixed AF's name; a single value
    applies to both."""
    if isinstance(afInit, (int, float)):
        return afInit, afInit
    parts = [part.strip() for part in afInit.split(";")]
    if len(parts) > 2 or len(parts) == 2 and not parts[1].startswith("att-"):
        raise ConfigError(f"--afInit {afInit!r} must look like 'INIT' or 'INIT;att-INIT' (e.g. 'relu2;att-0.01')")
    inits = [parseAfInit(part) for part in (parts[0], parts[-1][len("att-"):] if len(parts) == 2 else parts[0])]
    for init in inits:
        if isinstance(init, str) and init not in FIXED_TYPES:
            raise ConfigError(f"--afInit: {init!r} is neither a number nor a fixed AF; use a number (-1: identity) or "
                              f"one of {', '.join(FIXED_TYPES)}")
    return tuple(inits)



# ----------------------------------------------------------------------------------------------
# Learning-rate schedules and staggered starts


def lrFactor(step, nSteps, nWarmup, nCooldown, schedule):
    """Multiplier of the base LR at 0-based step `step` of a run of nSteps steps."""
    warm = min(1.0, (step + 1) / nWarmup) if nWarmup > 0 else 1.0
    if schedule == "warmup":
        return warm
    if schedule == "cos":
        if step < nWarmup:
            return warm
        progress = min(1.0, (step - nWarmup) / max(1, nSteps - nWarmup))
        return 5e-4 + 0.5 * (1 - 5e-4) * (1 + math.cos(math.pi * progress))
    if step >= nSteps:
        return 0.05
    cool = min(1.0, (nSteps - step) / nCooldown) if nCooldown > 0 else 1.0
    return min(warm, cool)


def modelStartSteps(hp):
    """Model i's first step: about i*nSteps/nModels, computed as the original computes it (numpy's linspace, then
    its rounding, half to even), which differs from round(i*nSteps/nModels) by one step where float rounding breaks
    a tie, e.g. model 15 of 24 over 100 steps."""
    if hp.nModels == 1 or hp.staggeredStarts == 0:
        return [0] * hp.nModels
    return [int(s) for s in np.round(np.linspace(0, hp.nSteps, hp.nModels, endpoint=False))]


def modelLrFactors(hp, step, startSteps):
    """Per-model LR multipliers at a global step: the global schedule, or (staggeredStarts 2) the global schedule
    at the model's own step count, as the original, whose per-model scheduler is not advanced before its model
    starts (nSteps, warmup and cooldown unchanged, so a late model never reaches the cooldown)."""
    if hp.staggeredStarts == 2 and hp.nModels > 1:
        return [lrFactor(step - s, hp.nSteps, hp.nStepsWarmup, hp.nStepsCooldown, hp.lrSchedule) for s in startSteps]
    return [lrFactor(step, hp.nSteps, hp.nStepsWarmup, hp.nStepsCooldown, hp.lrSchedule)] * hp.nModels


def activeModels(step, startSteps):
    """Number of models started by this step; they are always models 0..n-1 (start steps increase)."""
    return sum(1 for s in startSteps if s <= step)


def localActiveModels(nActiveAll, dataParallel, firstModel, stopModel):
    """How many of a process's models (firstModel..stopModel-1) are active when nActiveAll models of the run are."""
    return 1 if dataParallel else max(0, min(nActiveAll, stopModel) - firstModel)


def learningRate(hp, model, stepIndex, startSteps):
    """Model's weight LR at 0-based step stepIndex."""
    return hp.lr * modelLrFactors(hp, stepIndex, startSteps)[model]


def tokensSeen(hp, model, stepsDone, startSteps, processesSharingData=1):
    """Training tokens model has seen after stepsDone steps of the run; processesSharingData: the processes of a
    data-parallel run, whose tokens all train the one model."""
    return max(0, stepsDone - startSteps[model]) * hp.batchSize * hp.seqLength * processesSharingData


# ----------------------------------------------------------------------------------------------
# When the reports and outputs are due, after `step` steps (1-based: step 1 is the first update done)


def reportDue(step, nSteps, plotEvery):
    """The training lines: at steps 1 and 6, every plotEvery steps and at the last step, as the original."""
    return step in (1, 6, nSteps) or (step - 1) % plotEvery == 0


def validationDue(step, nSteps, valEvery):
    """After the first step, every valEvery-th (1, 1 + valEvery, ...) and the last (valEvery 0: the last only;
    -1: never)."""
    if valEvery < 0:
        return False
    return step == nSteps or (valEvery > 0 and (step - 1) % valEvery == 0)


def peakMemoryDue(step, nSteps):
    """The original's peak-CUDA-memory lines: after steps 6 and 11 (compiled and warm) and at the end."""
    return step in (6, 11, nSteps)


def plotDue(step, nSteps, plotEvery):
    return step == nSteps or (step - 1) % plotEvery == 0


def everyDue(every, step, nSteps):
    """An every-N output (--saveModelEvery, --saveAfEvery): every N steps and at the end (0: only at the end; -1:
    never)."""
    if every < 0:
        return False
    return step == nSteps or (every > 0 and step % every == 0)



# ----------------------------------------------------------------------------------------------
# Device, model, passes and compiled graphs


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


def modelPasses(nActive, modelsPerPass):
    """(first model, number of models) of each batched pass over nActive active models."""
    return [(first, min(modelsPerPass, nActive - first)) for first in range(0, nActive, modelsPerPass)]


def representativePasses(passes, nModels):
    """A few of the passes (first, n) a run makes, enough to compile every graph it needs: per kind of pass
    (first model 0 or not, one model or several, up to the last model, all models) two with different first
    models, so that the first model's index becomes dynamic too."""
    byKind = {}
    for first, n in sorted(passes):
        kind = (first == 0, n == 1, first + n == nModels, n == nModels)
        chosen = byKind.setdefault(kind, [])
        if len(chosen) < 2 and all(f != first for f, _ in chosen):
            chosen.append((first, n))
    return sorted(p for chosen in byKind.values() for p in chosen)


def runPasses(startSteps, fromStep, localActive, modelsPerPass):
    """Every (first model, number of models) of a training pass from fromStep to the end of a run; localActive maps
    the run's number of active models to this process's."""
    steps = [fromStep] + [s for s in startSteps if s > fromStep]
    return {p for step in steps for p in modelPasses(localActive(activeModels(step, startSteps)), modelsPerPass)}


def validationBatchSize(nSequences, seqLength):
    """Validation sequences per forward pass: about 16k tokens."""
    return max(1, min(nSequences, 16384 // seqLength))


def shapeVariants(passes, nModels, nValidation, seqLength, statistics=False):
    """The graphs a compiled run needs, as (kind, first model, models, batch): representative training passes, the
    validation batches of nValidation sequences (0: no validation) and, with statistics, the AF-input statistics
    pass (on the first validation batch, or on one training sequence without validation)."""
    variants = [("train", first, n, 1) for first, n in representativePasses(passes, nModels)]
    if nValidation:
        perForward = validationBatchSize(nValidation, seqLength)
        variants += [("validation", 0, 1, batch) for batch in sorted({perForward, nValidation % perForward} - {0})]
    if statistics:
        variants.append(("statistics", 0, 1, validationBatchSize(nValidation, seqLength) if nValidation else 1))
    return variants

