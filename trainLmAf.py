"""Train GPT-style language models with learned (spline) or fixed activation functions: flags -> run.

Phase I (--nModels N > 1): N models trained side by side, sharing their activation functions (AFs),
all active models in one batched pass. Phase II (--afFileToLoad): a fresh model with AFs loaded from
phase I, frozen when --afLr 0. See README.md for the commands and SPEC of every flag (--help).
"""
import argparse
import dataclasses
import datetime
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import checkpoints
import forwardPasses
import preflight
import runOutputs
import stopping
import trackers
import vocabulary
from activationFunctions import FIXED_TYPES, LEARNABLE_TYPES, MLP_INPUT_TYPES, SPLINE_TYPES, splineSmoothness
from afFiles import AfFileError, loadAfsIntoModel, splineKnots
from attention import FLEX_MASK_BLOCK, FLEX_TILE_SIZES, SCORE_TYPES
from cliErrors import OneLineErrorParser
from distributed import Distributed
from model import MLP_VARIANT_AFS, copyInitAcrossModels, permuteInitAcrossModels
from runPlan import (ConfigError, activeModels, buildModel, lrFactor, modelLrFactors, modelPasses, modelStartSteps,
                     compileBackend, modelVocabSize, parseAfInit, parseNumber, pickDevice, splitAfInit, splitAfType,
                     splitScoreType)
from stackedAdam import StackedAdam
from tokenShards import ShardError, TokenStream, listShards, readShardHeader, validationSequences


# ----------------------------------------------------------------------------------------------
# Hyperparameters (every field is a --flag of the same name)


def flag(default, help, choices=None, parse=None):
    """A hyperparameter and its CLI flag; parse: the flag's parser, when its type's own does not fit."""
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse})


