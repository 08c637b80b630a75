"""The run's outputs: the log file and its header, the original's report lines in their order and when they are
due, the AF-input statistics, the metrics CSV, the ptAf files' saving lines and the plots; every line and row also
goes to the tracker (trackers.py). The functions take the Trainer of trainLmAf.py; what they keep between reports
(log, metrics file, tracker, history, the report window) lives on it, where a checkpoint finds it."""
import csv
import dataclasses
import datetime
import fcntl
import os
import platform
import re
import subprocess
import sys

import numpy as np
import torch

import checkpoints
import forwardPasses
import trackers
from activationFunctions import MLP_INPUT_TYPES, Spline, evaluateOnGrid, isLearnable, splineBackends
from afFiles import atomicWrite, saveAfFiles, scoreSplineKnots, splineKnots
from attention import FLEX_MASK_BLOCK
from runPlan import ConfigError, compileBackend, modelLrFactors, splitAfType, splitScoreType
from tokenShards import readShardHeader

PLOT_LABELS = {"tr": "loss/acc", "af": "AF", "act": "act"}  # in the original's 'Saving plot (...)' lines


# ----------------------------------------------------------------------------------------------
# Log file (terminal + file, with a lock so two processes cannot write one log)

SEPARATOR = "=" * 100  # between the original's header parts, and before the first Step line
# The original's hyperparameters in the order its log prints them; ours that it lacks follow in field order (its
# filesTokensTe, never read, is not a flag here).
ORIGINAL_FLAG_ORDER = (
    "runName", "seed", "plotMinAcc", "plotMaxAcc", "plotMinLoss", "plotMaxLoss", "shuffleTrData", "tokenDocSep",
    "dtype", "flexBlockSize", "nLayers", "nHeads", "dimEmb", "tieEmbeddings", "afType", "afLayerSpecific", "afRange",
    "afNAnchors", "afLr", "afInit", "afFileToLoad", "dirResults", "filesTokensTr", "filesTokensVa", "lr",
    "freezeEmbeddings", "batchSize", "seqLength", "nSteps", "nStepsWarmup", "nStepsCooldown", "wtDecay", "nModels",
    "staggeredStarts", "sameDataAcrossModels", "sameInitAcrossModels", "adamB1", "adamB2", "afAdamB1", "afAdamB2",
    "gradientClipping", "contextSize", "lrSchedule", "nTokensVa", "valEvery", "saveModelEvery", "saveAfEvery",
    "plotEvery", "plottingLevel")


def originalValueText(name, value):
    """A hyperparameter's value as the original prints it: strings in double quotes, afType as its list of parts
    (MLP, attention; our score part, when given, third), dtype as the torch dtype."""
    if name == "afType":
        mlp, att = splitAfType(value)
        score = splitScoreType(value)[1]
        return str([mlp, att] + ([f"score-{score}"] if score != "softmax" else []))
    if name == "dtype":
        return f"torch.{value}"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def hyperparameterLines(hp, printedAs=None):
    """The 'Hyperparameters:' block of the log: the original's flags in its order and form, then ours; printedAs:
    values shown instead of hp's (those the original prints before forcing them)."""
    values = {**dataclasses.asdict(hp), **(printedAs or {})}
    names = [f.name for f in dataclasses.fields(hp)]
    ordered = [n for n in ORIGINAL_FLAG_ORDER if n in names] + [n for n in names if n not in ORIGINAL_FLAG_ORDER]
    return ["Hyperparameters:"] + [f"  {n} = {originalValueText(n, values[n])}" for n in ordered]


class RunLog:
    """Lines to the terminal and the log file; RunLog(None) (a non-main torchrun process) writes nothing."""

    def __init__(self, path):
        self.path = path
        self.progressBar = None
        self.file = open(path, "a") if path else None
        if path is None:
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ConfigError(f"another process is writing {path}; wait for it or choose another --runName") from None

    def __call__(self, line="", terminal=True):
        if self.file is None:
            return
        self.file.write(line + "\n")
        self.file.flush()
        if terminal:
            if self.progressBar is not None:
                self.progressBar.write(line)
            else:
                print(line, flush=True)

    def close(self):
        if self.file is not None:
            self.file.close()


