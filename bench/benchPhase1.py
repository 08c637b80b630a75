"""Phase I speed: all N models in one batched pass vs the same N models one after another (our N=1 path).

Both start from the same weights, data streams and optimizer settings, so after the timed steps their
per-model losses must agree (float32 rounding); the table reports that difference with the times.
Also: for N = 1, 5, 10, 20 models (--memoryModels), the modelsPerPass the trainer chooses, the peak memory
--preflight estimates for it and (on CUDA) the peak measured, each trainer freed before the next; single-model
tokens/s in float32 and bfloat16.
The last line is `ratio X` = batched seconds per step / looped seconds per step.

    python bench/benchPhase1.py                   # CUDA, 20 models, default model size, seqLength 4096
    python bench/benchPhase1.py --device cpu --quick
"""
import argparse
import copy
import gc
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmafs.data.tokenShards import TokenStream, writeShard  # noqa: E402
from lmafs.run.runPlan import activeModels, lrFactor, modelLrFactors  # noqa: E402
from trainLmAf import Trainer, parseArgs  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def writeRandomShards(folder, nTokens, seed=0):
    """Random GPT-2 token ids with document separators; enough for every model's stream."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50257, nTokens)
    tokens[rng.random(nTokens) < 0.002] = 50256
    writeShard(os.path.join(folder, "fineweb_val_000000.bin"), tokens[:nTokens // 10])
    writeShard(os.path.join(folder, "fineweb_train_000001.bin"), tokens[nTokens // 10:])


def makeTrainer(args, folder, nModels, dtype="float32"):
    flags = ["--filesTokensTr", f"{folder}/fineweb_train_*.bin", "--filesTokensVa", "",
             "--dirResults", os.path.join(folder, "results"), "--device", args.device, "--seed", "1234",
             "--nModels", str(nModels), "--staggeredStarts", "0", "--afLayerSpecific", "0",
             "--afType", "spline;att-spline", "--afLr", "0.1", "--dtype", dtype,
             "--nSteps", "1000", "--nStepsWarmup", "10", "--nStepsCooldown", "100", "--plottingLevel", "0",
             "--nLayers", str(args.nLayers), "--dimEmb", str(args.dimEmb), "--nHeads", str(args.nHeads),
             "--seqLength", str(args.seqLength), "--contextSize", str(min(1024, args.seqLength))]
    hp, given = parseArgs(flags)
    return Trainer(hp, given).setup()


class LoopedPhase1:
    """The N models one after another through one N=1 model (functional_call over each model's own weights),
    each with its own AdamW, and one Adam on a copy of the shared AFs: the original code's structure."""

    def __init__(self, trainer):
        hp, model = trainer.hp, trainer.model
        self.hp, self.device, self.autocast = hp, trainer.device, trainer.passes.autocast
        self.single = model.singleModel(0)
        self.single.mlpAfs, self.single.attAfs = copy.deepcopy(model.mlpAfs), copy.deepcopy(model.attAfs)
        names = [name for name, _ in self.single.namedWeightParameters()]
        self.weights = [{name: p[i:i + 1].detach().clone().requires_grad_(p.requires_grad)
                         for name, (_, p) in zip(names, model.namedWeightParameters())}
                        for i in range(hp.nModels)]
        self.optimizers = [torch.optim.AdamW([w for w in ws.values() if w.requires_grad], lr=hp.lr,
                                             betas=(hp.adamB1, hp.adamB2), weight_decay=hp.wtDecay)
                           for ws in self.weights]
        self.afParams = [p for p in self.single.afParameters()]
        self.afOptimizer = torch.optim.Adam(self.afParams, lr=hp.afLr, betas=(hp.afAdamB1, hp.afAdamB2))
        self.streams = [TokenStream(trainer.trFiles, hp.seqLength, hp.seed, i, hp.shuffleTrData)
                        for i in range(hp.nModels)]
        self.startSteps = trainer.startSteps

        def lossOf(weights, tokens):
            losses, _ = functional_call(self.single, weights, (tokens[..., :-1], tokens[..., 1:]))
            return losses

        self.lossOf = torch.compile(lossOf) if self.device.type == "cuda" else lossOf

    def step(self, step):
        hp = self.hp
        nActive = activeModels(step, self.startSteps)
        losses = []
        for i in range(nActive):
            tokens = torch.from_numpy(self.streams[i].next()).to(self.device)[None, None]
            with self.autocast:
                loss = self.lossOf(self.weights[i], tokens)
            loss.sum().backward()
            losses.append(loss.detach())
        for p in self.afParams:
            p.grad /= nActive
        for i, factor in enumerate(modelLrFactors(hp, step, self.startSteps)[:nActive]):
            for group in self.optimizers[i].param_groups:
                group["lr"] = hp.lr * factor
            self.optimizers[i].step()
            self.optimizers[i].zero_grad(set_to_none=True)
        for group in self.afOptimizer.param_groups:
            group["lr"] = hp.afLr * lrFactor(step, hp.nSteps, hp.nStepsWarmup, hp.nStepsCooldown, hp.lrSchedule)
        self.afOptimizer.step()
        self.afOptimizer.zero_grad(set_to_none=True)
        return torch.cat(losses)


def timeSteps(stepFunction, device, nWarmup, nTimed):
    """Seconds per step (median of the timed steps) and the losses of the last step."""
    for _ in range(nWarmup):
        losses = stepFunction()
    times = []
    for _ in range(nTimed):
        synchronize(device)
        start = time.perf_counter()
        losses = stepFunction()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), losses


