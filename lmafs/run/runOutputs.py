"""The run's outputs: the log file and its header, the original's report lines, the metrics CSV, the saving lines,
the progress bar and the plots (drawn by plotting.py); every row also goes to the tracker (trackers.py). Outputs
writes the numbers the Trainer of trainLmAf.py computed and hands it; when they are due is runPlan.py's."""
import csv
import dataclasses
import datetime
import fcntl
import os
import platform
import subprocess
import sys

import numpy as np
import torch

from lmafs.run import logLines
from lmafs.run import trackers
from activationFunctions import MLP_INPUT_TYPES, Spline, evaluateOnGrid, isLearnable, splineBackends
from lmafs.atomicFiles import atomicWrite
from lmafs.network.attention import FLEX_MASK_BLOCK
from lmafs.run.flagChecks import ConfigError, splitAfType, splitScoreType
from lmafs.run.runSetup import compileBackend
from lmafs.data.tokenShards import readShardHeader
from lmafs.data.vocabulary import GPT2_NAME

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


def hyperparameterLines(hp, asGiven=None):
    """The 'Hyperparameters:' block of the log: the original's flags in its order and form, then ours; asGiven: the
    hyperparameters before their forced values, of which the original prints afLayerSpecific (its GELU baseline log:
    1, with afLr 0)."""
    values = {**dataclasses.asdict(hp), **({"afLayerSpecific": asGiven.afLayerSpecific} if asGiven else {})}
    names = [f.name for f in dataclasses.fields(hp)]
    ordered = [n for n in ORIGINAL_FLAG_ORDER if n in names] + [n for n in names if n not in ORIGINAL_FLAG_ORDER]
    return ["Hyperparameters:"] + [logLines.HYPERPARAMETER.format(name=n, value=originalValueText(n, values[n]))
                                   for n in ordered]


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
    """metrics-RUN.csv: one row per report (step, model, split, loss, accuracy, lr, trainSeconds, tokens, and bpb:
    validation bits per byte, empty in training rows), for pandas rather than parsing logs. A resumed run first drops the rows after its checkpoint's step (they are
    trained again), then appends; MetricsFile(None) (a non-main torchrun process) writes nothing."""

    COLUMNS = ("step", "model", "split", "loss", "accuracy", "lr", "trainSeconds", "tokens", "bpb")

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

    def write(self, step, model, split, loss, accuracy, lr, trainSeconds, tokens, bpb=None):
        if self.file is not None:
            self.writer.writerow([step, model, split, f"{loss:.6f}", f"{accuracy:.6f}", f"{lr:.6g}",
                                  f"{trainSeconds:.3f}", tokens, "" if bpb is None else f"{bpb:.6f}"])
            self.file.flush()
        self.tracker.write(step, model, split, loss, accuracy, lr, trainSeconds, tokens)

    def close(self):
        if self.file is not None:
            self.file.close()
        self.tracker.close()


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
        lines.append(logLines.PARAMETER.format(name=name, shape=str(shape), count=perModel, state=state,
                                               shared=" (AF, shared)" if id(p) in afIds else ""))
        if p.requires_grad:
            trainable += perModel
        else:
            frozen += perModel
    return lines, trainable, frozen