class MetricsFile:
    """metrics-RUN.csv: one row per report (step, model, split, loss, accuracy, lr, trainSeconds, tokens), for
    pandas rather than parsing logs. A resumed run first drops the rows after its checkpoint's step (they are
    trained again), then appends; MetricsFile(None) (a non-main torchrun process) writes nothing."""

    COLUMNS = ("step", "model", "split", "loss", "accuracy", "lr", "trainSeconds", "tokens")

    def __init__(self, path, resumeStep, tracker=None):
        self.file, self.tracker = None, tracker or trackers.NoTracker()  # every row also goes to the tracker
        if path is None:
            return
        kept = []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resumeStep]
        atomicWrite(path, lambda tmp: self.writeRows(tmp, kept))
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file, lineterminator="\n")

    def writeRows(self, path, rows):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step, model, split, loss, accuracy, lr, trainSeconds, tokens):
        if self.file is not None:
            self.writer.writerow([step, model, split, f"{loss:.6f}", f"{accuracy:.6f}", f"{lr:.6g}",
                                  f"{trainSeconds:.3f}", tokens])
            self.file.flush()
        self.tracker.write(step, model, split, loss, accuracy, lr, trainSeconds, tokens)

    def close(self):
        if self.file is not None:
            self.file.close()
        self.tracker.close()


def finalLineWritten(logPath, nSteps):
    if not os.path.isfile(logPath):
        return False
    prefix = f"Step {nSteps}/{nSteps} "
    with open(logPath, errors="replace") as f:
        return any(line.startswith(prefix) for line in f)


# ----------------------------------------------------------------------------------------------
# The header


