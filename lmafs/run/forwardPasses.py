"""The stacked model's passes in a run: the forward pass of a group of models, validation, the AF-input statistics
pass, and compiling the model with the graphs run before step 1 (with FlexAttention's fallback to SDPA when they
fail). Passes takes the model, the hyperparameters and the device, nothing of the Trainer."""
import sys

import torch

from lmafs.run import preflight
from model import AfInputStatistics
from lmafs.run.flagChecks import ConfigError
from lmafs.run.runPlan import validationBatchSize
from lmafs.run.runSetup import compileBackend
from lmafs.run.stopping import agreeOnFailure
from lmafs.data.tokenShards import TokenStream


class Passes:
    """The model's passes, compiled (torch.compile with the run's backend) or eager; afInputRange: the knot range the
    AF-input statistics count inputs outside of."""

    def __init__(self, model, hp, device, afInputRange):
        self.model, self.hp, self.device, self.afInputRange = model, hp, device, afInputRange
        self.backend = compileBackend(hp, device)
        self.compiled = model if self.backend is None else torch.compile(model, backend=self.backend)
        # the AF-input statistics read the model's AF sites at each report: a graph of its own, compiled before step 1
        self.afInputTable = model.afInputTable if self.backend is None else \
            torch.compile(model.afInputTable, backend=self.backend, dynamic=False)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=hp.dtype == "bfloat16")
        self.attentionNotes = []  # the fallback's line, for the header
        self.compiledVariants = []

    def forward(self, tokens, first):
        """Losses and accuracies [n] of models first..first+n-1 on tokens [n, B, T+1]."""
        inputs, targets = tokens[..., :-1], tokens[..., 1:]
        if self.compiled is not self.model:
            # one graph for every number of models (and validation batch) instead of one each
            torch._dynamo.maybe_mark_dynamic(inputs, 0)
            torch._dynamo.maybe_mark_dynamic(targets, 0)
        with self.autocast:
            return self.compiled(inputs, targets, firstModel=first)

    @torch.no_grad()
    def validation(self, sequences):
        """Mean loss and accuracy of model 0 over the validation sequences [n, T+1] (numpy)."""
        perForward = validationBatchSize(len(sequences), self.hp.seqLength)
        totalLoss = totalAcc = 0.0
        for start in range(0, len(sequences), perForward):
            chunk = torch.from_numpy(sequences[start:start + perForward]).to(self.device)[None]
            losses, accs = self.forward(chunk, 0)
            totalLoss += float(losses[0]) * chunk.shape[1]
            totalAcc += float(accs[0]) * chunk.shape[1]
        return totalLoss / len(sequences), totalAcc / len(sequences)

    @torch.no_grad()
    def afInputStatistics(self, tokens):
        """AfInputStatistics.results() of model 0 on tokens [1, B, T+1] (statisticsTokens)."""
        with self.autocast:
            table = self.afInputTable(tokens[..., :-1], self.afInputRange)
        return AfInputStatistics.results(table, self.afInputRange)

    def compileBeforeStepOne(self, variants, dist, fallbackCheck):
        """Run, before step 1, every graph a compiled run will need (variants: runPlan.shapeVariants), or, eagerly,
        one pass when FlexAttention is in use: a failure of FlexAttention here (a compile error, too little shared
        memory at the first launch) switches every process to SDPA with one printed line instead of stopping the
        run. fallbackCheck(): why a pass with the fallback would not fit the free memory, or None. Under torchrun
        the processes agree after each part that may fail in one of them alone: all stop, or all go on (what this
        raises, every process raises)."""
        compiled, kernel = self.backend is not None, self.model.kernel
        if not compiled and kernel.implementation != "flex":
            return
        failure = outOfMemory = None
        try:
            self.runVariants(variants if compiled else variants[:1])
        except torch.OutOfMemoryError as err:  # too little memory, not a FlexAttention defect: SDPA would need more
            outOfMemory = err
        except Exception as err:  # compile and launch errors of other GPUs and library versions have many types
            failure = err
        stop, (anyFailed,) = agreeOnFailure(dist, outOfMemory, self.device, [failure is not None])
        if stop:
            raise stop
        if anyFailed:
            line = kernel.fallBackToSdpa(failure or RuntimeError("FlexAttention failed in another process"))
            problem = fallbackCheck()  # of this process's GPU: the others may have more free memory
            tooBig = ConfigError(f"FlexAttention failed on this GPU ({kernel.flexFailure}); {problem}") if problem \
                else None
            stop, _ = agreeOnFailure(dist, tooBig, self.device)
            if stop:
                raise stop
            print(line, file=sys.stderr, flush=True)  # the header's kernel lines repeat it in the log
            self.attentionNotes.append(line)
            if compiled:
                sdpaFailure = None
                try:
                    self.runVariants(variants)
                except Exception as err:  # out of memory, or SDPA failing too
                    sdpaFailure = err
                stop, _ = agreeOnFailure(dist, sdpaFailure, self.device)
                if stop:
                    raise stop
        self.compiledVariants = variants if compiled else []

    def runVariants(self, variants):
        def tokens(rows):  # laid out as the training batches and validation lay out real ones, so the guards hold
            return torch.zeros(rows, self.hp.seqLength + 1, dtype=torch.long, device=self.device)

        try:
            for kind, first, n, batch in variants:
                if kind == "train":
                    losses, _ = self.forward(tokens(first + n)[:, None, :][first:], first)
                    losses.sum().backward()
                elif kind == "validation":
                    with torch.no_grad():
                        self.forward(tokens(batch)[None], 0)
                else:
                    self.afInputStatistics(tokens(batch)[None])
        finally:
            for p in self.model.parameters():
                p.grad = None


def fallbackProblemHere(hp, vocabSize, nLocal, modelsPerPass, device):
    """Why a pass with FlexAttention's fallback (explicit [T, T] scores) will not fit the free GPU memory, or None
(also off CUDA): a stop before step 1 instead of an out-of-memory error in it."""
    if device.type != "cuda":
        return None
    return preflight.fallbackProblem(hp, vocabSize, nLocal, modelsPerPass, preflight.freeForRun(device))


def statisticsTokens(vaSequences, trFiles, hp, device):
    """The AF-input statistics' tokens [1, B, T+1]: the first validation batch, or one training sequence."""
    if vaSequences is not None:
        batch = validationBatchSize(len(vaSequences), hp.seqLength)
        return torch.from_numpy(vaSequences[:batch]).to(device)[None]
    return torch.from_numpy(TokenStream(trFiles, hp.seqLength, hp.seed, 0, 0).next()).to(device)[None, None]