def headerLines(settled, device, trFiles, vaFiles, nValidationSequences, vaBytes, vocabulary, vocabSize, model,
                optimizer, afOptimizer, afNotes, kernelLines, startSteps, modelsPerPass, modelsPerPassNote):
    """The log's header, from the hyperparameters' block on (settled: flagChecks.settle's), as (line, shown on the
    terminal too)."""
    hp, forced = settled.hp, settled.forced
    lines = [(line, True) for line in hyperparameterLines(hp, settled.asGiven)]
    lines += [(SEPARATOR, True), (f"==== trainLmAf.py  {datetime.datetime.now():%Y-%m-%d %H:%M:%S}  run '{hp.runName}'",
                                  True), ("command: " + " ".join(sys.argv), True)]
    lines += [(f"Forced: {note}", True) for note in forced]
    lines += [(line, True) for line in libraryInfo(device)]
    nTr = sum(readShardHeader(p) for p in trFiles)
    text = [f"Training data: {len(trFiles)} files, {nTr:,} tokens ({hp.filesTokensTr})"]
    if vaFiles:
        text.append(f"Validation data: {len(vaFiles)} files, {nValidationSequences * hp.seqLength:,} tokens used per "
                    f"evaluation ({nValidationSequences} sequences; {hp.filesTokensVa})")
        text.append(f"Validation bytes: {vaBytes:,} UTF-8 bytes of text in the {nValidationSequences * hp.seqLength:,} "
                    f"predicted tokens ({vocabulary.name if vocabulary else GPT2_NAME}; <|endoftext|> 0 bytes): "
                    "bpbVa = lossVa x tokens / (bytes x ln 2)")
    else:
        text.append("Validation data: none (--filesTokensVa is empty)")
    if vocabulary:
        text.append(f"Tokenizer: {vocabulary.name} ({vocabulary.origin}), <|endoftext|> = {vocabulary.eotId}")
        text.append(logLines.VOCABULARY.format(size=vocabSize, source=f"the tokenizer's {vocabulary.size:,} ids, "
                                                                       "rounded up to a multiple of 128"))
    else:
        text.append(logLines.VOCABULARY.format(size=vocabSize, source="max token id + 1, rounded up to a multiple "
                                                                      "of 128"))
    tokensPerModel = hp.nSteps * hp.batchSize * hp.seqLength
    text.append(f"Projected training tokens per model: {tokensPerModel:,} = {tokensPerModel / max(1, nTr):.2f} epochs")
    text.append("Parameters per model (AF parameters are shared by all models):")
    lines += [(line, True) for line in text]
    parameterLines, trainable, frozen = parameterReport(model, hp.nModels)
    lines += [(line, hp.plottingLevel >= 3) for line in parameterLines]
    text = [logLines.PARAMETER_TOTALS.format(trainable=trainable, frozen=frozen, total=trainable + frozen),
            f"Tokens per parameter: {tokensPerModel / max(1, trainable + frozen):.2f}",
            f"Optimizer (weights): {optimizer.describe()}, lr={hp.lr}, schedule {hp.lrSchedule}"]
    if afOptimizer:
        text.append(f"Optimizer (AFs): {type(afOptimizer).__name__} lr={abs(hp.afLr)}"
                    + (f" betas=({hp.afAdamB1}, {hp.afAdamB2})" if hp.afLr > 0 else "")
                    + f", {sum(p.numel() for p in model.afParameters()):,} AF parameters")
    else:
        text.append("Optimizer (AFs): none (AFs fixed or frozen)")
    text += afNotes + kernelLines
    if hp.nModels > 1:
        text.append(logLines.MODELS_PER_PASS.format(nModels=hp.nModels, starts=startSteps, modelsPerPass=modelsPerPass,
                                                    why=modelsPerPassNote))
    text.append(SEPARATOR)
    return lines + [(line, True) for line in text]


def kernelLines(model, device, hp, attentionNotes, compiledVariants):
    """What runs the attention and what compiled, for the header."""
    kernel = model.kernel
    lines = list(attentionNotes)
    splines = [af for af in list(model.mlpAfs) + list(model.attAfs) if isinstance(af, Spline)]
    if splines:
        backends = splineBackends(device, splines[0].nKnots, perChannel=splines[0].channels is not None,
                                  dtype=torch.bfloat16 if hp.dtype == "bfloat16" else torch.float32)
        lines.append(f"Spline kernels: forward {backends['forward']}, backward {backends['backward']}")
    if kernel.implementation == "flex":
        options = kernel.kernelOptions.get(torch.bfloat16 if hp.dtype == "bfloat16" else torch.float32)
        lines.append(f"Attention: FlexAttention, mask block {FLEX_MASK_BLOCK}, kernel options {options}")
    else:
        lines.append("Attention: SDPA with the dense causal + document + window mask")
    if kernel.score != "softmax":
        lines.append(f"Attention weights: {kernel.describeScore()}")
    if compiledVariants:
        lines.append(f"Compiled before step 1 ({compileBackend(hp, device)}): " + ", ".join(
            f"{kind} {n} model(s) from {first}" + (f" x {batch} sequences" if batch > 1 else "")
            for kind, first, n, batch in compiledVariants))
    return lines


def parameterMagnitudes(model):
    """(name, mean |value| of model 0's part) of every parameter, for the plottingLevel-3 lines."""
    return [(name, float(p.detach()[0].float().abs().mean())) for name, p in model.named_parameters()]


# ----------------------------------------------------------------------------------------------
# The AF plot's tiles