def batchedStepper(trainer):
    def run():
        _, losses, _ = trainer.trainStep()
        trainer.state.step += 1
        return losses
    return run


def freeMemory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memoryRow(args, folder, device, nModels):
    """(models, modelsPerPass chosen, estimated peak GiB, measured peak GiB or nan) of a fresh trainer's steps."""
    from lmafs.run import preflight

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = makeTrainer(args, folder, nModels)
    estimated, _ = preflight.estimatePeakMemory(trainer.hp, trainer.vocabSize, nModels, trainer.modelsPerPass)
    step = batchedStepper(trainer)
    for _ in range(2):  # the second step runs with the optimizer states the first one made
        step()
    synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    row = (nModels, trainer.modelsPerPass, estimated / 2**30, measured)
    del trainer, step
    freeMemory(device)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run on a CPU in about a minute")
    parser.add_argument("--nModels", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after warm-up steps)")
    parser.add_argument("--memoryModels", default="", help="comma-separated model counts of the memory rows; "
                                                           "default 1, nModels/4, nModels/2, nModels")
    args = parser.parse_args()
    if args.quick:
        args.nModels, args.steps = min(args.nModels, 4), min(args.steps, 3)
        args.nLayers, args.dimEmb, args.nHeads, args.seqLength = 2, 64, 2, 128
    else:
        args.nLayers, args.dimEmb, args.nHeads, args.seqLength = 4, 256, 4, 4096
    device = torch.device(args.device)
    nWarmup = 3 if device.type == "cuda" else 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"phase I: {args.nModels} models, spline;att-spline, layer-shared, {args.nLayers} layers x {args.dimEmb}, "
          f"seqLength {args.seqLength}; {nWarmup} warm-up + {args.steps} timed steps")

    with tempfile.TemporaryDirectory() as folder:
        totalSteps = nWarmup + args.steps + 2
        writeRandomShards(folder, max(2_000_000, 2 * totalSteps * args.nModels * (args.seqLength + 1)))
        trainer = makeTrainer(args, folder, args.nModels)
        looped = LoopedPhase1(trainer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batchedTime, batchedLosses = timeSteps(batchedStepper(trainer), device, nWarmup, args.steps)
        batchedPeak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loopStep = iter(range(10 ** 9))
        loopedTime, loopedLosses = timeSteps(lambda: looped.step(next(loopStep)), device, nWarmup, args.steps)
        loopedPeak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        lossDiff = float((batchedLosses.float() - loopedLosses.float()).abs().max())
        tokensPerStep = args.nModels * args.seqLength

        rows = [("batched (one pass, all models)", batchedTime, batchedPeak),
                ("looped (one model after another)", loopedTime, loopedPeak)]
        del trainer, looped  # a live 20-model trainer would sit under every measurement below
        freeMemory(device)
        counts = {int(n) for n in args.memoryModels.split(",")} if args.memoryModels else \
            {1, max(1, args.nModels // 4), max(1, args.nModels // 2), args.nModels}
        memoryRows = [memoryRow(args, folder, device, n) for n in sorted(counts)]
        throughput = []
        for dtype in ("float32", "bfloat16"):
            single = makeTrainer(args, folder, 1, dtype)
            seconds, _ = timeSteps(batchedStepper(single), device, nWarmup, args.steps)
            throughput.append((dtype, args.seqLength / seconds))
            del single

    print()
    print(f"{'variant':36s} {'s/step':>9s} {'tokens/s':>12s} {'peak GiB':>9s}")
    for label, seconds, peak in rows:
        print(f"{label:36s} {seconds:9.4f} {tokensPerStep / seconds:12,.0f} {peak:9.3f}")
    print(f"per-model losses after {nWarmup + args.steps} steps, max |batched - looped|: {lossDiff:.2e}")
    print()
    print(f"{'models':>6s} {'modelsPerPass':>13s} {'estimated peak GiB':>19s} {'measured peak GiB':>18s}")
    for n, perPass, estimated, measured in memoryRows:
        print(f"{n:6d} {perPass:13d} {estimated:19.3f} {measured:18.3f}")
    for dtype, tokensPerSecond in throughput:
        print(f"single model (baseline path) {dtype:9s}: {tokensPerSecond:12,.0f} tokens/s")
    print(f"ratio {batchedTime / loopedTime:.2f}")


if __name__ == "__main__":
    main()
