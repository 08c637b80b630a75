"""The run plan: which models train at each step and with which LR (schedules, staggered starts), how many tokens
they have seen, when each report and output is due, and in which batched passes and compiled graphs. Pure functions
of the hyperparameters and the step: no files, no devices, no model."""
import math

import numpy as np


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
# Batched passes and the graphs compiled before step 1


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

