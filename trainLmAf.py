"""Train GPT-style language models with learned (spline) or fixed activation functions: flags -> run.

Phase I (--nModels N > 1): N models trained side by side, sharing their activation functions (AFs),
all active models in one batched pass. Phase II (--afFileToLoad): a fresh model with AFs loaded from
phase I, frozen when --afLr 0. See README.md for the commands and SPEC of every flag (--help).
"""
import argparse
import dataclasses
import functools
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lmafs.run import checkpoints
from lmafs.run import preflight
from lmafs.run import runOutputs
from lmafs.run import stopping
from lmafs.run import trackers
from lmafs.network.afFiles import AfFileError, saveAfFiles, scoreSplineKnots, splineKnots
from lmafs.cliErrors import OneLineErrorParser
from lmafs.run.distributed import Distributed
from lmafs.run.forwardPasses import Passes, fallbackProblemHere, statisticsTokens
from lmafs.run.gradients import averageGradients, clipGlobalNorm
from lmafs.run.runFiles import RunFiles
from lmafs.run.runOutputs import Outputs, afTiles, kernelLines, parameterMagnitudes
from lmafs.run.flagChecks import ConfigError, checkFlags, parseAfInit, parseNumber, settle
from lmafs.run.runPlan import (activeModels, everyDue, learningRate, localActiveModels, lrFactor, modelLrFactors, modelPasses,
                     modelStartSteps, peakMemoryDue, plotDue, reportDue, runPasses, shapeVariants, tokensSeen,
                     validationDue)
from lmafs.run.runSetup import buildOptimizers, buildRunModel, compileBackend, loadData, pickDevice, seedEverything
from lmafs.run.runState import RunState
from lmafs.run.stopping import StopSignals, agreeAcrossProcesses, releaseGradients
from lmafs.data.tokenShards import ShardError
from lmafs.data.vocabulary import bitsPerByte


# ----------------------------------------------------------------------------------------------
# Hyperparameters (every field is a --flag of the same name)


def flag(default, help, choices=None, parse=None):
    """A hyperparameter and its CLI flag; parse: the flag's parser, when its type's own does not fit."""
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse})


@dataclass(frozen=True)
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
    parser = OneLineErrorParser(description=__doc__.splitlines()[0],
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
    args = buildParser().parse_args(argv)
    given = {f.name for f in dataclasses.fields(Hyperparameters)
             if any(x == f"--{f.name}" or x.startswith(f"--{f.name}=") for x in argv)}
    return Hyperparameters(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Hyperparameters)}), given



# ----------------------------------------------------------------------------------------------
# Training run


