"""Adam with decoupled weight decay for weights stacked along a leading model dimension.

Each model (slice [m] of every tensor) has its own step count and learning rate, exactly as if each
model had its own torch.optim.AdamW; step(nActive, lrs) updates only models 0..nActive-1, so models
that have not started yet keep their initial weights and a fresh optimizer state.
"""
import torch


class StackedAdam:
    def __init__(self, params, nModels, betas=(0.9, 0.999), eps=1e-8, weightDecay=0.0):
        self.params = [p for p in params if p.requires_grad]
        for p in self.params:
            if p.shape[0] != nModels:
                raise ValueError(f"every parameter must be stacked over {nModels} models, got shape {tuple(p.shape)}")
        self.nModels, self.betas, self.eps, self.weightDecay = nModels, betas, eps, weightDecay
        self.expAvg = [torch.zeros_like(p) for p in self.params]
        self.expAvgSq = [torch.zeros_like(p) for p in self.params]
        self.stepCounts = torch.zeros(nModels, dtype=torch.int64, device="cpu")  # host-side: read by Python

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, nActive, lrs):
        """One Adam step of models 0..nActive-1 with learning rates lrs[0..nActive-1]."""
        n = nActive
        beta1, beta2 = self.betas
        self.stepCounts[:n] += 1
        steps = self.stepCounts[:n].double()
        lrs = torch.as_tensor(lrs[:n], dtype=torch.float64, device="cpu")
        stepSize = (lrs / (1 - beta1 ** steps)).float()
        bias2Sqrt = (1 - beta2 ** steps).sqrt().float()
        decay = (1 - lrs * self.weightDecay).float()
        device = self.params[0].device if self.params else "cpu"
        stepSize, bias2Sqrt, decay = (t.to(device, non_blocking=True) for t in (stepSize, bias2Sqrt, decay))
        for p, m, v in zip(self.params, self.expAvg, self.expAvgSq):
            if p.grad is None:
                continue
            shape = (n,) + (1,) * (p.dim() - 1)
            g, w, m, v = p.grad[:n], p[:n], m[:n], v[:n]
            if self.weightDecay:
                w.mul_(decay.view(shape))
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            # w -= stepSize * m / (sqrt(v) / sqrt(bias2) + eps), with one temporary
            denom = v.sqrt().div_(bias2Sqrt.view(shape)).add_(self.eps).div_(stepSize.view(shape))
            w.addcdiv_(m, denom, value=-1)

    def state_dict(self):
        return {"expAvg": list(self.expAvg), "expAvgSq": list(self.expAvgSq), "stepCounts": self.stepCounts.clone()}

    def load_state_dict(self, state, models=slice(None)):
        """Load a state saved for all models; `models` picks this optimizer's slice of them (a distributed rank's)."""
        if len(state["expAvg"]) != len(self.params):
            raise ValueError("optimizer state does not match the model's trainable parameters")
        for dst, src in zip(self.expAvg + self.expAvgSq, state["expAvg"] + state["expAvgSq"]):
            dst.copy_(src[models])
        self.stepCounts.copy_(state["stepCounts"][models])

    def describe(self):
        nParams = sum(p.numel() for p in self.params)
        return (f"StackedAdam (one AdamW per model): {len(self.params)} tensors, {nParams:,} parameters, "
                f"betas={self.betas}, eps={self.eps}, weightDecay={self.weightDecay}")