def afTiles(model, startValues, afInputs, afInputRange, step):
    """One tile per learned AF of model: its knots and values (and its start, startValues {id(spline): values},
    when it moved), or a learnable AF sampled on a grid; under each, the histogram of its sites' inputs in
    afInputs (AfInputStatistics.results() at the last report, or None)."""
    tiles = []
    for kind, afName, modules, index in (("MLP", model.afMlpName, model.mlpAfs, model.mlpAfIndex),
                                         ("att", model.afAttName, model.attAfs, model.attAfIndex),
                                         ("score", model.afScoreName, model.scoreAfs, model.scoreAfIndex)):
        for m, module in enumerate(modules):
            isSpline = hasattr(module, "knots")
            # Fixed AFs have nothing learned to show; moa's curve differs from token to token.
            if not isSpline and (not isLearnable(module) or afName in MLP_INPUT_TYPES):
                continue
            layers = [i for i, j in enumerate(index) if j == m]
            where = "all layers" if len(layers) == len(index) and len(index) > 1 else \
                "layer " + ",".join(map(str, layers)) if len(layers) <= 2 else f"layers {layers[0]}-{layers[-1]}"
            if isSpline:
                values, start = module.values.detach().float().cpu().numpy(), startValues.get(id(module))
                tiles.append({"name": f"{kind} ({where})", "knots": module.knots.cpu().numpy(), "values": values,
                              "start": None if start is None or np.array_equal(start, values) else start})
            else:  # sampled on a grid: plotted as a curve, without knot dots or constant extrapolation
                xs, ys = evaluateOnGrid(module)
                tiles.append({"name": f"{kind} {afName} ({where})", "knots": xs.cpu().numpy(),
                              "values": ys.float().cpu().numpy(), "curve": True})
            if kind == "score":  # not an AF-input site (GPT.afSiteNames)
                tiles[-1]["inputsNote"] = f"attention scores, all within ±{module.knotRange:.3g}"
            else:
                tiles[-1]["inputs"] = tileInputs(afInputs, model.afSiteNames(),
                                                 [f"{kind} {layer}" for layer in layers], afInputRange, step)
    return tiles


def tileInputs(afInputs, siteNames, sites, afInputRange, step):
    """The histogram of the AF inputs of these sites at the last report, for the plot under their AF's tile."""
    if afInputs is None:
        return None
    rows = [siteNames.index(site) for site in sites]
    counts = [afInputs["counts"][r] for r in rows]
    outside = sum(afInputs["outside"][r] * c for r, c in zip(rows, counts)) / max(1.0, sum(counts))
    return {"edges": afInputs["edges"], "histogram": afInputs["histograms"][rows].sum(0), "outside": outside,
            "range": afInputRange, "step": step}


# ----------------------------------------------------------------------------------------------
# Writing them: the log, the metrics file, the tracker, the plots