def libraryInfo(device):
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
             f"platform {platform.platform()}"]
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); float32 matmuls in "
                     f"TF32 (precision {torch.get_float32_matmul_precision()!r}), as the original")
    else:
        lines.append(f"device: CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        if commit:
            lines.append(f"git commit {commit}")
    except (OSError, subprocess.SubprocessError):
        pass
    return lines


def parameterReport(model, nModels):
    """Lines with per-tensor and total parameter counts, per model (stacked tensors divided by nModels)."""
    lines, trainable, frozen = [], 0, 0
    afIds = {id(p) for p in model.afParameters()}
    for name, p in model.named_parameters():
        perModel = p.numel() if id(p) in afIds else p.numel() // nModels
        shape = tuple(p.shape) if id(p) in afIds else tuple(p.shape[1:])
        state = "trainable" if p.requires_grad else "frozen"
        lines.append(f"  {name:40s} {str(shape):20s} {perModel:>12,} {state}{' (AF, shared)' if id(p) in afIds else ''}")
        if p.requires_grad:
            trainable += perModel
        else:
            frozen += perModel
    return lines, trainable, frozen


def printHeader(trainer):
    hp, log = trainer.hp, trainer.log
    for line in hyperparameterLines(hp, trainer.printedAs):
        log(line)
    log(SEPARATOR)
    log(f"==== trainLmAf.py  {datetime.datetime.now():%Y-%m-%d %H:%M:%S}  run '{hp.runName}'")
    log("command: " + " ".join(sys.argv))
    for note in trainer.forced:
        log(f"Forced: {note}")
    for line in libraryInfo(trainer.device):
        log(line)
    nTr = sum(readShardHeader(p) for p in trainer.trFiles)
    log(f"Training data: {len(trainer.trFiles)} files, {nTr:,} tokens ({hp.filesTokensTr})")
    if trainer.vaFiles:
        nVa = trainer.vaSequences.shape[0] * hp.seqLength
        log(f"Validation data: {len(trainer.vaFiles)} files, {nVa:,} tokens used per evaluation "
            f"({trainer.vaSequences.shape[0]} sequences; {hp.filesTokensVa})")
    else:
        log("Validation data: none (--filesTokensVa is empty)")
    if trainer.vocabulary:
        log(f"Tokenizer: {trainer.vocabulary.name} ({trainer.vocabulary.origin}), <|endoftext|> = "
            f"{trainer.vocabulary.eotId}")
        log(f"Vocabulary size: {trainer.vocabSize:,} (the tokenizer's {trainer.vocabulary.size:,} ids, rounded up to a "
            "multiple of 128)")
    else:
        log(f"Vocabulary size: {trainer.vocabSize:,} (max token id + 1, rounded up to a multiple of 128)")
    tokensPerModel = hp.nSteps * hp.batchSize * hp.seqLength
    log(f"Projected training tokens per model: {tokensPerModel:,} = {tokensPerModel / max(1, nTr):.2f} epochs")
    lines, trainable, frozen = parameterReport(trainer.model, hp.nModels)
    log("Parameters per model (AF parameters are shared by all models):")
    for line in lines:
        log(line, terminal=hp.plottingLevel >= 3)
    log(f"Parameters per model: {trainable:,} trainable, {frozen:,} frozen, {trainable + frozen:,} total")
    log(f"Tokens per parameter: {tokensPerModel / max(1, trainable + frozen):.2f}")
    log(f"Optimizer (weights): {trainer.optimizer.describe()}, lr={hp.lr}, schedule {hp.lrSchedule}")
    if trainer.afOptimizer:
        log(f"Optimizer (AFs): {type(trainer.afOptimizer).__name__} lr={abs(hp.afLr)}"
            + (f" betas=({hp.afAdamB1}, {hp.afAdamB2})" if hp.afLr > 0 else "")
            + f", {sum(p.numel() for p in trainer.model.afParameters()):,} AF parameters")
    else:
        log("Optimizer (AFs): none (AFs fixed or frozen)")
    for note in trainer.afNotes:
        log(note)
    for line in kernelLines(trainer):
        log(line)
    if hp.nModels > 1:
        log(f"Phase I: {hp.nModels} models, start steps {trainer.startSteps}; {trainer.modelsPerPass} models per pass "
            f"({trainer.modelsPerPassNote})")
    log(SEPARATOR)


def kernelLines(trainer):
    """What runs the attention and what compiled, for the header."""
    kernel, hp = trainer.model.kernel, trainer.hp
    lines = list(trainer.attentionNotes)
    splines = [af for af in list(trainer.model.mlpAfs) + list(trainer.model.attAfs) if isinstance(af, Spline)]
    if splines:
        backends = splineBackends(trainer.device, splines[0].nKnots, perChannel=splines[0].channels is not None,
                                  dtype=torch.bfloat16 if hp.dtype == "bfloat16" else torch.float32)
        lines.append(f"Spline kernels: forward {backends['forward']}, backward {backends['backward']}")
    if kernel.implementation == "flex":
        options = kernel.kernelOptions.get(torch.bfloat16 if hp.dtype == "bfloat16" else torch.float32)
        lines.append(f"Attention: FlexAttention, mask block {FLEX_MASK_BLOCK}, kernel options {options}")
    else:
        lines.append("Attention: SDPA with the dense causal + document + window mask")
    if kernel.score != "softmax":
        lines.append(f"Attention weights: {kernel.describeScore()}")
    if trainer.compiledVariants:
        lines.append(f"Compiled before step 1 ({compileBackend(hp, trainer.device)}): " + ", ".join(
            f"{kind} {n} model(s) from {first}" + (f" x {batch} sequences" if batch > 1 else "")
            for kind, first, n, batch in trainer.compiledVariants))
    return lines


def openOutputs(trainer):
    """Open the log (it says first when the run resumes), the tracker and the metrics file; print the header."""
    hp = trainer.hp
    if trainer.dist.isMain:
        os.makedirs(hp.dirResults, exist_ok=True)
    trainer.log = RunLog(trainer.logPath if trainer.dist.isMain else None)
    trainer.tracker = trackers.openTracker(hp, trainer.step) if trainer.dist.isMain else trackers.NoTracker()
    trainer.metrics = MetricsFile(trainer.metricsPath if trainer.dist.isMain else None, trainer.step, trainer.tracker)
    if trainer.step:
        trainer.log(f"==== resuming from {hp.resumeFrom} at step {trainer.step}")
    printHeader(trainer)


def closeOutputs(trainer):
    trainer.log.close()
    trainer.metrics.close()


# ----------------------------------------------------------------------------------------------
# The report lines, in the original's order, and when they are due


def reportTraining(trainer, bar):
    """Print model 0's training loss/accuracy since the last report (and every model's to the log), then the
    activation magnitudes; the s/step figure counts training time only."""
    hp, window = trainer.hp, trainer.window
    totals = torch.zeros(3, hp.nModels, device=trainer.device)
    for row, key in enumerate(("loss", "acc", "count")):
        totals[row, trainer.firstModel:trainer.stopModel] = window[key]
    trainer.dist.sumInPlace([totals])
    count = totals[2].clamp(min=1).cpu()
    loss, acc = (totals[0].cpu() / count).tolist(), (totals[1].cpu() / count).tolist()
    trainer.log(f"Step {trainer.step}/{hp.nSteps}   lossTr {loss[0]:.4f}   accTr {100 * acc[0]:.1f}   "
             f"{trainer.trainSeconds:.0f}s = {window['seconds'] / max(1, window['steps']):.2f}s/step")
    for m in range(hp.nModels):
        if totals[2, m] > 0:
            trainer.history["train"].append((trainer.step, m, loss[m], acc[m]))
            trainer.metrics.write(trainer.step, m, "train", loss[m], acc[m], learningRate(trainer, m, trainer.step - 1),
                               trainer.trainSeconds, tokensSeen(trainer, m, trainer.step))
            if m > 0:
                trainer.log(f"Step {trainer.step}/{hp.nSteps}   model {m}   lossTr {loss[m]:.4f}   accTr {100 * acc[m]:.1f}",
                         terminal=False)
    if hp.afSmoothness > 0:
        with torch.no_grad():
            roughness = float(trainer.smoothness())
        trainer.log(f"Step {trainer.step}/{hp.nSteps}   AF smoothness S {roughness:.4f}   penalty "
                 f"afSmoothness*S {hp.afSmoothness * roughness:.4f}")
        trainer.tracker.scalars(trainer.step, {"afSmoothness/S": roughness,
                                         "afSmoothness/penalty": hp.afSmoothness * roughness})
    bar.set_postfix(lossTr=f"{loss[0]:.3f}")
    trainer.window = trainer.newWindow()
    if hp.plottingLevel >= 1 and trainer.dist.isMain:
        reportAfInputs(trainer)


def reportAfInputs(trainer):
    """Activation magnitudes (the original's lines, plottingLevel >= 2) and the share of AF inputs outside the
    knot range, with a warning when a site passes 1%; the histograms go to the AF plot."""
    hp, prefix = trainer.hp, f"Step {trainer.step}/{trainer.hp.nSteps}   "
    stats = forwardPasses.afInputStatistics(trainer)
    trainer.latestAfInputs = stats
    trainer.history["actMean"].append((trainer.step, stats["mean"]))
    trainer.history["actMax"].append((trainer.step, stats["max"]))
    if hp.plottingLevel >= 2:
        trainer.log(prefix + "Activation magnitudes (2): " + " ".join(f"{v:.2f}" for v in stats["mean"]))
        trainer.log(prefix + "Activation magnitudes (3): " + " ".join(f"{v:.2f}" for v in stats["max"]))
    trainer.log(prefix + "AF inputs out of range: " + " ".join(f"{100 * v:.2f}%" for v in stats["outside"]))
    names = trainer.model.afSiteNames()
    trainer.tracker.scalars(trainer.step, {f"afInputsOutOfRange/{name}": share
                                     for name, share in zip(names, stats["outside"])})
    over = [(name, share) for name, share in zip(names, stats["outside"]) if share > 0.01]
    if {name for name, _ in over} != trainer.sitesOutOfRange:  # once, and again when the sites change
        trainer.sitesOutOfRange = {name for name, _ in over}
        if over:
            trainer.log(prefix + f"Warning: more than 1% of the AF inputs lie outside [-{trainer.afInputRange:g}, "
                     f"{trainer.afInputRange:g}] at " + ", ".join(f"{name} ({100 * share:.1f}%)" for name, share in over)
                     + "; a spline is constant there: consider a larger --afRange")
    if hp.plottingLevel >= 3:
        logParameterMagnitudes(trainer)


def logParameterMagnitudes(trainer):
    for name, p in trainer.model.named_parameters():
        trainer.log(f"Step {trainer.step}/{trainer.hp.nSteps}   |{name}| mean {p.detach()[0].float().abs().mean():.4f}",
                 terminal=False)


def logValidation(trainer, step):
    lossVa, accVa = forwardPasses.validate(trainer)
    trainer.history["val"].append((step, lossVa, accVa))
    trainer.metrics.write(step, 0, "val", lossVa, accVa, learningRate(trainer, 0, step - 1), trainer.trainSeconds,
                       tokensSeen(trainer, 0, step))
    trainer.log(f"Step {step}/{trainer.hp.nSteps}   lossVa {lossVa:.4f}   accVa {100 * accVa:.1f}")


def logPeakMemory(trainer):
    """The peak CUDA memory since the last such line, in GiB, as the original prints it."""
    trainer.log(f"Step {trainer.step}/{trainer.hp.nSteps}   Peak CUDA memory usage: "
             f"{torch.cuda.max_memory_allocated(trainer.device) / 2**30:.3f} GB")
    torch.cuda.reset_peak_memory_stats(trainer.device)


def learningRate(trainer, model, stepIndex):
    return trainer.hp.lr * modelLrFactors(trainer.hp, stepIndex, trainer.startSteps)[model]


def tokensSeen(trainer, model, stepsDone):
    """Training tokens model has seen after stepsDone steps of the run (all processes' under data parallelism)."""
    perStep = trainer.hp.batchSize * trainer.hp.seqLength * (trainer.dist.worldSize if trainer.dataParallel else 1)
    return max(0, stepsDone - trainer.startSteps[model]) * perStep


def isReportStep(trainer, step):
    """Training lines at steps 1 and 6, every plotEvery steps and at the last step, as the original."""
    return step in (1, 6, trainer.hp.nSteps) or (step - 1) % trainer.hp.plotEvery == 0


def validationDue(trainer, step):
    """Whether the model after `step` updates is validated: after the first, every valEvery-th (1, 1 + valEvery,
    ...) and the last (valEvery 0: the last only)."""
    hp = trainer.hp
    if not trainer.dist.isMain or trainer.vaSequences is None or hp.valEvery < 0:
        return False
    return step == hp.nSteps or (hp.valEvery > 0 and (step - 1) % hp.valEvery == 0)


def isDue(trainer, every, step):
    """Whether an every-N output is due after `step` steps are complete (0: only at the end)."""
    if every < 0:
        return False
    return step == trainer.hp.nSteps or (every > 0 and step % every == 0)


def periodicOutputs(trainer):
    hp, step = trainer.hp, trainer.step
    main = trainer.dist.isMain
    if main and isDue(trainer, hp.saveAfEvery, step) and trainer.afOptimizer:
        saveAfs(trainer)
    if isDue(trainer, hp.saveModelEvery, step):
        saveModel(trainer)
    if main and hp.plottingLevel >= 1 and (step == hp.nSteps or (step - 1) % hp.plotEvery == 0):
        refreshPlots(trainer, announce=step == hp.nSteps)


# ----------------------------------------------------------------------------------------------
# Saving lines (the files themselves: checkpoints.py, afFiles.py)


def saveModel(trainer):
    """Write the model checkpoint pt-RUN-stepNNNN.pt (a collective under torchrun: every rank must call it) and say
    so; returns its path."""
    path = checkpoints.saveCheckpoint(trainer)
    if trainer.dist.isMain:
        trainer.log(f"Saving model: {path}")
    return path


def saveAfs(trainer):
    """Write ptAf-RUN-stepNNNN.pt/.csv; (None, None) without splines (other learned AFs are in pt-RUN files)."""
    if splineKnots(trainer.model) is None and scoreSplineKnots(trainer.model) is None:
        return None, None
    stem = os.path.join(trainer.hp.dirResults, f"ptAf-{trainer.hp.runName}-step{trainer.step:04d}")
    ptPath, csvPath = saveAfFiles(stem, trainer.model, dataclasses.asdict(trainer.hp), trainer.step)
    trainer.log(f"Saving AF: {ptPath}")
    trainer.log(f"Saving AF (CSV): {csvPath}")
    return ptPath, csvPath


# ----------------------------------------------------------------------------------------------
# Plots (drawn by plotting.py)


def refreshPlots(trainer, announce=False):
    """Redraw the plots; announce: print their paths, as the original does for the last ones."""
    import plotting
    hp, stepTag = trainer.hp, f"step{trainer.step:06d}"
    made = []
    if hp.plottingLevel >= 1:
        lastVal = trainer.history["val"][-1] if trainer.history["val"] else None
        suffix = f"-lossVa{lastVal[1]:.4f}" if lastVal else ""
        made.append(("tr", f"tr-{hp.runName}-{stepTag}{suffix}.png"))
        plotting.plotTraining(os.path.join(hp.dirResults, made[-1][1]), trainer.history, hp.plotMinLoss,
                              hp.plotMaxLoss, hp.plotMinAcc, hp.plotMaxAcc, title=hp.runName)
        afs = afTiles(trainer)
        if afs:
            made.append(("af", f"af-{hp.runName}-{stepTag}.png"))
            plotting.plotAfs(os.path.join(hp.dirResults, made[-1][1]), afs, title=hp.runName,
                             zoom=hp.plotAfZoom)
    if hp.plottingLevel >= 2 and trainer.history["actMean"]:
        made.append(("act", f"act-{hp.runName}-{stepTag}.png"))
        plotting.plotActivations(os.path.join(hp.dirResults, made[-1][1]), trainer.history, trainer.model.afSiteNames())
    trainer.tracker.images(trainer.step, [(kind, os.path.join(hp.dirResults, name)) for kind, name in made])
    removeOlderPlots(trainer, {name for _, name in made}, {kind for kind, _ in made})
    for kind, name in made if announce else []:
        trainer.log(f"Saving plot ({PLOT_LABELS[kind]}): {os.path.join(hp.dirResults, name)}")
    if hp.plotShow:
        plotting.showFiles([os.path.join(hp.dirResults, name) for _, name in made])


def removeOlderPlots(trainer, keep, kinds):
    """One current file per figure: older refreshes of this run's figures are removed."""
    pattern = re.compile(rf"^({'|'.join(kinds)})-{re.escape(trainer.hp.runName)}-step\d{{6}}.*\.png$")
    for name in os.listdir(trainer.hp.dirResults):
        if pattern.match(name) and name not in keep:
            os.remove(os.path.join(trainer.hp.dirResults, name))


def afTiles(trainer):
    tiles = []
    for kind, afName, modules, index in (("MLP", trainer.model.afMlpName, trainer.model.mlpAfs, trainer.model.mlpAfIndex),
                                         ("att", trainer.model.afAttName, trainer.model.attAfs, trainer.model.attAfIndex),
                                         ("score", trainer.model.afScoreName, trainer.model.scoreAfs,
                                          trainer.model.scoreAfIndex)):
        for m, module in enumerate(modules):
            isSpline = hasattr(module, "knots")
            # Fixed AFs have nothing learned to show; moa's curve differs from token to token.
            if not isSpline and (not isLearnable(module) or afName in MLP_INPUT_TYPES):
                continue
            layers = [i for i, j in enumerate(index) if j == m]
            where = "all layers" if len(layers) == len(index) and len(index) > 1 else \
                "layer " + ",".join(map(str, layers)) if len(layers) <= 2 else f"layers {layers[0]}-{layers[-1]}"
            if isSpline:
                values, start = module.values.detach().float().cpu().numpy(), trainer.startValues.get(id(module))
                tiles.append({"name": f"{kind} ({where})", "knots": module.knots.cpu().numpy(), "values": values,
                              "start": None if start is None or np.array_equal(start, values) else start})
            else:  # sampled on a grid: plotted as a curve, without knot dots or constant extrapolation
                xs, ys = evaluateOnGrid(module)
                tiles.append({"name": f"{kind} {afName} ({where})", "knots": xs.cpu().numpy(),
                              "values": ys.float().cpu().numpy(), "curve": True})
            if kind == "score":  # not an AF-input site (GPT.afSiteNames)
                tiles[-1]["inputsNote"] = f"attention scores, all within ±{module.knotRange:.3g}"
            else:
                tiles[-1]["inputs"] = tileInputs(trainer, [f"{kind} {layer}" for layer in layers])
    return tiles


def tileInputs(trainer, sites):
    """The histogram of the AF inputs of these sites at the last report, for the plot under their AF's tile."""
    stats = trainer.latestAfInputs
    if stats is None:
        return None
    rows = [trainer.model.afSiteNames().index(site) for site in sites]
    counts = [stats["counts"][r] for r in rows]
    outside = sum(stats["outside"][r] * c for r, c in zip(rows, counts)) / max(1.0, sum(counts))
    return {"edges": stats["edges"], "histogram": stats["histograms"][rows].sum(0), "outside": outside,
            "range": trainer.afInputRange, "step": trainer.step}
