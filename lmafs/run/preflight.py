"""What a run needs before it runs: its peak GPU memory per pass, estimated on fake tensors (shapes only, nothing
allocated, so it works on a machine without a GPU), the modelsPerPass that fits a GPU, and the --preflight report
(flags and files, memory, kernels, FlexAttention configs, compiled graphs) for the GPU a run will use."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from model import GPT
from lmafs.run.flagChecks import ConfigError, splitAfType
from lmafs.run.runPlan import modelStartSteps, runPasses, shapeVariants
from lmafs.run.runSetup import compileBackend, modelArguments, modelVocabSize, pickDevice

# What the CUDA context, cuBLAS workspaces and the caching allocator's fragmentation take beyond the tensors
# themselves: a pass is planned to use at most this share of the free memory.
USABLE_SHARE = 0.9


class FusedAttentionFootprint(torch.autograd.Function):
    """The memory of a fused attention kernel such as FlexAttention's, which never holds the [T, T] scores: the
    forward allocates the output and a float32 log-sum-exp [nB, H, T] and saves them with q, k and v; the
    backward allocates dq, dk and dv (and a float32 [nB, H, T] row sum, too small to count)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        logSumExp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logSumExp)
        return out

    @staticmethod
    def backward(ctx, gradOut):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedAttentionStandIn:
    """An attention kernel with FlexAttention's memory and shapes, for the estimate (FlexAttention itself has
    no backward on a CPU, where the estimate may run)."""

    def mask(self, docs):
        return None

    def __call__(self, q, k, v, mask, scoreAf=None):
        return FusedAttentionFootprint.apply(q, k, v)


class HigherOrderMemTracker(MemTracker):
    # the spline's custom op and autograd functions pass through as ordinary ops
    supports_higher_order_operators = True


def estimatePeakMemory(hp, vocabSize, nModels, modelsInPass, fused=True):
    """Estimated peak CUDA memory (bytes) of a training pass of modelsInPass of the nModels models a process
    holds, with every trainable weight's gradient and Adam state alive (the steady state of a step), and a
    breakdown {'weights', 'gradients', 'optimizer', 'activations and temporaries'} of that peak; fused False: with
    FlexAttention's fallback, SDPA and the explicit [T, T] scores, instead of a fused attention kernel.

    The model runs eagerly on fake tensors: torch.compile usually keeps fewer activations, so this errs high."""
    from model import GPT
    with FakeTensorMode():
        # the model as the trainer builds it, but for its attention kernel, which the stand-in replaces
        model = GPT(**modelArguments(hp, vocabSize, "cpu", nModels))
        if fused:
            model.kernel = FusedAttentionStandIn()
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizerStates = [torch.zeros_like(p) for p in trainable for _ in range(2)]
        tokens = torch.zeros(modelsInPass, 1, hp.seqLength + 1, dtype=torch.long)
        tracker = HigherOrderMemTracker()
        tracker.track_external(model, *optimizerStates)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=hp.dtype == "bfloat16")
        with tracker, autocast:
            losses, _ = model(tokens[..., :-1], tokens[..., 1:])
            losses.sum().backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = 2 * gradients
    total = peak["Total"]
    return total, {"weights": weights, "gradients": gradients, "optimizer": optimizer,
                   "activations and temporaries": total - weights - gradients - optimizer}