@dataclass
class Hyperparameters:
    runName: str = flag("", "file-name stem of every output; empty: the current time yymmddHHMM")
    seed: int = flag(0, "seeds python, numpy and torch (CPU and CUDA)")
    plotMinAcc: float = flag(0.0, "lower y-limit of the accuracy panel")
    plotMaxAcc: float = flag(0.4, "upper y-limit of the accuracy panel")
    plotMinLoss: float = flag(3.0, "lower y-limit of the loss panel")
    plotMaxLoss: float = flag(15.0, "upper y-limit of the loss panel")
    shuffleTrData: int = flag(1, "0: sequences in order; 1: shuffled order; 2: also shuffle tokens inside each "
                                 "sequence (control experiment)", (0, 1, 2))
    tokenDocSep: int = flag(50256, "document separator token (<|endoftext|>); -1: none")
    nLayers: int = flag(4, "transformer blocks")
    nHeads: int = flag(4, "attention heads")
    dimEmb: int = flag(256, "embedding width")
    tieEmbeddings: bool = flag(True, "output head shares the input embedding matrix")
    lr: float = flag(0.0006, "Adam learning rate of all non-AF weights")
    freezeEmbeddings: int = flag(0, "1: freeze input embedding; 2: freeze output head; 3: both; -1/-2/-3: train ONLY "
                                    "those (plus AFs if afLr != 0)", (-3, -2, -1, 0, 1, 2, 3))
    batchSize: int = flag(1, "gradient-accumulation steps per optimizer step (each one sequence)")
    seqLength: int = flag(4096, "tokens per sequence")
    contextSize: int = flag(1024, "attention window (sliding, inside the sequence); <= seqLength")
    nSteps: int = flag(20000, "optimizer steps")
    nStepsWarmup: int = flag(2000, "LR warmup steps")
    nStepsCooldown: int = flag(10000, "LR cooldown steps (trap); warmup + cooldown < nSteps")
    lrSchedule: str = flag("trap", "trap: warmup, flat, linear cooldown; warmup: warmup then flat; cos: warmup then "
                                   "cosine", ("trap", "warmup", "cos"))
    wtDecay: float = flag(0.0, "decoupled weight decay")
    nModels: int = flag(1, ">1: phase-I multi-model training with shared AFs")
    staggeredStarts: int = flag(2, "nModels>1. 0: all start at step 0; 1: model i starts at about i*nSteps/nModels "
                                   "(the original's np.round(np.linspace(0, nSteps, nModels, endpoint=False))) on the "
                                   "global LR schedule; 2: same starts, model i's LR factor at step t is the "
                                   "global schedule's at t - start_i (late models never reach the cooldown)", (0, 1, 2))
    sameDataAcrossModels: bool = flag(False, "all models see the same batch each step")
    sameInitAcrossModels: bool = flag(False, "all models start from identical weights")
    adamB1: float = flag(0.8, "Adam beta1 of the weights")
    adamB2: float = flag(0.95, "Adam beta2 of the weights")
    gradientClipping: float = flag(0, ">0: clip the global gradient norm (all trained weights of all models and the "
                                        "AFs, one norm) to this")
    afType: str = flag("gelu;att-linear", "'MLP;att-ATT': MLP AF and pre-QKV attention AF. Splines: spline, "
                                          "splinePerDim; fixed: linear, gelu, relu, relu2, silu, tanh, elu, selu, "
                                          "softplus; learnable: prelu, swish, lgelu, crrelu, rational, polyrelu, "
                                          "polynorm, la; MLP only: moa, geglu, swiglu, reglu, kan; attention also: "
                                          "none. 'MLP' alone means att-linear. An optional last part ';score-SCORE' "
                                          "sets how attention weights come from the scores: softmax (default), "
                                          "softplus, sigmoid, spline (learned, like the other splines)")
    afLayerSpecific: int = flag(1, "0: one AF shared by all layers; 1: one per layer; 2: first and last layers own "
                                   "theirs, middle layers share one (needs >= 4 layers)", (0, 1, 2))
    afRange: float = flag(15, "spline knots span [-afRange, afRange]")
    afNAnchors: int = flag(64, "number of spline knots")
    afInit: float = flag(0.01, "initial knot values: a constant; -1: identity; a fixed AF's name (relu2, gelu, ...): "
                               "that AF at the knots; 'MLP;att-ATT' sets the attention sites' separately, e.g. "
                               "'relu2;att-0.01'", parse=parseAfInit)
    afSmoothness: float = flag(0.0, "lambda of the smoothness prior on learned splines: lambda * sum_k (v[k+1] - "
                                    "2 v[k] + v[k-1])^2 / h^3 per spline (h: knot spacing) joins every model's "
                                    "loss; 0: none (the original)")
    afLr: float = flag(0.1, ">0: Adam on AF values; <0: plain SGD with LR |afLr|; 0: AFs frozen")
    afAdamB1: float = flag(0.99, "Adam beta1 of the AF values")
    afAdamB2: float = flag(0.999, "Adam beta2 of the AF values")
    kanGridSize: int = flag(5, "afType kan: grid intervals of each edge's B-spline")
    kanSplineOrder: int = flag(3, "afType kan: degree of the B-splines")
    afFileToLoad: str = flag("", "ptAf file (.pt or .csv) from phase I to load the AFs from")
    dirResults: str = flag("./results-fineweb10B", "where logs, plots and checkpoints go")
    filesTokensTr: str = flag("./data-fineweb10B/fineweb_train_*.bin", "glob of training token shards")
    filesTokensVa: str = flag("./data-fineweb10B/fineweb_val_*.bin", "glob of validation token shards; empty: none")
    nTokensVa: int = flag(10 * 1024 * 1024, "validation tokens per evaluation (always the same first tokens)")
    valEvery: int = flag(500, "validate every N steps, at the first and the last; 0: only at the end; -1: never")
    saveModelEvery: int = flag(-1, "model checkpoint every N steps; 0: only at the end; -1: never")
    saveAfEvery: int = flag(0, "AF checkpoint every N steps; 0: only at the end; -1: never (forced when afLr=0)")
    plotEvery: int = flag(200, "print progress and refresh plots every N steps")
    plottingLevel: int = flag(2, "0: no plots; 1: loss/acc + AF shapes; 2: + activation magnitudes; "
                                 "3: + max magnitudes and per-parameter magnitudes printed", (0, 1, 2, 3))
    plotAfZoom: bool = flag(True, "AF plot: each tile spans its inputs' 0.1-99.9 percentiles, the whole curve in an "
                                  "inset; 0: the whole knot range")
    dtype: str = flag("float32", "float32, or bfloat16 (mixed precision; weights and spline knots stay float32)",
                      ("float32", "bfloat16"))
    flexBlockSize: int = flag(32, "FlexAttention kernel tile size, 16, 32, 64 or 128 (speed/memory only)")
    device: str = flag("auto", "auto: CUDA if present, else CPU", ("auto", "cuda", "cpu"))
    modelsPerPass: int = flag(0, "phase I: run the active models in groups of this many, one batched pass each (same "
                                 "results, less memory); 0: on CUDA as many as the free GPU memory holds, else all")
    compileBackend: str = flag("auto", "torch.compile backend of the model: auto (inductor on CUDA, none on a CPU), "
                                       "inductor, aot_eager (graph checks), none (eager)",
                               ("auto", "inductor", "aot_eager", "none"))
    plotShow: bool = flag(False, "also show the plots in a live window (only when a display exists)")
    resumeFrom: str = flag("", "pt-RUN-stepNNNN.pt checkpoint (from --saveModelEvery or an interrupt) to continue")
    tracker: str = flag("", "also send the metrics, AF-input statistics and plots to tensorboard (event files in "
                            "dirResults/tensorboard/RUN/) or wandb (WANDB_MODE=offline works); empty: none",
                        ("",) + trackers.TRACKERS)
    preflight: bool = flag(False, "check the configured run without training (flags, files, estimated peak memory per "
                                  "pass against the GPU, modelsPerPass, kernels, FlexAttention configs, compiled "
                                  "graphs); exit 0 when it will fit and compile")
    preflightGpu: str = flag("", "--preflight without a GPU here: the GPU to check for, NAME:CAPABILITY:GB, e.g. "
                                 "4090-laptop:8.9:16 or h100:9.0:80")


