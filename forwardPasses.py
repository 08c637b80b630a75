"""The stacked model's passes in a run, besides the training step: compiling the model, the graphs run before step 1
(with FlexAttention's fallback to SDPA when they fail), validation, and the AF-input statistics pass. The functions
take the Trainer of trainLmAf.py; every pass goes through its forwardPass."""
import sys

import torch

import preflight
from model import AfInputStatistics
from runPlan import ConfigError, compileBackend, runPasses, shapeVariants, validationBatchSize
from tokenShards import TokenStream


def compileModel(trainer):
    """The compiled model (the model itself when the backend is none), its AF-input statistics graph and autocast;
    then every graph the run needs, run once before step 1."""
    hp = trainer.hp
    backend = compileBackend(hp, trainer.device)
    trainer.compiled = trainer.model if backend is None else torch.compile(trainer.model, backend=backend)
    # the AF-input statistics read the model's AF sites at each report: a graph of its own, compiled before step 1
    trainer.afInputTable = trainer.model.afInputTable if backend is None else \
        torch.compile(trainer.model.afInputTable, backend=backend, dynamic=False)
    trainer.autocast = torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=hp.dtype == "bfloat16")
    trainer.attentionNotes = []
    trainer.compiledVariants = firstPasses(trainer, compiled=backend is not None)


def firstPasses(trainer, compiled):
    """Run, before step 1, every graph a compiled run will need (or, eagerly, one pass when FlexAttention is in
    use): a failure of FlexAttention here (a compile error, too little shared memory at the first launch)
    switches every process to SDPA with one printed line instead of stopping the run. Returns the compiled
    variants."""
    kernel = trainer.model.kernel
    if not compiled and kernel.implementation != "flex":
        return []
    failure = None
    try:
        variants = compileShapeVariants(trainer, allOfThem=compiled)
    except torch.OutOfMemoryError:  # too little memory, not a FlexAttention defect: SDPA would need more
        raise
    except Exception as err:  # compile and launch errors of other GPUs and library versions have many types
        failure = err
    anyFailed = trainer.dist.maxInPlace(torch.tensor([failure is not None], dtype=torch.int32, device=trainer.device))
    if not anyFailed[0]:
        return variants if compiled else []
    line = kernel.fallBackToSdpa(failure or RuntimeError("FlexAttention failed in another process"))
    if trainer.device.type == "cuda":
        stopIfTheFallbackDoesNotFit(trainer)
    print(line, file=sys.stderr, flush=True)  # the header's kernel lines repeat it in the log
    trainer.attentionNotes.append(line)
    return compileShapeVariants(trainer) if compiled else []


def stopIfTheFallbackDoesNotFit(trainer):
    """Raise ConfigError, one line, when a pass with FlexAttention's fallback will not fit the free GPU memory: a
    stop now instead of an out-of-memory error in the first step (explicit [T, T] scores at the default size)."""
    free = torch.cuda.mem_get_info(trainer.device)[0] + torch.cuda.memory_reserved(trainer.device)
    problem = preflight.fallbackProblem(trainer.hp, trainer.vocabSize, trainer.nLocal, trainer.modelsPerPass, free)
    if problem:
        raise ConfigError(f"FlexAttention failed on this GPU ({trainer.model.kernel.flexFailure}); {problem}")


def compileShapeVariants(trainer, allOfThem=True):
    """Compile, before step 1, every graph the run will need (training passes of 1..N models, validation),
    so that no compile happens hours into a run; returns what was compiled (allOfThem False: the first only)."""
    passes = runPasses(trainer.startSteps, trainer.step, trainer.localActive, trainer.modelsPerPass)
    nValidation = len(trainer.vaSequences) if trainer.vaSequences is not None and trainer.dist.isMain else 0
    statistics = trainer.hp.plottingLevel >= 1 and trainer.dist.isMain
    variants = shapeVariants(passes, trainer.nLocal, nValidation, trainer.hp.seqLength,
                             statistics)[:None if allOfThem else 1]
    def tokens(rows):  # laid out as nextBatch and validate lay out real ones, so the graphs' guards hold
        return torch.zeros(rows, trainer.hp.seqLength + 1, dtype=torch.long, device=trainer.device)

    try:
        for kind, first, n, batch in variants:
            if kind == "train":
                losses, _ = trainer.forwardPass(tokens(first + n)[:, None, :][first:], first)
                losses.sum().backward()
            elif kind == "validation":
                with torch.no_grad():
                    trainer.forwardPass(tokens(batch)[None], 0)
            else:
                afInputStatistics(trainer, tokens(batch)[None])
    finally:
        for p in trainer.model.parameters():
            p.grad = None
    return variants


@torch.no_grad()
def validate(trainer):
    """Mean loss and accuracy of model 0 over the validation sequences."""
    seqs = trainer.vaSequences
    perForward = validationBatchSize(len(seqs), trainer.hp.seqLength)
    totalLoss = totalAcc = 0.0
    for start in range(0, len(seqs), perForward):
        chunk = torch.from_numpy(seqs[start:start + perForward]).to(trainer.device)[None]
        losses, accs = trainer.forwardPass(chunk, 0)
        totalLoss += float(losses[0]) * chunk.shape[1]
        totalAcc += float(accs[0]) * chunk.shape[1]
    return totalLoss / len(seqs), totalAcc / len(seqs)


@torch.no_grad()
def afInputStatistics(trainer, tokens=None):
    """AfInputStatistics.results() of model 0 on tokens [1, B, T+1]; by default the first validation batch (or a
    training sequence)."""
    if tokens is None and trainer.vaSequences is not None:
        batch = validationBatchSize(len(trainer.vaSequences), trainer.hp.seqLength)
        tokens = torch.from_numpy(trainer.vaSequences[:batch]).to(trainer.device)[None]
    elif tokens is None:
        tokens = torch.from_numpy(TokenStream(trainer.trFiles, trainer.hp.seqLength, trainer.hp.seed, 0, 0).next()
                                  ).to(trainer.device)[None, None]
    with trainer.autocast:
        table = trainer.afInputTable(tokens[..., :-1], trainer.afInputRange)
    return AfInputStatistics.results(table, trainer.afInputRange)