def fittingModelsPerPass(hp, vocabSize, nModels, freeBytes, fused=True):
    """Models per pass for the fewest passes whose estimated peak fits USABLE_SHARE of freeBytes, balanced (20
    models that fit 19 at a time run as 2 passes of 10, not 19 + 1), and that estimated peak; at least 1."""
    budget = USABLE_SHARE * freeBytes
    peak, _ = estimatePeakMemory(hp, vocabSize, nModels, nModels, fused)
    if peak <= budget:
        return nModels, peak
    low, high, most = 2, nModels - 1, 1  # the peak grows with the models per pass: bisect for the most that fit
    while low <= high:
        middle = (low + high) // 2
        if estimatePeakMemory(hp, vocabSize, nModels, middle, fused)[0] <= budget:
            most, low = middle, middle + 1
        else:
            high = middle - 1
    balanced = -(-nModels // -(-nModels // most))
    return balanced, estimatePeakMemory(hp, vocabSize, nModels, balanced, fused)[0]


def freeForRun(device):
    """The CUDA memory a run on device can still use: what the GPU has free, plus what the caching allocator holds
    in reserve for this process."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)


def fallbackProblem(hp, vocabSize, nModels, modelsPerPass, freeBytes):
    """None when a pass of modelsPerPass models fits USABLE_SHARE of freeBytes with FlexAttention's fallback (SDPA,
    explicit [T, T] scores), else what does not fit and the flag to change."""
    peak, _ = estimatePeakMemory(hp, vocabSize, nModels, modelsPerPass, fused=False)
    if peak <= USABLE_SHARE * freeBytes:
        return None
    line = (f"its fallback, SDPA and explicit [T, T] scores, needs an estimated {peak / 2**30:.1f} GiB per pass of "
            f"{modelsPerPass} model(s), more than the {USABLE_SHARE * freeBytes / 2**30:.1f} GiB usable")
    smaller, smallerPeak = fittingModelsPerPass(hp, vocabSize, nModels, freeBytes, fused=False)
    if smallerPeak <= USABLE_SHARE * freeBytes and smaller < modelsPerPass:
        return line + f": try --modelsPerPass {smaller}"
    return line + ": try a smaller --seqLength or --contextSize"


def chooseModelsPerPass(hp, device, vocabSize, nLocal):
    """The models per pass of a run whose nLocal models and optimizer states are on device, and how they were chosen:
    --modelsPerPass, else on CUDA the most that fit the free memory (fittingModelsPerPass), else all."""
    if hp.modelsPerPass:
        return min(hp.modelsPerPass, nLocal), "given"
    if device.type != "cuda" or nLocal == 1:
        return nLocal, "all models in one pass"
    # the weights and optimizer states are already allocated, and counted in the estimate
    free = freeForRun(device)
    perPass, peak = fittingModelsPerPass(hp, vocabSize, nLocal, free)
    return perPass, f"chosen from the free GPU memory, {free / 2**30:.1f} GiB; estimated peak {peak / 2**30:.1f} GiB"


# ----------------------------------------------------------------------------------------------
# --preflight


CUDA_CONTEXT_BYTES = 2**29  # what the CUDA context takes of a GPU's memory before a run allocates anything


class PreflightError(Exception):
    """A preflight that cannot start (no GPU to check for); the message is one line for the user."""


def parseGpu(spec):
    """'NAME:CAPABILITY:GB' (e.g. '4090-laptop:8.9:16') -> (name, (major, minor), total bytes)."""
    parts = spec.split(":")
    try:
        name, capability, gigabytes = parts
        major, minor = (int(v) for v in capability.split("."))
        total = float(gigabytes) * 2**30
    except ValueError:
        raise PreflightError(f"--preflightGpu {spec!r} must look like NAME:CAPABILITY:GB, e.g. 4090-laptop:8.9:16 "
                             "or h100:9.0:80") from None
    if not name or total <= 0:
        raise PreflightError(f"--preflightGpu {spec!r}: give a name and a memory size in GB > 0")
    return name, (major, minor), total


def targetGpu(hp):
    """(name, capability, free bytes, where the figures come from) of the GPU the run will use."""
    if hp.preflightGpu:
        name, capability, total = parseGpu(hp.preflightGpu)
        return name, capability, total - CUDA_CONTEXT_BYTES, f"--preflightGpu, {total / 2**30:g} GiB less the CUDA context"
    device = pickDevice(hp.device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), free,
                f"this GPU, free of {total / 2**30:.1f} GiB")
    if hp.device == "cpu":
        raise PreflightError("--preflight checks a run on a GPU, and --device cpu names none: drop --device cpu on "
                             "the GPU machine, or name the GPU with --preflightGpu NAME:CAPABILITY:GB (e.g. "
                             "4090-laptop:8.9:16 or h100:9.0:80)")
    raise PreflightError("no GPU here: name the one to check for with --preflightGpu NAME:CAPABILITY:GB "
                         "(e.g. 4090-laptop:8.9:16 or h100:9.0:80)")


class Report:
    """The rows of the preflight table: (check, ok, detail)."""

    def __init__(self):
        self.rows = []
        self.details = []  # lines printed under the table

    def add(self, check, ok, detail):
        self.rows.append((check, ok, detail))
        return ok

    def addDetails(self, lines):
        self.details += lines

    def failures(self):
        return [(check, detail) for check, ok, detail in self.rows if not ok]

    def lines(self):
        width = max(len(check) for check, _, _ in self.rows)
        return [f"{check:<{width}}  {'ok  ' if ok else 'FAIL'}  {detail}" for check, ok, detail in self.rows]


def checkData(hp, report):
    """Rows for the token files; returns (vocabulary size, validation sequences) or None when they are unusable."""
    from lmafs.data.tokenShards import ShardError, listShards, readShardHeader, sequencesInShard
    from lmafs.data.vocabulary import ofShards

    try:
        trFiles = listShards(hp.filesTokensTr, "--filesTokensTr")
        vaFiles = listShards(hp.filesTokensVa, "--filesTokensVa") if hp.filesTokensVa else []
        nTr = sum(readShardHeader(p) for p in trFiles)
        vocabSize = modelVocabSize(trFiles + vaFiles, ofShards(trFiles + vaFiles))
    except ShardError as err:
        report.add("data", False, str(err))
        return None
    wanted = hp.nTokensVa // hp.seqLength
    nValidation = min(wanted, sum(sequencesInShard(readShardHeader(p), hp.seqLength) for p in vaFiles))
    report.add("data", True, f"{len(trFiles)} training files, {nTr:,} tokens; {len(vaFiles)} validation files, "
                             f"{nValidation:,} sequences per evaluation; vocabulary {vocabSize:,}")
    return vocabSize, nValidation


def checkAfFile(hp, vocabSize, report):
    from lmafs.network.afFiles import AfFileError, loadAfsIntoModel
    with torch.device("meta"):  # the checks need the layers and AF types, not the weights
        model = GPT(**modelArguments(hp, vocabSize, "meta", nModels=1))
    try:
        notes = loadAfsIntoModel(model, hp.afFileToLoad, freeze=hp.afLr == 0)
    except AfFileError as err:
        return report.add("AF file", False, str(err))
    return report.add("AF file", True, "; ".join(notes))


def compileSplineKernels(kernels, architecture, dtype, nKnots):
    """Compile (kernel, backend) pairs for sm_<architecture> in a child process, which keeps Triton's report of
    leaked bindings at exit (after Gluon compiles) off the table; returns {(kernel, backend): error} of those that
    did not build."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json, sys\nfrom lmafs.network import splineKernel\nfailed = {}\n"
              "for kernel, backend in json.loads(sys.argv[1]):\n"
              "    try:\n"
              f"        splineKernel.compileForTarget(kernel, backend, {architecture}, {dtype!r}, {nKnots})\n"
              "    except Exception as err:\n"
              "        failed[kernel + ' ' + backend] = type(err).__name__ + ': ' + str(err).strip()[:200]\n"
              "print(json.dumps(failed))\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script, json.dumps(kernels)], capture_output=True, text=True, cwd=repo)
    if done.returncode != 0 or not done.stdout.strip():
        lines = done.stderr.strip().splitlines()
        return {tuple(pair): f"the compile check crashed: {lines[-1] if lines else done.returncode}" for pair in kernels}
    return {tuple(key.split(" ")): error for key, error in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def checkSplineKernels(hp, capability, report):
    """Which spline kernels will run, each compiled here for the GPU's architecture (Triton needs no GPU for it)."""
    from activationFunctions import SPLINE_TYPES, splineBackends

    kinds = [name for name in splitAfType(hp.afType) if name in SPLINE_TYPES]
    if not kinds:
        return report.add("spline kernels", True, "no spline in this afType")
    if "spline" not in kinds:
        return report.add("spline kernels", True, "PyTorch (the Triton kernels serve shared splines, not splinePerDim)")
    try:
        from lmafs.network import splineKernel
    except ImportError:
        return report.add("spline kernels", False, "Triton is not installed, so the spline would run on PyTorch's "
                                                   "slow path: pip install triton (CUDA builds of PyTorch bring it)")
    dtype = torch.bfloat16 if hp.dtype == "bfloat16" else torch.float32
    offered = splineBackends("cuda", hp.afNAnchors, dtype=dtype)
    architecture = 10 * capability[0] + capability[1]
    candidates = {"forward": splineKernel.FORWARD_KERNELS, "backward": splineKernel.BACKWARD_KERNELS}
    tried = [(kernel, backend) for kernel, names in candidates.items()
             for backend in (names[names.index(offered[kernel]):] if offered[kernel] in names else ())]
    failures = compileSplineKernels(tried, architecture, "bf16" if dtype == torch.bfloat16 else "fp32", hp.afNAnchors)
    chosen, notes = {}, []
    for kernel, backend in tried:
        if kernel in chosen:
            continue
        if (kernel, backend) in failures:
            notes.append(f"{kernel} {backend} does not build for sm_{architecture} ({failures[kernel, backend]})")
        else:
            chosen[kernel] = backend
    for kernel in candidates:
        chosen.setdefault(kernel, "torch")
    missing = {name: features for name, features in splineKernel.MISSING_FEATURES.items() if features}
    notes += [f"this Triton lacks {', '.join(features)} for {name}" for name, features in missing.items()]
    detail = (f"forward {chosen['forward']}, backward {chosen['backward']}, compiled here for sm_{architecture}"
              + "".join(f"; {note}" for note in notes))
    slow = [kernel for kernel, backend in chosen.items() if backend == "torch"]
    if slow:
        detail += f"; the {' and '.join(slow)} would run on PyTorch's slow path"
    return report.add("spline kernels", not slow, detail)


def checkFlexAttention(hp, capability, report):
    from lmafs.network.attention import describeFlexAttention

    plan = describeFlexAttention(capability, torch.bfloat16 if hp.dtype == "bfloat16" else torch.float32,
                                 hp.dimEmb // hp.nHeads, hp.flexBlockSize)
    usable = [sum(c.usable for c in configs) for configs in (plan.forward, plan.backward)]
    verdict = {True: "compiles", False: "will not compile: choose a smaller --flexBlockSize",
               None: "not known for this GPU; if it fails at the first step the run falls back to SDPA"}[plan.compiles]
    report.add("FlexAttention", plan.compiles is not False,
               f"mask block {plan.maskBlockSize}, tiles {hp.flexBlockSize}; inductor's configs usable: "
               f"{usable[0]} forward, {usable[1]} backward; {verdict}")
    report.addDetails(["", "FlexAttention:"] + plan.lines())


def runPreflight(hp, forced):
    """Check a configured run, whose flags passed flagChecks.checkFlags (forced: the values it forced), without training
    and print one table; returns the exit code (0: it will fit and compile), after one line on stderr naming what
    will not."""
    import sys

    report = Report()
    try:
        report.add("flags", True, f"{hp.nModels} model(s), {hp.nLayers} x {hp.dimEmb}, seqLength {hp.seqLength}, "
                                  f"{hp.dtype}, afType {hp.afType!r}" + "".join(f"; forced {f}" for f in forced))
        name, capability, free, origin = targetGpu(hp)
    except PreflightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Preflight of run '{hp.runName}' for {name} (compute capability {capability[0]}.{capability[1]}, "
          f"{free / 2**30:.1f} GiB free: {origin})")
    data = checkData(hp, report)
    if data is not None:
        vocabSize, nValidation = data
        if hp.afFileToLoad:
            checkAfFile(hp, vocabSize, report)
        if hp.modelsPerPass:
            perPass = min(hp.modelsPerPass, hp.nModels)
            peak, breakdown = estimatePeakMemory(hp, vocabSize, hp.nModels, perPass)
            how = "given"
        else:
            perPass, peak = fittingModelsPerPass(hp, vocabSize, hp.nModels, free)
            breakdown = estimatePeakMemory(hp, vocabSize, hp.nModels, perPass)[1]
            how = "chosen: the most that fit" if perPass < hp.nModels else "chosen: all models fit in one pass"
        budget = USABLE_SHARE * free
        report.add("peak memory per pass", peak <= budget,
                   f"{peak / 2**30:.2f} GiB estimated of {budget / 2**30:.2f} usable ({USABLE_SHARE:.0%} of free): "
                   + ", ".join(f"{part} {value / 2**30:.2f}" for part, value in breakdown.items()))
        report.add("modelsPerPass", True, f"{perPass} ({how}; {-(-hp.nModels // perPass)} pass(es) per "
                                          f"accumulation step)")
        checkSplineKernels(hp, capability, report)
        checkFlexAttention(hp, capability, report)
        startSteps = modelStartSteps(hp)
        variants = shapeVariants(runPasses(startSteps, 0, lambda n: n, perPass), hp.nModels, nValidation,
                                 hp.seqLength, statistics=hp.plottingLevel >= 1)
        try:
            backend = compileBackend(hp, torch.device("cuda"))
            report.add("compiled graphs", True,
                       f"{backend or 'none (eager)'}: {len(variants)} before step 1 — " + ", ".join(
                           f"{kind} {n} model(s) from {first}" + (f" x {batch} sequences" if batch > 1 else "")
                           for kind, first, n, batch in variants) if backend else "none: the model runs eagerly")
        except ConfigError as err:
            report.add("compiled graphs", False, str(err))
    print("\n".join(report.lines() + report.details))
    failures = report.failures()
    if failures:
        check, detail = failures[0]
        print(f"preflight: {check} will not work: {detail}", file=sys.stderr)
        return 1
    print("preflight: the run will fit and compile")
    return 0