def parseBool(text):
    if text in ("1", "true", "True"):
        return True
    if text in ("0", "false", "False"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0/true/false/True/False, got {text!r}")


def buildParser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Hyperparameters):
        isBool = f.type in (bool, "bool")
        kind = f.metadata["parse"] or (parseBool if isBool else {float: parseNumber}.get(f.type, f.type))
        bare = dict(nargs="?", const=True) if isBool else {}  # `--preflight` alone means `--preflight 1`
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"],
                            choices=f.metadata["choices"], metavar=f.name.upper() if f.metadata["choices"] is None
                            else None, **bare)
    return parser


def parseArgs(argv=None):
    """(Hyperparameters, the names of the flags given) from argv, or from the command line when argv is None."""
    # resolved once, so that an empty argv ([]) is read as empty and not as the process's own command line
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = buildParser()
    parser.__class__ = OneLineErrorParser
    args = parser.parse_args(argv)
    given = {a.dest for a in parser._actions
             if any(opt in argv or any(x.startswith(opt + "=") for x in argv) for opt in a.option_strings)}
    return Hyperparameters(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Hyperparameters)}), given


def isLearnableAf(name):
    """Whether the AF has parameters of its own (trained with afLr); gated and KAN MLPs' are ordinary weights."""
    return name in SPLINE_TYPES + LEARNABLE_TYPES + MLP_INPUT_TYPES


def validate(hp):
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
# Setup


def seedEverything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# ----------------------------------------------------------------------------------------------
# Training run


