"""How a run stops before its last step, and what it saves then: SIGINT/SIGTERM (finish the step, save a resumable
checkpoint, exit 128+N), a non-finite loss (the AF values before that step), out of memory (a resumable checkpoint
and the --modelsPerPass to try); under torchrun all processes agree on the step. The functions take the Trainer of
trainLmAf.py."""
import gc
import os
import signal

import torch

import preflight
import runOutputs


class Interrupted(Exception):
    pass


class NonFiniteLoss(Exception):
    def __init__(self, step, modelIndex):
        super().__init__(f"non-finite training loss at step {step} in model {modelIndex}; lower --lr or --afLr, "
                         "or enable --gradientClipping")
        self.step, self.modelIndex = step, modelIndex
        self.afFile = None


def installSignalHandlers(trainer):
    """SIGINT and SIGTERM: finish the step, then save and stop (trainer.stopSignal); a second one stops at once."""
    def handler(signum, frame):
        if trainer.stopSignal is not None:
            os._exit(128 + signum)  # second signal: stop at once
        trainer.stopSignal = signum
        trainer.log(f"Received {signal.Signals(signum).name}: finishing step {trainer.step + 1}, then saving "
                    "(send it again to stop at once)")
    trainer.previousHandlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def restoreSignalHandlers(trainer):
    for s, h in getattr(trainer, "previousHandlers", {}).items():
        signal.signal(s, h)


def agreeAcrossProcesses(trainer, losses):
    """Under torchrun every process must stop at the same step: share the stop signal and non-finite losses."""
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    flags = torch.tensor([trainer.stopSignal or 0, trainer.firstModel + bad[0] + 1 if bad else 0], device=trainer.device)
    trainer.dist.maxInPlace(flags)
    if flags[0]:
        trainer.stopSignal = int(flags[0])
    if flags[1]:
        raise NonFiniteLoss(trainer.step + 1, int(flags[1]) - 1)


def checkFinite(trainer, losses, step, afBefore):
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteLoss(step + 1, trainer.firstModel + bad[0])


def saveLastGoodAfs(trainer, err, pending):
    """Write the AF values as they were before the step whose loss was not finite."""
    if not trainer.afOptimizer or pending is None or not trainer.dist.isMain:
        return
    _, failedStep, afBefore = pending
    with torch.no_grad():
        for p, good in zip(trainer.model.afParameters(), afBefore):
            p.copy_(good)
    trainer.step = failedStep
    err.afFile = runOutputs.saveAfs(trainer)[0]


def releaseGradients(trainer):
    """Drop the failed pass's gradients and hand the cached blocks back, before saving or measuring free memory."""
    for p in trainer.model.parameters():
        p.grad = None
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()


def saveAfterOutOfMemory(trainer):
    """After an out-of-memory error in a forward or backward pass the weights are those after the last step:
    save them, so that the run resumes with a smaller --modelsPerPass. Returns the checkpoint's path, or None
    when the error came during the update (half-updated weights are not worth keeping)."""
    if trainer.updating:
        return None
    releaseGradients(trainer)
    path = runOutputs.saveModel(trainer)
    if trainer.dist.isMain and trainer.afOptimizer:
        runOutputs.saveAfs(trainer)
    return path


def outOfMemoryAdvice(trainer):
    """One line for an out-of-memory error: the estimated peak of a pass, the GPU's free memory for this run, and
    the --modelsPerPass to try."""
    hp, perPass = trainer.hp, getattr(trainer, "modelsPerPass", None)
    if perPass is None:
        return f"out of memory on {trainer.device} before training started: the model and its optimizer states do not fit"
    peak, _ = preflight.estimatePeakMemory(hp, trainer.vocabSize, trainer.nLocal, perPass)
    line = f"out of memory in a pass of {perPass} model(s) ({trainer.device}): estimated peak {peak / 2**30:.2f} GiB"
    smaller = max(1, perPass // 2)
    if trainer.device.type == "cuda":
        gc.collect()  # the failed pass's autograd graph may hold reference cycles
        releaseGradients(trainer)
        free = torch.cuda.mem_get_info(trainer.device)[0] + torch.cuda.memory_reserved(trainer.device)
        line += f", {free / 2**30:.2f} GiB free for this run"
        smaller = min(smaller, preflight.fittingModelsPerPass(hp, trainer.vocabSize, trainer.nLocal, free)[0])
    if perPass > 1:
        return line + f"; try --modelsPerPass {smaller}"
    return line + "; one model per pass does not fit: try a smaller --seqLength or --dtype bfloat16"


def saveOnInterrupt(trainer):
    path = runOutputs.saveModel(trainer)
    if not trainer.dist.isMain:
        return
    if trainer.afOptimizer:
        runOutputs.saveAfs(trainer)
    if trainer.hp.plottingLevel >= 1:
        runOutputs.refreshPlots(trainer, announce=True)
    trainer.log(f"Stopped at step {trainer.step}/{trainer.hp.nSteps}; checkpoint {path}")
    trainer.log(f"Resume with: python trainLmAf.py --resumeFrom {path}")