class Outputs:
    """The run's log, metrics CSV, tracker, progress bar and plots. It writes the numbers it is given, in the
    original's line formats; on a non-main torchrun process (isMain False) it writes nothing."""

    def __init__(self, hp, files, isMain, resumeStep):
        self.hp, self.files = hp, files
        if isMain:
            os.makedirs(files.folder, exist_ok=True)
        self.log = RunLog(files.log if isMain else None)
        self.tracker = trackers.openTracker(hp, resumeStep) if isMain else trackers.NoTracker()
        self.metrics = MetricsFile(files.metrics if isMain else None, resumeStep, self.tracker)
        self.sitesOutOfRange = set()  # the sites of the last out-of-range warning
        self.progressBar = None
        if resumeStep:
            self.log(f"==== resuming from {hp.resumeFrom} at step {resumeStep}")

    def header(self, lines):
        """lines: headerLines(...)."""
        for line, terminal in lines:
            self.log(line, terminal=terminal)

    def startProgress(self, step, shown):
        from tqdm import tqdm
        self.progressBar = tqdm(total=self.hp.nSteps, initial=step, desc=self.hp.runName, unit="step",
                                dynamic_ncols=True, disable=None if shown else True, file=sys.stderr)
        self.log.progressBar = self.progressBar

    def advance(self):
        self.progressBar.update(1)

    def endProgress(self):
        if self.progressBar is not None:
            self.progressBar.close()
        self.progressBar = self.log.progressBar = None

    def prefix(self, step):
        return f"Step {step}/{self.hp.nSteps}   "

    def trainingReport(self, step, losses, accuracies, reported, trainSeconds, secondsPerStep, lrs, tokens):
        """Model 0's training loss/accuracy since the last report (and every reported model's to the log and the
        metrics file); losses, accuracies, lrs, tokens: per model of the run, reported: which models trained."""
        self.log(logLines.TRAINING.format(step=step, nSteps=self.hp.nSteps, loss=losses[0], accuracy=100 * accuracies[0],
                                          seconds=trainSeconds, secondsPerStep=secondsPerStep))
        for m in (m for m in range(len(losses)) if reported[m]):
            self.metrics.write(step, m, "train", losses[m], accuracies[m], lrs[m], trainSeconds, tokens[m])
            if m > 0:
                self.log(logLines.MODEL_TRAINING.format(step=step, nSteps=self.hp.nSteps, model=m, loss=losses[m],
                                                        accuracy=100 * accuracies[m]), terminal=False)
        if self.progressBar is not None:
            self.progressBar.set_postfix(lossTr=f"{losses[0]:.3f}")

    def smoothnessReport(self, step, roughness):
        penalty = self.hp.afSmoothness * roughness
        self.log(self.prefix(step) + f"AF smoothness S {roughness:.4f}   penalty afSmoothness*S {penalty:.4f}")
        self.tracker.scalars(step, {"afSmoothness/S": roughness, "afSmoothness/penalty": penalty})

    def afInputReport(self, step, stats, siteNames, afInputRange):
        """Activation magnitudes (the original's lines, plottingLevel >= 2) and the share of AF inputs outside the
        knot range, with a warning when a site passes 1% (once, and again when the sites change)."""
        prefix = self.prefix(step)
        if self.hp.plottingLevel >= 2:
            for kind, key in ((2, "mean"), (3, "max")):
                self.log(logLines.ACTIVATIONS.format(step=step, nSteps=self.hp.nSteps, kind=kind,
                                                     values=" ".join(f"{v:.2f}" for v in stats[key])))
        self.log(prefix + "AF inputs out of range: " + " ".join(f"{100 * v:.2f}%" for v in stats["outside"]))
        self.tracker.scalars(step, {f"afInputsOutOfRange/{name}": share
                                    for name, share in zip(siteNames, stats["outside"])})
        over = [(name, share) for name, share in zip(siteNames, stats["outside"]) if share > 0.01]
        if {name for name, _ in over} != self.sitesOutOfRange:
            self.sitesOutOfRange = {name for name, _ in over}
            if over:
                self.log(prefix + f"Warning: more than 1% of the AF inputs lie outside [-{afInputRange:g}, "
                         f"{afInputRange:g}] at " + ", ".join(f"{name} ({100 * share:.1f}%)" for name, share in over)
                         + "; a spline is constant there: consider a larger --afRange")

    def parameterMagnitudes(self, step, magnitudes):
        """magnitudes: parameterMagnitudes(model)."""
        for name, value in magnitudes:
            self.log(self.prefix(step) + f"|{name}| mean {value:.4f}", terminal=False)

    def validationReport(self, step, loss, accuracy, bpb, lr, trainSeconds, tokens):
        """The original's validation line, then bits per byte (bpb: None when the validation tokens hold no text)."""
        self.metrics.write(step, 0, "val", loss, accuracy, lr, trainSeconds, tokens, bpb)
        self.log(logLines.VALIDATION.format(step=step, nSteps=self.hp.nSteps, loss=loss, accuracy=100 * accuracy))
        if bpb is not None:
            self.log(logLines.BITS_PER_BYTE.format(step=step, nSteps=self.hp.nSteps, bpb=bpb))
            self.tracker.scalars(step, {"val/bpb": bpb})

    def peakMemory(self, step, peakBytes):
        """The peak CUDA memory since the last such line, in GiB, as the original prints it."""
        self.log(logLines.PEAK_MEMORY.format(step=step, nSteps=self.hp.nSteps, gigabytes=peakBytes / 2**30))

    def savedModel(self, path):
        self.log(f"Saving model: {path}")

    def savedAfs(self, ptPath, csvPath):
        self.log(f"Saving AF: {ptPath}")
        self.log(f"Saving AF (CSV): {csvPath}")

    def stopped(self, step, checkpoint):
        self.log(f"Stopped at step {step}/{self.hp.nSteps}; checkpoint {checkpoint}")
        self.log(f"Resume with: python trainLmAf.py --resumeFrom {checkpoint}")

    def plots(self, step, history, tiles, siteNames, announce=False):
        """Redraw the plots from the history and the AF tiles (afTiles); one current file per figure, older
        refreshes removed; announce: print their paths, as the original does for the last ones."""
        import plotting
        hp, made = self.hp, []
        if hp.plottingLevel >= 1:
            lastVal = history["val"][-1] if history["val"] else None
            made.append(("tr", self.files.plot("tr", step, f"-lossVa{lastVal[1]:.4f}" if lastVal else "")))
            plotting.plotTraining(made[-1][1], history, hp.plotMinLoss, hp.plotMaxLoss, hp.plotMinAcc, hp.plotMaxAcc,
                                  title=hp.runName)
            if tiles:
                made.append(("af", self.files.plot("af", step)))
                plotting.plotAfs(made[-1][1], tiles, title=hp.runName, zoom=hp.plotAfZoom)
        if hp.plottingLevel >= 2 and history["actMean"]:
            made.append(("act", self.files.plot("act", step)))
            plotting.plotActivations(made[-1][1], history, siteNames)
        self.tracker.images(step, made)
        for path in self.files.olderPlots({kind for kind, _ in made}, {path for _, path in made}):
            os.remove(path)
        for kind, path in made if announce else []:
            self.log(f"Saving plot ({PLOT_LABELS[kind]}): {path}")
        if hp.plotShow:
            plotting.showFiles([path for _, path in made])

    def close(self):
        self.endProgress()
        self.log.close()
        self.metrics.close()