class Trainer:
    """One training run: data, model, optimizers, the step and the loop. Built by setup(), run by train(). What it
    writes is runOutputs.py's (log, metrics, plots, ptAf files) and checkpoints.py's (model checkpoints); its other
    passes are forwardPasses.py's and its early stops stopping.py's: functions of the Trainer."""

    def __init__(self, hp, given=frozenset()):
        self.hp, self.given = hp, given
        self.stopSignal = None

    # -- setup -------------------------------------------------------------------------------

    def setup(self):
        hp = self.hp
        resume = None
        if hp.resumeFrom:
            resume = checkpoints.loadResumeCheckpoint(hp, self.given)
        # the original prints afLayerSpecific as given, not as forced (its GELU baseline log: 1, with afLr 0)
        self.printedAs = {"afLayerSpecific": hp.afLayerSpecific}
        forced = validate(hp)
        self.paths()
        if runOutputs.finalLineWritten(self.logPath, hp.nSteps):  # also when resuming: the run finished after its checkpoint
            self.alreadyComplete = True
            return self
        self.alreadyComplete = False
        self.dist = Distributed()
        if self.dist.enabled and hp.nModels > 1 and hp.nModels < self.dist.worldSize:
            raise ConfigError(f"--nModels {hp.nModels} is fewer than the {self.dist.worldSize} processes; "
                              "give every process at least one model")
        self.device = self.dist.start(pickDevice(hp.device))
        compileBackend(hp, self.device)  # a backend that cannot train this model here is refused before anything else
        self.tracksCudaMemory = self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls, as the original
        self.dataParallel = self.dist.enabled and hp.nModels == 1
        self.firstModel, self.stopModel = self.dist.modelRange(hp.nModels)
        self.nLocal = self.stopModel - self.firstModel
        self.afMlp, self.afAtt = splitAfType(hp.afType)
        seedEverything(hp.seed)

        self.trFiles = listShards(hp.filesTokensTr, "--filesTokensTr")
        self.vaFiles = listShards(hp.filesTokensVa, "--filesTokensVa") if hp.filesTokensVa else []
        for path in self.trFiles + self.vaFiles:
            readShardHeader(path)
        self.vocabulary = vocabulary.ofShards(self.trFiles + self.vaFiles)
        if self.vocabulary:
            forced += self.adoptCorpusVocabulary()
        if resume:
            checkpoints.checkResumeVocabulary(hp.resumeFrom, resume, self.vocabulary)
        self.vocabSize = resume["vocabSize"] if resume else modelVocabSize(self.trFiles + self.vaFiles, self.vocabulary)
        streamIndices = [0] if hp.sameDataAcrossModels or self.dataParallel else range(self.firstModel, self.stopModel)
        self.streams = [TokenStream(self.trFiles, hp.seqLength, hp.seed, i, hp.shuffleTrData) for i in streamIndices]
        self.vaSequences = validationSequences(self.vaFiles, hp.seqLength, hp.nTokensVa) if self.vaFiles else None

        # Every rank builds all N models from the same seed and keeps its own block: the same init as one process.
        model = buildModel(hp, self.vocabSize, self.device)
        self.afNotes = []
        startValues = splineValues(model)  # drawn in the AF plot: the flags' init, which a resumed run rebuilds...
        if resume:
            model.load_state_dict(resume["model"])
            if hp.afFileToLoad:  # ...unless the start came from a file
                startValues = {}
        elif hp.afFileToLoad:
            self.afNotes = loadAfsIntoModel(model, hp.afFileToLoad, freeze=hp.afLr == 0)
            model.to(self.device)
            startValues = splineValues(model)
        self.startValues = startValues
        if hp.nModels > 1 and not resume:
            if hp.sameInitAcrossModels:
                copyInitAcrossModels(model)
            else:
                permuteInitAcrossModels(model, torch.Generator().manual_seed(hp.seed))
        self.model = model if self.nLocal == model.nModels else model.subModels(self.firstModel, self.stopModel)
        for p in frozenParameters(self.model, hp.freezeEmbeddings):
            p.requires_grad_(False)
        for p in self.model.afParameters():
            p.requires_grad_(hp.afLr != 0)
        self.buildOptimizers()
        self.startSteps = modelStartSteps(hp)
        self.step = 0
        self.updating = False
        self.history = {"train": [], "val": [], "actMean": [], "actMax": []}
        self.trainSeconds = 0.0
        self.window = self.newWindow()
        self.latestAfInputs, self.sitesOutOfRange = None, set()
        knots = splineKnots(self.model)  # a phase-II spline keeps the knots of its file
        self.afInputRange = float(knots[-1]) if knots is not None else hp.afRange
        if resume:
            checkpoints.restore(self, resume)
        self.modelsPerPass, self.modelsPerPassNote = preflight.chooseModelsPerPass(hp, self.device, self.vocabSize,
                                                                                   self.nLocal)
        forwardPasses.compileModel(self)
        self.forced = forced
        return self

    def adoptCorpusVocabulary(self):
        """Documents of a corpus vocabulary's shards are separated by its own <|endoftext|>; the forced-value note."""
        hp, eot = self.hp, self.vocabulary.eotId
        if "tokenDocSep" in self.given and hp.tokenDocSep not in (eot, -1):
            raise ConfigError(f"--tokenDocSep {hp.tokenDocSep} contradicts the shards' vocabulary "
                              f"({self.vocabulary.origin}), whose <|endoftext|> is id {eot}; drop the flag or give "
                              f"--tokenDocSep {eot} (-1: no separator)")
        if hp.tokenDocSep in (eot, -1):
            return []
        hp.tokenDocSep = eot
        return [f"tokenDocSep={eot} (<|endoftext|> of the shards' vocabulary)"]

    def paths(self):
        hp = self.hp
        self.logPath = os.path.join(hp.dirResults, f"log-{hp.runName}.txt")
        self.metricsPath = os.path.join(hp.dirResults, f"metrics-{hp.runName}.csv")

    def buildOptimizers(self):
        hp = self.hp
        weights = [p for p in self.model.weightParameters() if p.requires_grad]
        self.optimizer = StackedAdam(weights, self.nLocal, betas=(hp.adamB1, hp.adamB2), weightDecay=hp.wtDecay)
        afParams = [p for p in self.model.afParameters() if p.requires_grad]
        if not afParams:
            self.afOptimizer = None
        elif hp.afLr > 0:
            self.afOptimizer = torch.optim.Adam(afParams, lr=hp.afLr, betas=(hp.afAdamB1, hp.afAdamB2))
        else:
            self.afOptimizer = torch.optim.SGD(afParams, lr=-hp.afLr)

    # -- one step ----------------------------------------------------------------------------

    def nextBatch(self, nActive):
        """Tokens [nActive, 1, seqLength+1] for one accumulation step: one sequence per active model."""
        if self.dataParallel:  # rank r takes sequence r of every worldSize consecutive ones: one process's order
            rows = [[self.streams[0].next() for _ in range(self.dist.worldSize)][self.dist.rank]]
        elif self.hp.sameDataAcrossModels:
            rows = [self.streams[0].next()] * nActive
        else:
            rows = [self.streams[i].next() for i in range(nActive)]
        batch = torch.from_numpy(np.stack(rows))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, None, :]

    def localActive(self, nActiveAll):
        """How many of this process's models are active when nActiveAll models of the run are."""
        return 1 if self.dataParallel else max(0, min(nActiveAll, self.stopModel) - self.firstModel)

    def passes(self, nActive):
        """(first model, number of models) of each batched pass over this process's nActive active models."""
        return modelPasses(nActive, self.modelsPerPass)

    def forwardPass(self, tokens, first):
        """Losses and accuracies [n] of models first..first+n-1 on tokens [n, B, T+1]."""
        inputs, targets = tokens[..., :-1], tokens[..., 1:]
        if self.compiled is not self.model:
            # one graph for every number of models (and validation batch) instead of one each
            torch._dynamo.maybe_mark_dynamic(inputs, 0)
            torch._dynamo.maybe_mark_dynamic(targets, 0)
        with self.autocast:
            return self.compiled(inputs, targets, firstModel=first)

    def trainStep(self):
        """One optimizer step of the active models of this process; returns (nActive, losses, accuracies)."""
        hp, step = self.hp, self.step
        nActiveAll = activeModels(step, self.startSteps)
        nActive = self.localActive(nActiveAll)
        lossSum = torch.zeros(nActive, device=self.device)
        accSum = torch.zeros(nActive, device=self.device)
        for _ in range(hp.batchSize if nActive else 0):
            tokens = self.nextBatch(nActive)
            for first, n in self.passes(nActive):  # each pass's activations are freed by its backward
                losses, accuracies = self.forwardPass(tokens[first:first + n], first)
                (losses.sum() / hp.batchSize).backward()
                lossSum[first:first + n] += losses.detach()
                accSum[first:first + n] += accuracies.detach()
        afParams = [p for p in self.model.afParameters() if p.requires_grad]
        self.reduceGradients(afParams, nActive, nActiveAll)
        if hp.afSmoothness > 0:
            # after the average over models: lambda * S in every model's loss gives lambda * dS/dv, on every process
            self.smoothness().mul(hp.afSmoothness).backward()
        if hp.gradientClipping > 0:
            self.clipGradients(nActive, afParams)
        self.updating = True  # from here until the AF step, the weights are neither before nor after this step
        if nActive:
            factors = modelLrFactors(hp, step, self.startSteps)[self.firstModel:self.stopModel]
            self.optimizer.step(nActive, [hp.lr * f for f in factors])
            self.optimizer.zero_grad()
        if self.afOptimizer:
            afFactor = lrFactor(step, hp.nSteps, hp.nStepsWarmup, hp.nStepsCooldown, hp.lrSchedule)
            for group in self.afOptimizer.param_groups:
                group["lr"] = abs(hp.afLr) * afFactor
            self.afOptimizer.step()
            self.afOptimizer.zero_grad(set_to_none=True)
        self.updating = False
        return nActive, lossSum / hp.batchSize, accSum / hp.batchSize

    @torch.no_grad()
    def reduceGradients(self, afParams, nActive, nActiveAll):
        """AF gradient: the average over the models that ran, on all processes; data parallel: average all."""
        if not self.dist.enabled:
            for p in afParams:
                if p.grad is not None:
                    p.grad /= nActive
            return
        shared = afParams + ([p for p in self.optimizer.params] if self.dataParallel else [])
        for p in shared:
            if p.grad is None:  # a process whose models have not started still takes part in the sum
                p.grad = torch.zeros_like(p)
        self.dist.sumInPlace([p.grad for p in shared])
        divisor = self.dist.worldSize if self.dataParallel else nActiveAll
        for p in shared:
            p.grad /= divisor

    @torch.no_grad()
    def clipGradients(self, nActive, afParams):
        """Clip one global norm over everything that gets a step (the active models' weights and the AFs), as the
        original does."""
        weightGrads = [p.grad[:nActive] for p in self.optimizer.params if p.grad is not None] if nActive else []
        afGrads = [p.grad for p in afParams if p.grad is not None]
        squares = sum((g.float().pow(2).sum() for g in weightGrads), torch.zeros((), device=self.device))
        if self.dist.enabled and not self.dataParallel:  # each process holds the gradients of its own models...
            self.dist.sumInPlace([squares])
        squares = squares + sum(g.float().pow(2).sum() for g in afGrads)  # ...the AFs' are the same on all of them
        scale = (self.hp.gradientClipping / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for g in weightGrads + afGrads:
            g.mul_(scale.to(g.dtype))

    def smoothness(self):
        """S, the sum of splineSmoothness over the learned splines (the prior's penalty is afSmoothness * S)."""
        return sum(splineSmoothness(spline) for spline in self.model.splines() if spline.values.requires_grad)

    # -- the loop ----------------------------------------------------------------------------

    def train(self):
        from tqdm import tqdm

        hp = self.hp
        runOutputs.openOutputs(self)
        bar = tqdm(total=hp.nSteps, initial=self.step, desc=hp.runName, unit="step", dynamic_ncols=True,
                   disable=None if self.dist.isMain else True, file=sys.stderr)
        self.log.progressBar = bar
        pending = None  # (losses, step, AF values before that step): checked one step late to avoid a GPU sync
        stopping.installSignalHandlers(self)
        try:
            while self.step < hp.nSteps:
                t0 = time.perf_counter()
                afBefore = [p.detach().clone() for p in self.model.afParameters()]
                nActive, losses, accs = self.trainStep()
                if pending is not None:
                    stopping.checkFinite(self, *pending)
                pending = (losses, self.step, afBefore)
                if self.dist.enabled:
                    stopping.agreeAcrossProcesses(self, losses)
                self.step += 1
                self.window["loss"][:nActive] += losses
                self.window["acc"][:nActive] += accs
                self.window["count"][:nActive] += 1
                self.window["steps"] += 1
                # CUDA runs ahead of the CPU: the clock stops when this step's GPU work is done, so s/step, tokens/s
                # and MFU count every step's work once
                torch.get_device_module(self.device).synchronize(self.device)
                seconds = time.perf_counter() - t0
                self.trainSeconds += seconds
                self.window["seconds"] += seconds
                bar.update(1)
                if runOutputs.validationDue(self, self.step):
                    runOutputs.logValidation(self, self.step)  # after the update, as the original: Step 1 is one update in
                if self.step in (6, 11, hp.nSteps) and self.tracksCudaMemory:
                    runOutputs.logPeakMemory(self)
                if runOutputs.isReportStep(self, self.step):
                    stopping.checkFinite(self, *pending)
                    runOutputs.reportTraining(self, bar)
                runOutputs.periodicOutputs(self)
                if self.stopSignal is not None:
                    raise stopping.Interrupted()
        except stopping.Interrupted:
            self.closeBar(bar)
            stopping.saveOnInterrupt(self)
            return 128 + self.stopSignal
        except stopping.NonFiniteLoss as err:
            self.closeBar(bar)
            stopping.saveLastGoodAfs(self, err, pending)
            raise
        except torch.OutOfMemoryError as err:
            self.closeBar(bar)
            err.checkpoint = stopping.saveAfterOutOfMemory(self)
            raise
        finally:
            self.closeBar(bar)
            stopping.restoreSignalHandlers(self)
            runOutputs.closeOutputs(self)
        return 0

    def closeBar(self, bar):
        bar.close()
        self.log.progressBar = None

    def newWindow(self):
        zeros = torch.zeros(self.nLocal, device=self.device)
        return {"loss": zeros, "acc": zeros.clone(), "count": zeros.clone(), "steps": 0, "seconds": 0.0}


# ----------------------------------------------------------------------------------------------
# Entry point


def main(argv=None):
    hp, given = parseArgs(argv)
    if hp.preflight:
        try:
            forced = validate(hp)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return preflight.runPreflight(hp, forced)
    trainer = Trainer(hp, given)
    try:
        trainer.setup()
        if trainer.alreadyComplete:
            print(f"Run '{hp.runName}' already complete ({trainer.logPath} holds its final step); nothing to do.")
            return 0
        return trainer.train()
    except (ConfigError, ShardError, AfFileError, trackers.TrackerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except stopping.NonFiniteLoss as err:
        saved = f"; AF values before that step saved in {err.afFile}" if err.afFile else ""
        print(f"error: {err}{saved}", file=sys.stderr)
        return 3
    except torch.OutOfMemoryError as err:
        # the advice measures free memory after this block: its live traceback holds the failed pass's frames and,
        # in them, its activations
        checkpoint = getattr(err, "checkpoint", None)
    except KeyboardInterrupt:
        print("error: interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    finally:
        if getattr(trainer, "dist", None) is not None:
            trainer.dist.close()
    saved = f"; resume from {checkpoint} with --resumeFrom" if checkpoint else ""
    print(f"error: {stopping.outOfMemoryAdvice(trainer)}{saved}", file=sys.stderr)
    return 4


if __name__ == "__main__":
    sys.exit(main())
