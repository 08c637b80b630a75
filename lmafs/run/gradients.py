"""One step's gradients between the backward passes and the optimizers: the AFs' averaged over the models that ran
(and, under torchrun, over the processes; data parallel: all of them), and one global norm clipped, as the
original clips it."""
import torch


@torch.no_grad()
def averageGradients(afParams, weightParams, nActive, nActiveAll, dist, dataParallel):
    """AF gradient: the sum over this process's nActive models becomes the average over the run's nActiveAll, on
    all processes; data parallel: every gradient the average over the processes."""
    if not dist.enabled:
        for p in afParams:
            if p.grad is not None:
                p.grad /= nActive
        return
    shared = afParams + (list(weightParams) if dataParallel else [])
    for p in shared:
        if p.grad is None:  # a process whose models have not started still takes part in the sum
            p.grad = torch.zeros_like(p)
    dist.sumInPlace([p.grad for p in shared])
    divisor = dist.worldSize if dataParallel else nActiveAll
    for p in shared:
        p.grad /= divisor


@torch.no_grad()
def clipGlobalNorm(weightParams, afParams, nActive, maxNorm, dist, dataParallel, device):
    """Scale the gradients of everything that gets a step (the first nActive models' stacked weights and the AFs)
    so that their one norm is at most maxNorm."""
    weightGrads = [p.grad[:nActive] for p in weightParams if p.grad is not None] if nActive else []
    afGrads = [p.grad for p in afParams if p.grad is not None]
    squares = sum((g.float().pow(2).sum() for g in weightGrads), torch.zeros((), device=device))
    if dist.enabled and not dataParallel:  # each process holds the gradients of its own models...
        dist.sumInPlace([squares])
    squares = squares + sum(g.float().pow(2).sum() for g in afGrads)  # ...the AFs' are the same on all of them
    scale = (maxNorm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for g in weightGrads + afGrads:
        g.mul_(scale.to(g.dtype))