class Trainer:
    """One training run, built by setup() and run by train(): it computes and hands the results to its rooms, each
    built from explicit parts: RunFiles, RunState, Outputs, Passes, Checkpointer, StopSignals (runPlan: when)."""

    def __init__(self, hp, given=frozenset()):
        self.hp, self.given = hp, given
        self.dist = self.device = self.model = self.vocabSize = self.nLocal = self.modelsPerPass = None
        # set where the processes agreed to stop: each stops at that same point, and they leave together (main)
        self.stopsTogether = False

    # -- setup -------------------------------------------------------------------------------

    def setup(self):
        resume = checkpoints.loadResumeCheckpoint(self.hp.resumeFrom) if self.hp.resumeFrom else None
        self.settled = settle(self.hp, self.given, resume)
        self.hp = hp = self.settled.hp  # settled once: nothing assigns to it from here on
        self.files = RunFiles(hp.dirResults, hp.runName)
        self.alreadyComplete = self.settled.alreadyComplete  # also after a resume's checkpoint
        if self.alreadyComplete:
            return self
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
        self.processesSharingData = self.dist.worldSize if self.dataParallel else 1
        self.firstModel, self.stopModel = self.dist.modelRange(hp.nModels)
        self.nLocal = self.stopModel - self.firstModel
        seedEverything(hp.seed)
        data = loadData(hp, (self.firstModel, self.stopModel), self.dataParallel, resume)
        self.trFiles, self.vaFiles, self.vaSequences, self.vaBytes, self.streams = data.trFiles, data.vaFiles, \
            data.vaSequences, data.vaBytes, data.streams
        self.vocabulary, self.vocabSize = data.corpusVocabulary, data.vocabSize
        built = buildRunModel(hp, self.vocabSize, self.device, (self.firstModel, self.stopModel), resume)
        self.model, self.startValues, self.afNotes, self.afInputRange = built.model, built.startValues, \
            built.afNotes, built.afInputRange
        self.optimizer, self.afOptimizer = buildOptimizers(self.model, hp)
        self.startSteps = modelStartSteps(hp)
        self.state = RunState(self.nLocal, self.device)
        self.updating = False
        self.latestAfInputs = None
        self.checkpointer = checkpoints.Checkpointer(
            hp, self.files, self.model, self.optimizer, self.afOptimizer, self.streams, self.state, self.dist,
            self.dataParallel, (self.firstModel, self.stopModel), self.vocabSize, self.vocabulary, self.device)
        if resume:
            self.checkpointer.restore(resume)
        self.modelsPerPass, self.modelsPerPassNote = preflight.chooseModelsPerPass(hp, self.device, self.vocabSize,
                                                                                   self.nLocal)
        self.passes = Passes(self.model, hp, self.device, self.afInputRange)
        variants = self.shapeVariants()
        fallbackCheck = functools.partial(fallbackProblemHere, hp, self.vocabSize, self.nLocal, self.modelsPerPass,
                                          self.device)
        try:
            self.passes.compileBeforeStepOne(variants, self.dist, fallbackCheck)
        except Exception:
            self.stopsTogether = True  # what it raises, the processes agreed on
            raise
        return self

    def localActive(self, nActiveAll):
        return localActiveModels(nActiveAll, self.dataParallel, self.firstModel, self.stopModel)

    def shapeVariants(self):
        """The graphs to compile before step 1: passes of the models that train from this step on, validation, the
        AF-input statistics."""
        passes = runPasses(self.startSteps, self.state.step, self.localActive, self.modelsPerPass)
        nValidation = len(self.vaSequences) if self.vaSequences is not None and self.dist.isMain else 0
        return shapeVariants(passes, self.nLocal, nValidation, self.hp.seqLength,
                             self.hp.plottingLevel >= 1 and self.dist.isMain)

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

    def trainStep(self):
        """One optimizer step of the active models of this process; returns (nActive, losses, accuracies)."""
        hp, step = self.hp, self.state.step
        nActiveAll = activeModels(step, self.startSteps)
        nActive = self.localActive(nActiveAll)
        try:
            lossSum, accSum = self.forwardAndBackward(nActive)
        except torch.OutOfMemoryError as err:
            if self.dist.enabled:  # the other processes learn of it in their agreement below, and all stop
                self.agreeOnPasses(err)
            raise
        if self.dist.enabled:
            self.agreeOnPasses(None)
        afParams = [p for p in self.model.afParameters() if p.requires_grad]
        averageGradients(afParams, self.optimizer.params, nActive, nActiveAll, self.dist, self.dataParallel)
        if hp.afSmoothness > 0:
            # after the average over models: lambda * S in every model's loss gives lambda * dS/dv, on every process
            self.model.learnedSmoothness().mul(hp.afSmoothness).backward()
        if hp.gradientClipping > 0:
            clipGlobalNorm(self.optimizer.params, afParams, nActive, hp.gradientClipping, self.dist, self.dataParallel,
                           self.device)
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

    def forwardAndBackward(self, nActive):
        """The step's passes, their gradients accumulated; returns the losses and accuracies [nActive] summed over
        the accumulation steps."""
        hp = self.hp
        lossSum = torch.zeros(nActive, device=self.device)
        accSum = torch.zeros(nActive, device=self.device)
        for _ in range(hp.batchSize if nActive else 0):
            tokens = self.nextBatch(nActive)
            for first, n in modelPasses(nActive, self.modelsPerPass):  # each pass's activations are freed by its backward
                losses, accuracies = self.passes.forward(tokens[first:first + n], first)
                (losses.sum() / hp.batchSize).backward()
                lossSum[first:first + n] += losses.detach()
                accSum[first:first + n] += accuracies.detach()
        return lossSum, accSum

    def agreeOnPasses(self, outOfMemory):
        """Under torchrun, after the passes of a step, in which one process may run out of memory alone: every
        process learns of it before any gradient crosses processes, so that all stop with the weights of the last step
        (and save them, saveAfterOutOfMemory), or none."""
        stop, _ = stopping.agreeOnFailure(self.dist, outOfMemory, self.device)
        if stop:
            self.stopsTogether = True
            raise stop

    # -- the loop ----------------------------------------------------------------------------

    def train(self):
        hp, state = self.hp, self.state
        self.outputs = Outputs(hp, self.files, self.dist.isMain, state.step)
        self.outputs.header(self.headerLines())
        self.outputs.startProgress(state.step, shown=self.dist.isMain)
        signals = StopSignals(self.outputs.log, state)
        signals.install()
        pending = None  # (losses, step, AF values before that step): checked one step late to avoid a GPU sync
        try:
            while state.step < hp.nSteps:
                t0 = time.perf_counter()
                afBefore = [p.detach().clone() for p in self.model.afParameters()]
                nActive, losses, accs = self.trainStep()
                if pending is not None:
                    self.stopIfNotFinite(*pending[:2])
                pending = (losses, state.step, afBefore)
                agreedSignal = None
                if self.dist.enabled:
                    agreedSignal, failure = agreeAcrossProcesses(self.dist, losses, signals.received, self.firstModel,
                                                                 state.step)
                    if failure:
                        raise failure
                state.recordStep(nActive, losses, accs)
                # CUDA runs ahead of the CPU: the clock stops when this step's GPU work is done, so s/step, tokens/s
                # and MFU count every step's work once
                torch.get_device_module(self.device).synchronize(self.device)
                state.addTrainingTime(time.perf_counter() - t0)
                self.outputs.advance()
                self.reportsAndSaves(pending)
                # under torchrun only the signal all processes agreed on stops them: one that reached a process after
                # the agreement (while it plotted or saved, say) would take it alone into the collectives of saving
                stopSignal = agreedSignal if self.dist.enabled else signals.received
                if stopSignal is not None:
                    self.stopsTogether = True
                    self.outputs.endProgress()
                    self.saveOnInterrupt()
                    return 128 + stopSignal
        except stopping.NonFiniteLoss as err:
            self.stopsTogether = True  # under torchrun it comes from the agreement
            self.outputs.endProgress()
            err.afFile = self.saveLastGoodAfs(pending)
            raise
        except (torch.OutOfMemoryError, stopping.AnotherProcessFailed) as err:
            self.outputs.endProgress()
            err.checkpoint = self.saveAfterOutOfMemory()
            raise
        finally:
            signals.restore()
            self.outputs.close()
        return 0

    def stopIfNotFinite(self, losses, step):
        failure = stopping.nonFiniteLoss(losses, step, self.firstModel)
        if failure:
            raise failure

    def reportsAndSaves(self, pending):
        """What is due after this step, in the original's order (runPlan.py's predicates)."""
        hp, step, main = self.hp, self.state.step, self.dist.isMain
        if main and self.vaSequences is not None and validationDue(step, hp.nSteps, hp.valEvery):
            self.validateAndReport()  # after the update, as the original: Step 1 is one update in
        if self.tracksCudaMemory and peakMemoryDue(step, hp.nSteps):
            self.outputs.peakMemory(step, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        if reportDue(step, hp.nSteps, hp.plotEvery):
            self.stopIfNotFinite(*pending[:2])
            self.reportTraining()
        if main and everyDue(hp.saveAfEvery, step, hp.nSteps) and self.afOptimizer:
            self.saveAfs(step)
        if everyDue(hp.saveModelEvery, step, hp.nSteps):
            self.saveModel()
        if main and hp.plottingLevel >= 1 and plotDue(step, hp.nSteps, hp.plotEvery):
            self.refreshPlots(announce=step == hp.nSteps)

    def validateAndReport(self):
        hp, state = self.hp, self.state
        loss, accuracy = self.passes.validation(self.vaSequences)
        state.history["val"].append((state.step, loss, accuracy))
        bpb = bitsPerByte(loss, self.vaSequences[:, 1:].size, self.vaBytes) if self.vaBytes else None
        self.outputs.validationReport(state.step, loss, accuracy, bpb,
                                      learningRate(hp, 0, state.step - 1, self.startSteps), state.trainSeconds,
                                      self.tokensOf(0))

    def tokensOf(self, model):
        return tokensSeen(self.hp, model, self.state.step, self.startSteps, self.processesSharingData)

    def reportTraining(self):
        """Every model's training loss/accuracy since the last report (summed over the processes), the smoothness
        and the AF-input statistics."""
        hp, state = self.hp, self.state
        totals = torch.zeros(3, hp.nModels, device=self.device)
        for row, key in enumerate(("loss", "acc", "count")):
            totals[row, self.firstModel:self.stopModel] = state.window[key]
        self.dist.sumInPlace([totals])
        count = totals[2].clamp(min=1).cpu()
        loss, acc = (totals[0].cpu() / count).tolist(), (totals[1].cpu() / count).tolist()
        reported = (totals[2] > 0).tolist()
        self.outputs.trainingReport(state.step, loss, acc, reported, state.trainSeconds, state.secondsPerStep(),
                                    [learningRate(hp, m, state.step - 1, self.startSteps) for m in range(hp.nModels)],
                                    [self.tokensOf(m) for m in range(hp.nModels)])
        state.history["train"] += [(state.step, m, loss[m], acc[m]) for m in range(hp.nModels) if reported[m]]
        if hp.afSmoothness > 0:
            with torch.no_grad():
                self.outputs.smoothnessReport(state.step, float(self.model.learnedSmoothness()))
        state.resetWindow()
        if hp.plottingLevel >= 1 and self.dist.isMain:
            stats = self.passes.afInputStatistics(statisticsTokens(self.vaSequences, self.trFiles, hp, self.device))
            self.latestAfInputs = stats
            state.history["actMean"].append((state.step, stats["mean"]))
            state.history["actMax"].append((state.step, stats["max"]))
            self.outputs.afInputReport(state.step, stats, self.model.afSiteNames(), self.afInputRange)
            if hp.plottingLevel >= 3:
                self.outputs.parameterMagnitudes(state.step, parameterMagnitudes(self.model))

    # -- saving ------------------------------------------------------------------------------

    def saveModel(self):
        """pt-RUN-stepNNNN.pt (a collective under torchrun: every rank must call it); returns its path."""
        path = self.checkpointer.save()
        if self.dist.isMain:
            self.outputs.savedModel(path)
        return path

    def saveAfs(self, step):
        """ptAf-RUN-stepNNNN.pt/.csv of the AFs as they are, named after `step`; its .pt path (None without splines:
        other learned AFs are in the pt-RUN files)."""
        if splineKnots(self.model) is None and scoreSplineKnots(self.model) is None:
            return None
        ptPath, csvPath = saveAfFiles(self.files.afStem(step), self.model, dataclasses.asdict(self.hp), step)
        self.outputs.savedAfs(ptPath, csvPath)
        return ptPath

    def refreshPlots(self, announce=False):
        tiles = afTiles(self.model, self.startValues, self.latestAfInputs, self.afInputRange, self.state.step)
        self.outputs.plots(self.state.step, self.state.history, tiles, self.model.afSiteNames(), announce)

    def saveOnInterrupt(self):
        path = self.saveModel()
        if not self.dist.isMain:
            return
        if self.afOptimizer:
            self.saveAfs(self.state.step)
        if self.hp.plottingLevel >= 1:
            self.refreshPlots(announce=True)
        self.outputs.stopped(self.state.step, path)

    def saveLastGoodAfs(self, pending):
        """The AF values as they were before the step whose loss was not finite, named after that step; returns
        the .pt path, or None when nothing was saved."""
        if not self.afOptimizer or pending is None or not self.dist.isMain:
            return None
        _, failedStep, afBefore = pending
        with torch.no_grad():
            for p, good in zip(self.model.afParameters(), afBefore):
                p.copy_(good)
        return self.saveAfs(failedStep)

    def saveAfterOutOfMemory(self):
        """After an out-of-memory error in a forward or backward pass (under torchrun: of any process; the others
        have AnotherProcessFailed) the weights are those after the last step: save them, so that the run resumes with
        a smaller --modelsPerPass. Returns the checkpoint's path, or None when the error came during the update
        (half-updated weights are not worth keeping) or, under torchrun, outside the passes in one process: saving is
        a collective, which that process would wait in alone."""
        if self.updating or self.dist.enabled and not self.stopsTogether:
            return None
        releaseGradients(self.model, self.device)
        path = self.saveModel()
        if self.dist.isMain and self.afOptimizer:
            self.saveAfs(self.state.step)
        return path

    def outOfMemoryAdvice(self):
        return stopping.outOfMemoryAdvice(self.hp, self.device, self.vocabSize, self.nLocal, self.modelsPerPass,
                                          self.model)

    def headerLines(self):
        passes = self.passes
        kernel = kernelLines(self.model, self.device, self.hp, passes.attentionNotes, passes.compiledVariants)
        return runOutputs.headerLines(
            self.settled, self.device, self.trFiles, self.vaFiles,
            len(self.vaSequences) if self.vaSequences is not None else 0, self.vaBytes, self.vocabulary, self.vocabSize,
            self.model,
            self.optimizer, self.afOptimizer, self.afNotes, kernel, self.startSteps, self.modelsPerPass,
            self.modelsPerPassNote)


# ----------------------------------------------------------------------------------------------
# Entry point


def main(argv=None):
    hp, given = parseArgs(argv)
    if hp.preflight:
        try:
            hp, forced = checkFlags(hp)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return preflight.runPreflight(hp, forced)
    trainer = Trainer(hp, given)
    try:
        return trainAndSayHowItEnded(trainer)
    finally:
        if trainer.dist is not None:  # after the last line: processes that stop together wait there for each other
            trainer.dist.close(together=trainer.stopsTogether)


def trainAndSayHowItEnded(trainer):
    """The run's exit status, its error in one line on stderr first."""
    hp = trainer.hp
    try:
        trainer.setup()
        if trainer.alreadyComplete:
            print(f"Run '{hp.runName}' already complete ({trainer.files.log} holds its final step); nothing to do.")
            return 0
        return trainer.train()
    except (ConfigError, ShardError, AfFileError, trackers.TrackerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except stopping.NonFiniteLoss as err:
        saved = f"; AF values before that step saved in {err.afFile}" if err.afFile else ""
        print(f"error: {err}{saved}", file=sys.stderr)
        return 3
    except stopping.AnotherProcessFailed as err:
        saved = f"; resume from {err.checkpoint} with --resumeFrom" if err.checkpoint else ""
        print(f"error: {err}{saved}", file=sys.stderr)
        return err.status
    except torch.OutOfMemoryError as err:
        # the advice measures free memory after this block: its live traceback holds the failed pass's frames and,
        # in them, its activations
        checkpoint = getattr(err, "checkpoint", None)
    except KeyboardInterrupt:
        print("error: interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    saved = f"; resume from {checkpoint} with --resumeFrom" if checkpoint else ""
    print(f"error: {trainer.outOfMemoryAdvice()}{saved}", file=sys.stderr)
    return 4


if __name__ == "__main__":
    sys.exit(main())
