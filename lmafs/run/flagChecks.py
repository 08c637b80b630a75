"""The flags' checks: from the Hyperparameters parsed from the command line (and the names of the flags given) to the
settled ones a run reads, a new frozen object that nothing assigns to afterwards, with the notes on what was forced
(a resumed run's checkpoint values, SPEC §2's forced values, the document separator of the shards' vocabulary);
ConfigError, the one-line user error of bad flags; the grammar of --afType and --afInit."""
import dataclasses
import datetime
import os

import torch

from lmafs.run import trackers
from lmafs.data import vocabulary
from activationFunctions import FIXED_TYPES, LEARNABLE_TYPES, MLP_INPUT_TYPES, SPLINE_TYPES
from lmafs.network.attention import FLEX_MASK_BLOCK, FLEX_TILE_SIZES, SCORE_TYPES
from model import MLP_VARIANT_AFS
from lmafs.run.runFiles import RunFiles
from lmafs.data.tokenShards import listShards


class ConfigError(Exception):
    """Bad flags or inputs; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# The flags' checks


def isLearnableAf(name):
    """Whether the AF has parameters of its own (trained with afLr); gated and KAN MLPs' are ordinary weights."""
    return name in SPLINE_TYPES + LEARNABLE_TYPES + MLP_INPUT_TYPES


def checkFlags(hp):
    """Check every flag: (the hyperparameters with the forced values of SPEC §2, a new object; the notes saying what
    was forced). Raises ConfigError."""
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
    values, forced = {}, []
    if not (isLearnableAf(mlp) or isLearnableAf(att) or score == "spline") and (hp.afLr != 0 or
                                                                                 hp.afLayerSpecific != 0):
        values.update(afLr=0, afLayerSpecific=0)
        forced.append("afLr=0 and afLayerSpecific=0 (no learnable AF)")
    afLr = values.get("afLr", hp.afLr)
    if hp.afSmoothness and not (hasSpline and afLr != 0):  # so that one flag set serves phase I, phase II and fixed AFs alike
        values["afSmoothness"] = 0.0
        forced.append("afSmoothness=0 (no spline is learned)")
    if afLr == 0 and hp.saveAfEvery != -1:
        values["saveAfEvery"] = -1
        forced.append("saveAfEvery=-1 (AFs frozen)")
    elif not hasSpline and hp.saveAfEvery != -1:
        values["saveAfEvery"] = -1
        forced.append("saveAfEvery=-1 (ptAf files hold splines; other learned AFs are in the model checkpoint)")
    if not hp.runName:
        values["runName"] = datetime.datetime.now().strftime("%y%m%d%H%M")
    return dataclasses.replace(hp, **values), forced


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
# Settling the hyperparameters once


@dataclasses.dataclass(frozen=True)
class Settled:
    hp: object  # the Hyperparameters the run reads
    asGiven: object  # as parsed: the original's log prints afLayerSpecific as given, before it is forced
    forced: tuple  # notes on the values forced, for the log's header
    resume: dict  # the checkpoint --resumeFrom names, or None
    alreadyComplete: bool  # the log holds the final step: the run stops at once, its data unread


def settle(hp, given, resume=None):
    """The hyperparameters a run reads, settled once: a resumed run's checkpoint (resume, loaded from --resumeFrom)
    supplies every flag not given; then the flags' checks and SPEC §2's forced values; then, unless the run is
    already complete, the shards' vocabulary (its <|endoftext|> separates documents; a resume must read the data
    it was trained on). Raises ConfigError, or a ShardError for the data."""
    if resume is not None:
        names = {f.name for f in dataclasses.fields(hp)}
        hp = dataclasses.replace(hp, **{name: value for name, value in resume["hyperparameters"].items()
                                        if name != "resumeFrom" and name not in given and name in names})
    asGiven = hp
    hp, forced = checkFlags(hp)
    complete = RunFiles(hp.dirResults, hp.runName).complete(hp.nSteps)
    if not complete:
        files = listShards(hp.filesTokensTr, "--filesTokensTr") + (
            listShards(hp.filesTokensVa, "--filesTokensVa") if hp.filesTokensVa else [])
        corpusVocabulary = vocabulary.ofShards(files)
        if resume is not None:
            checkResumeVocabulary(hp.resumeFrom, resume, corpusVocabulary)
        if corpusVocabulary:
            hp, note = adoptCorpusVocabulary(hp, given, corpusVocabulary)
            forced += note
    return Settled(hp, asGiven, tuple(forced), resume, complete)


def adoptCorpusVocabulary(hp, given, corpusVocabulary):
    """Documents of a corpus vocabulary's shards are separated by its own <|endoftext|>: (hp, forced-value notes)."""
    eot = corpusVocabulary.eotId
    if "tokenDocSep" in given and hp.tokenDocSep not in (eot, -1):
        raise ConfigError(f"--tokenDocSep {hp.tokenDocSep} contradicts the shards' vocabulary "
                          f"({corpusVocabulary.origin}), whose <|endoftext|> is id {eot}; drop the flag or give "
                          f"--tokenDocSep {eot} (-1: no separator)")
    if hp.tokenDocSep in (eot, -1):
        return hp, []
    return dataclasses.replace(hp, tokenDocSep=eot), [f"tokenDocSep={eot} (<|endoftext|> of the shards' vocabulary)"]


def checkResumeVocabulary(path, ckpt, shardsVocabulary):
    """ConfigError unless the shards were made with the vocabulary the checkpoint was trained with."""
    saved = ckpt.get("tokenizer")
    savedPrint = vocabulary.fingerprint(saved) if saved else None
    if savedPrint != (shardsVocabulary.fingerprint if shardsVocabulary else None):
        trainedWith = vocabulary.fromJson(saved, path).name if saved else vocabulary.GPT2_NAME
        dataWith = shardsVocabulary.name if shardsVocabulary else vocabulary.GPT2_NAME
        raise ConfigError(f"--resumeFrom {path!r} was trained with {trainedWith}, but the shards are {dataWith}; "
                          "resume on the data the run was trained on")
