"""How a run stops before its last step, as decisions the training loop acts on: SIGINT/SIGTERM (finish the step,
then save a resumable checkpoint and exit 128+N), a non-finite loss (save the AF values before that step), out of
memory (the advice: the --modelsPerPass to try). Under torchrun all processes stop together: they agree on the step
(a signal is acted on once all have learned of it at an agreement; one that comes later waits for the next), and
where one process may fail alone (out of memory, FlexAttention's fallback) all learn of it and stop with it."""
import gc
import os
import signal

import torch

from lmafs.run import preflight
from lmafs.run.flagChecks import ConfigError


class NonFiniteLoss(Exception):
    def __init__(self, step, modelIndex):
        super().__init__(f"non-finite training loss at step {step} in model {modelIndex}; lower --lr or --afLr, "
                         "or enable --gradientClipping")
        self.step, self.modelIndex = step, modelIndex
        self.afFile = None


class AnotherProcessFailed(Exception):
    """Under torchrun, another process failed alone (its own line says how): this one stops too, with its status."""

    def __init__(self, status):
        super().__init__(f"another process failed (exit status {status}; its own error line says why), "
                         "so this one stopped too")
        self.status = status
        self.checkpoint = None


class StopSignals:
    """SIGINT and SIGTERM while the loop runs: the first sets `received` (the loop saves and stops after the step
    it is in; under torchrun after the step all processes agree on it), a second stops at once. Only the handler sets
    `received`, so that a signal is never lost, whenever it comes. say: where the line saying so goes; state: the run
    state (its step)."""

    def __init__(self, say, state):
        self.say, self.state = say, state
        self.received = None
        self.previous = {}

    def handle(self, signum, frame):
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        self.say(f"Received {signal.Signals(signum).name}: finishing step {self.state.step + 1}, then saving "
                 "(send it again to stop at once)")

    def install(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}


def nonFiniteLoss(losses, step, firstModel):
    """NonFiniteLoss for the first model whose loss at 0-based step `step` is not finite (losses: this process's
    models from firstModel on), or None."""
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    return NonFiniteLoss(step + 1, firstModel + bad[0]) if bad else None


def agreeAcrossProcesses(dist, losses, received, firstModel, step):
    """Under torchrun every process must stop at the same step: (the stop signal any process had received when it
    came to this agreement, or None; NonFiniteLoss when any process's losses at 0-based step `step` are not finite,
    or None). received: this process's StopSignals.received."""
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    flags = torch.tensor([received or 0, firstModel + bad[0] + 1 if bad else 0], device=losses.device)
    dist.maxInPlace(flags)
    return int(flags[0]) or None, NonFiniteLoss(step + 1, int(flags[1]) - 1) if flags[1] else None


def exitStatus(error):
    """The exit status the run ends with on an error one process may meet alone: 4 out of memory, 2 a configuration
    error, 1 another error (its traceback); 0 without one."""
    if error is None:
        return 0
    if isinstance(error, torch.OutOfMemoryError):
        return 4
    return 2 if isinstance(error, ConfigError) else 1


def agreeOnFailure(dist, error, device, flags=()):
    """Where one process may fail alone under torchrun (error: its failure there, or None), every process learns
    whether any did, with the maxima of `flags` (ints) in the same all_reduce, so that all stop or none goes on.
    Returns (what to raise: error where it happened, AnotherProcessFailed elsewhere, None when none failed; the flags'
    maxima). Without torchrun (dist.maxInPlace does nothing), error itself and the flags."""
    values = dist.maxInPlace(torch.tensor([exitStatus(error), *flags], dtype=torch.int32, device=device)).tolist()
    if values[0] == 0:
        return None, values[1:]
    return error or AnotherProcessFailed(values[0]), values[1:]


def releaseGradients(model, device):
    """Drop the failed pass's gradients and hand the cached blocks back, before saving or measuring free memory."""
    for p in model.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def outOfMemoryAdvice(hp, device, vocabSize, nLocal, modelsPerPass, model):
    """One line for an out-of-memory error: the estimated peak of a pass, the GPU's free memory for this run, and
    the --modelsPerPass to try (modelsPerPass None: the error came before training started)."""
    if modelsPerPass is None:
        return f"out of memory on {device} before training started: the model and its optimizer states do not fit"
    peak, _ = preflight.estimatePeakMemory(hp, vocabSize, nLocal, modelsPerPass)
    line = f"out of memory in a pass of {modelsPerPass} model(s) ({device}): estimated peak {peak / 2**30:.2f} GiB"
    smaller = max(1, modelsPerPass // 2)
    if device.type == "cuda":
        gc.collect()  # the failed pass's autograd graph may hold reference cycles
        releaseGradients(model, device)
        free = preflight.freeForRun(device)
        line += f", {free / 2**30:.2f} GiB free for this run"
        smaller = min(smaller, preflight.fittingModelsPerPass(hp, vocabSize, nLocal, free)[0])
    if modelsPerPass > 1:
        return line + f"; try --modelsPerPass {smaller}"
    return line + "; one model per pass does not fit: try a smaller --seqLength or --dtype bfloat16"
