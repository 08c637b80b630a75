"""The GPU acceptance check: one command that runs the CUDA paths end to end and writes one Markdown report.

    python bench/gpuCheck.py                    # about 8 minutes on one H100; the report path is printed
    python bench/gpuCheck.py --dryRun           # the planned checks and their commands; needs no GPU
    python bench/gpuCheck.py --only phase2      # rerun some checks (and what they need)

It runs, in order of importance: tests/test_cuda.py; the README's baseline, 20-model phase I and phase II at the
default size (4 layers x 256, seqLength 4096, contextSize 1024) and default --plottingLevel 2, a few dozen steps
each; every attention score type in phase I (4 models) and II; bfloat16 (phase I, 4 models); phase I under torchrun's
launcher with one process (no collectives); --preflight's memory estimate against the measured peak;
bench/benchSpline.py, benchScores.py and benchPhase1.py. From the logs it
takes tokens/s and the model-FLOPs utilisation (MFU) against the GPU's peak dense TF32 and bf16 throughput.
Training data are random GPT-2 token ids written as FineWeb shards (the GPU box needs no data and no network).

Checks that time something run alone on the GPU; the others run side by side (--jobs). Every check has a timeout,
and the whole run a budget (--budget): what does not fit is marked "not run (time)" and the verdict is then
INCOMPLETE unless something failed. The report is rewritten after every check, so an interrupted run keeps what
it measured. --dryRun also prints the graphs each check compiles and the plan's estimated compile time.
Exit code: 0 PASS, 1 FAIL, 3 INCOMPLETE, 2 bad input or no GPU.
"""
import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lmafs.study import scheduler  # noqa: E402
from lmafs.atomicFiles import atomicWriteText  # noqa: E402
from lmafs.cliErrors import OneLineErrorParser  # noqa: E402
from plotting import parseLog  # noqa: E402
from lmafs.run.runFiles import RunFiles  # noqa: E402
from lmafs.data.tokenShards import writeShard  # noqa: E402

SCORE_TYPES = ("softplus", "sigmoid", "spline")  # softmax is what the plain runs use
DEFAULT_BUDGET = 460  # seconds: 8 minutes, less the data, the GPU probe and the report
SEPARATOR = 50256  # GPT-2's <|endoftext|>, the trainer's default --tokenDocSep
VALIDATION_TOKENS = 16 * 4096  # 16 sequences per validation, instead of the default 2,560, to fit the time
SMALL_PHASE1 = 4  # models of the checks that prove kernels compile and train, not phase I's memory
# Seconds to compile one graph before step 1 on an H100 with a cold inductor cache: a process's first graph (dynamo,
# AOT autograd, inductor, the Triton kernels), each further graph of the process (most kernels already built), and
# a graph inductor's cache already holds from an earlier check. Estimates, not measured: no GPU report yet.
COMPILE_SECONDS = {"first": 30, "next": 10, "cached": 3}

# Peak dense (no 2:4 sparsity) tensor-core throughput, TFLOPS: (pattern in torch.cuda.get_device_name(), label,
# TF32, bf16 with float32 accumulation). First match wins; a GPU matching none gets MFU "unknown".
# Sources: H100 SXM/H200: glennklockwood.com/garden/processors/h100 (TF32 494.7, BF16 989.4; "H200 GPUs are the
# same as H100 GPUs ... with 144 GB"); H100 PCIe: NVIDIA's H100 table at archive-lib.hpctech.co.jp/gpuproduct/
# nvidia-h100.html (TF32 756, BF16 1,513 "shown with sparsity, 1/2 lower without"); A100 (SXM and PCIe alike):
# glennklockwood.com/garden/processors/A100, from NVIDIA's A100 datasheet (TF32 156, BF16 312 dense); RTX 4090:
# waredb.com/processor/nvidia-geforce-rtx-4090 (TF32 82.58, BF16 165.15 dense); L40S: NVIDIA's L40/L40S table at
# mullet.se/product.html?product_id=355414 (TF32 183, BF16 362.05 dense). NVL and laptop parts differ: unknown.
PEAK_TFLOPS = (
    (r"H200(?!.*NVL)", "H200 (SXM)", 494.7, 989.4),
    (r"H100.*(SXM|HBM3)", "H100 SXM", 494.7, 989.4),
    (r"H100.*PCIe", "H100 PCIe", 378.0, 756.5),
    (r"A100", "A100", 156.0, 312.0),
    (r"RTX 4090(?!.*Laptop)", "RTX 4090", 82.58, 165.15),
    (r"L40S", "L40S", 183.0, 362.05),
)


class CheckError(Exception):
    """Bad input or an unusable machine; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass
class Settings:
    """What a run of this script uses: its flags resolved, and the folders and GPU it works with."""
    out: str
    workDir: str
    dataDir: str
    quick: bool
    only: list
    budget: float
    jobs: int
    dryRun: bool
    gpu: dict
    argv: list = dataclasses.field(default_factory=list)  # the flags given, for the report
    python: str = sys.executable

    @property
    def steps(self):
        """(nSteps, nStepsWarmup, nStepsCooldown, valEvery/plotEvery): the default 20000/2000/10000 scaled down, and
        reports and validations often enough that several of each happen (reports at 1, 6, every plotEvery, last)."""
        return (12, 1, 6, 5) if self.quick else (30, 3, 15, 10)


def parseArgs(argv):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="", help="report path (.md); default bench/gpuCheck-DATE-GPU.md. The runs' "
                                                  "logs, plots and data go to a folder next to it (REPORT-files/)")
    parser.add_argument("--quick", action="store_true", help="12 steps per run instead of 30")
    parser.add_argument("--only", default="", help="comma-separated check names to run (plus the checks they need); "
                                                   "--dryRun lists the names")
    parser.add_argument("--dryRun", action="store_true", help="print the planned checks and commands; needs no GPU")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help="seconds for all checks; what does not fit is reported as not run (time)")
    parser.add_argument("--jobs", type=int, default=0, help="checks that run side by side (those that time nothing); "
                                                            "0: one per 20 GiB of GPU memory, at most 4")
    return parser.parse_args(argv)


def reportSlug(text):
    """text as a piece of the report's file name: each run of other characters than letters and digits becomes one
    '-' (' H100 80GB HBM3' -> 'H100-80GB-HBM3'); 'GPU' if nothing is left."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "GPU"


def resolveSettings(args, gpu, argv=()):
    """Settings from the parsed flags; raises CheckError naming a bad one."""
    if not args.budget > 0:
        raise CheckError(f"--budget must be a positive number of seconds, got {args.budget:g}")
    if args.jobs < 0:
        raise CheckError(f"--jobs must be 0 (automatic) or a positive number, got {args.jobs}")
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    # a rerun of some checks gets a report of its own instead of overwriting the full one
    stem = f"gpuCheck-{datetime.date.today():%Y-%m-%d}-{reportSlug(gpu.get('name', 'GPU').replace('NVIDIA', ''))}"
    out = args.out or os.path.join(REPO, "bench", stem + (f"-only-{reportSlug('-'.join(only))}" if only else "") + ".md")
    out = os.path.abspath(out)
    if not out.endswith(".md"):
        raise CheckError(f"--out {args.out!r} must name a Markdown file ending in .md")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise CheckError(f"--out {args.out!r}: the folder {folder} does not exist; create it or choose another path")
    if not args.dryRun and not os.access(folder, os.W_OK):
        raise CheckError(f"--out {args.out!r}: the folder {folder} is not writable; choose another path")
    # a dry run, without a GPU, plans for the H100 the budget is set for
    jobs = args.jobs or max(1, min(4, int(gpu.get("memoryGiB", 80) // 20)))
    workDir = out[:-len(".md")] + "-files"
    return Settings(out=out, workDir=workDir, dataDir=os.path.join(workDir, "data"), quick=args.quick, only=only,
                    budget=args.budget, jobs=jobs, dryRun=args.dryRun, gpu=gpu, argv=list(argv))


PROBE = """import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
if info["available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, capability=f"{p.major}.{p.minor}", memoryGiB=p.total_memory / 2**30,
                count=torch.cuda.device_count())
print(json.dumps(info))
"""


def probeGpu(python=sys.executable):
    """The GPU as PyTorch sees it, asked in a child process so that this one holds no CUDA context (whose memory
    would shrink what the runs find free); raises CheckError without one."""
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise CheckError("PyTorch did not answer within 120 s whether a CUDA GPU is present") from None
    if done.returncode != 0 or not done.stdout.strip():
        lines = done.stderr.strip().splitlines()
        raise CheckError(f"PyTorch cannot be imported: {lines[-1] if lines else done.returncode}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    if not info["available"]:
        build = f"CUDA {info['cuda']}" if info["cuda"] else "a CPU-only build"
        raise CheckError(f"no CUDA GPU is visible to PyTorch (torch {info['torch']}, {build}): gpuCheck needs one; "
                         "--dryRun prints what it would run")
    return info


# ----------------------------------------------------------------------------------------------
# Data: random GPT-2 token ids in the FineWeb shard format


def writeRandomData(folder, nTrain, nValidation, seed=0):
    """One validation and one training shard of random GPT-2 ids in documents of ~1000 tokens (FineWeb's mean);
    the separator is GPT-2's largest id, so the vocabulary is the default run's 50,304."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in (("fineweb_val_000000.bin", nValidation), ("fineweb_train_000001.bin", nTrain)):
        tokens = rng.integers(0, SEPARATOR, count)
        tokens[rng.random(count) < 1e-3] = SEPARATOR
        tokens[0] = SEPARATOR
        writeShard(os.path.join(folder, name), tokens)


def tokensNeeded(settings):
    """Training tokens for the largest run: 20 models each reading nSteps sequences of 4097 tokens (a stream may
    also wrap around, but distinct data keeps the losses honest)."""
    return 20 * settings.steps[0] * 4097 + 4096


# ----------------------------------------------------------------------------------------------
# The checks


@dataclasses.dataclass
class Check:
    name: str
    what: str
    command: list
    evaluate: object  # (check, run) -> Result
    timeout: float
    alone: bool = False  # it times something: nothing else runs meanwhile
    needs: tuple = ()  # checks that must pass first
    runDir: str = ""  # trainLmAf checks: their --dirResults
    runName: str = ""
    nSteps: int = 0
    expectFiles: tuple = ()  # file names the run must write in runDir
    splines: bool = False  # the afType has splines: their Triton kernels must run
    graphs: tuple = ()  # keys of the graphs it compiles, in order; equal keys are the same graph


@dataclasses.dataclass
class Run:
    """How a check's process ended."""
    returnCode: int  # negative: killed by that signal
    output: str
    seconds: float
    stopped: str = ""  # "timeout" (its own limit) or "budget" (the whole run's)


@dataclasses.dataclass
class Result:
    status: str  # PASS, FAIL, "not run (time)", "skipped"
    problems: list = dataclasses.field(default_factory=list)  # why it failed
    figures: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)  # observations that do not fail it
    seconds: float = 0.0
    output: str = ""


def trainArgs(settings, runName, flags):
    """A trainLmAf.py command line: the README's flags, plus the scaled-down schedule and this check's folders."""
    nSteps, warmup, cooldown, every = settings.steps
    return (["trainLmAf.py"] + flags
            + ["--runName", runName, "--dirResults", os.path.join(settings.workDir, runName),
               "--filesTokensTr", os.path.join(settings.dataDir, "fineweb_train_*.bin"),
               "--filesTokensVa", os.path.join(settings.dataDir, "fineweb_val_*.bin"), "--nTokensVa",
               str(VALIDATION_TOKENS), "--nSteps", str(nSteps), "--nStepsWarmup", str(warmup), "--nStepsCooldown",
               str(cooldown), "--valEvery", str(every), "--plotEvery", str(every), "--device", "cuda"])


def phase1Flags(afType="spline;att-spline", nModels=20):
    """The README's phase I; with fewer models, all start at step 0: one training graph instead of three."""
    return ["--seed", "1234", "--nModels", str(nModels), "--staggeredStarts", "1" if nModels == 20 else "0",
            "--afLayerSpecific", "0", "--afType", afType, "--afLr", "0.1"]


def phase2Flags(settings, phase1Run, afType="spline;att-spline"):
    return ["--seed", "0", "--afLayerSpecific", "0", "--afType", afType, "--afLr", "0", "--afFileToLoad",
            ptAfPath(settings, phase1Run)]


def ptAfPath(settings, runName):
    return RunFiles(os.path.join(settings.workDir, runName), runName).afFile(settings.steps[0])


def trainCheck(settings, name, what, flags, timeout, alone=False, needs=(), launcher=None, writesAfs=False):
    nSteps = settings.steps[0]
    afType = flags[flags.index("--afType") + 1]
    command = (launcher or [settings.python]) + trainArgs(settings, name, flags)
    expect = (os.path.basename(RunFiles("", name).afFile(nSteps)),) if writesAfs else ()
    # the Triton kernels serve the MLP and pre-QKV splines ('spline'; splinePerDim runs on PyTorch)
    splines = "spline" in [part.strip().removeprefix("att-") for part in afType.split(";")[:2]]
    return Check(name, what, command, evaluateTraining, timeout, alone, needs, os.path.join(settings.workDir, name),
                 name, nSteps, expect, splines, trainGraphs(command))


def trainGraphs(command):
    """Keys of the graphs a trainLmAf.py command compiles before step 1, as its preflight table counts them, on a GPU
    where one pass holds all models (an H100 holds the default 20)."""
    from lmafs.run.runPlan import modelStartSteps, runPasses, shapeVariants
    from trainLmAf import parseArgs
    hp, _ = parseArgs(command[command.index("trainLmAf.py") + 1:])
    passes = runPasses(modelStartSteps(hp), 0, lambda n: n, hp.nModels)
    variants = shapeVariants(passes, hp.nModels, hp.nTokensVa // hp.seqLength, hp.seqLength,
                             statistics=hp.plottingLevel >= 1)
    model = (hp.afType, hp.dtype, hp.nModels, hp.afLayerSpecific, hp.afLr != 0, hp.seqLength, hp.contextSize)
    return tuple(model + variant for variant in variants)


def planChecks(settings):
    """Every check in the order they start: first the timed runs, alone, then the rest side by side in order of
    importance, then the benchmarks, alone (the first to be dropped when time runs out). Timeouts are for an H100,
    with room for a cold compile cache."""
    py = settings.python
    checks = [
        Check("preflight", "--preflight of the default phase I: estimate, modelsPerPass, kernels",
              [py] + trainArgs(settings, "phase1", phase1Flags()) + ["--preflight", "1"], evaluatePreflight, 180,
              alone=True),  # alone: it reads the free GPU memory, as phase1 will
        trainCheck(settings, "baseline", "README baseline: gelu;att-linear, 1 model", ["--seed", "0", "--afType",
                   "gelu;att-linear"], 300, alone=True),
        trainCheck(settings, "phase1", "README phase I: 20 models, spline;att-spline, staggered starts",
                   phase1Flags(), 360, alone=True, writesAfs=True),
        # test_cuda.py's graphs: a tiny phase I's four, its resume's two again, FlexAttention compiled alone in two
        Check("testCuda", "tests/test_cuda.py (pytest)", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                          "tests/test_cuda.py"], evaluatePytest, 420,
              graphs=tuple(("testCuda", graph) for graph in (0, 1, 2, 3, 2, 3, 4, 5))),
        trainCheck(settings, "phase2", "README phase II: loads phase1's ptAf file, AFs frozen",
                   phase2Flags(settings, "phase1"), 300, needs=("phase1",)),
    ]
    for score in SCORE_TYPES:
        afType = f"spline;att-spline;score-{score}"
        checks.append(trainCheck(settings, f"phase1-{score}", f"phase I, {SMALL_PHASE1} models, {afType}",
                                 phase1Flags(afType, SMALL_PHASE1), 300, writesAfs=True))
        checks.append(trainCheck(settings, f"phase2-{score}", f"phase II of {afType}, loads phase1-{score}'s file",
                                 phase2Flags(settings, f"phase1-{score}", afType), 300, needs=(f"phase1-{score}",)))
    checks += [
        trainCheck(settings, "bf16", f"phase I, {SMALL_PHASE1} models, --dtype bfloat16",
                   phase1Flags(nModels=SMALL_PHASE1) + ["--dtype", "bfloat16"], 300),
        # torchrun's own module, run by this Python: the same as the torchrun script, found on any PATH. One process
        # is no process group: this proves the launcher and its environment, not the collectives; phase I's graphs
        # come from inductor's cache
        trainCheck(settings, "torchrun-launcher", "README phase I under torchrun's launcher, one process (WORLD_SIZE "
                   "1: no process group, no collectives)", phase1Flags(), 300, needs=("phase1",),
                   launcher=[py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]),
        Check("benchSpline", "bench/benchSpline.py: spline forward+backward vs GELU, each backend",
              [py, "bench/benchSpline.py", "--device", "cuda"], evaluateBenchSpline, 180, alone=True,
              graphs=(("benchSpline", "compiled spline"),)),
        Check("benchScores", "bench/benchScores.py: compiled FlexAttention forward+backward per score type vs "
              "softmax", [py, "bench/benchScores.py", "--device", "cuda"], evaluateBench, 240, alone=True,
              graphs=tuple(("benchScores", score) for score in ("softmax",) + SCORE_TYPES)),
        # the memory rows of one size only: the preflight check compares the estimate with phase I's peak already
        Check("benchPhase1", "bench/benchPhase1.py: batched vs looped phase I s/step, memory, tokens/s",
              [py, "bench/benchPhase1.py", "--device", "cuda", "--memoryModels", "20"]
              + (["--steps", "3"] if settings.quick else []), evaluateBench, 420, alone=True,
              graphs=tuple(("benchPhase1", graph) for graph in ("batched", "looped", "batched", "float32",
                                                                 "bfloat16"))),
    ]
    return checks


def compilePlan(checks, jobs):
    """(graphs, cold, seconds per check, seconds): the graphs the checks compile, those inductor's cache does not hold
    from an earlier check that is done by then (one that ran alone before it, or one it needs, or itself), the
    estimated compile seconds of each check, and of the plan: the alone checks one after another, the others
    spread over `jobs` at a time."""
    done, cold, perCheck = set(), 0, {}
    for check in checks:
        seen, seconds = set(done) | {key for name in check.needs for key in byName(checks, name).graphs}, 0
        for key in check.graphs:
            if key in seen:
                seconds += COMPILE_SECONDS["cached"]
            else:
                seconds += COMPILE_SECONDS["next" if seconds else "first"]
                cold += 1
            seen.add(key)
        perCheck[check.name] = seconds
        if check.alone:
            done |= seen
    lanes = [0.0] * max(1, jobs)
    for check in sorted((c for c in checks if not c.alone), key=lambda c: -perCheck[c.name]):
        lanes[lanes.index(min(lanes))] += perCheck[check.name]
    total = sum(perCheck[c.name] for c in checks if c.alone) + max(lanes)
    return sum(len(c.graphs) for c in checks), cold, perCheck, total


def byName(checks, name):
    return next(check for check in checks if check.name == name)


def selectChecks(checks, only):
    """The checks named in --only and, transitively, those they need, in plan order; raises CheckError for an
    unknown name."""
    if not only:
        return checks
    byName = {check.name: check for check in checks}
    unknown = [name for name in only if name not in byName]
    if unknown:
        raise CheckError(f"--only: unknown check {unknown[0]!r}; the checks are {', '.join(byName)}")
    wanted, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(byName[name].needs)
    return [check for check in checks if check.name in wanted]


# ----------------------------------------------------------------------------------------------
# Parsing outputs (the training logs: plotting.parseLog)

NUMBER = r"([-+]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|nan|inf))"


def readMetrics(path):
    """metrics-RUN.csv's training rows as {step: (trainSeconds, {model: tokens})}."""
    reports = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "train":
                _, tokens = reports.setdefault(int(row["step"]), (float(row["trainSeconds"]), {}))
                tokens[int(row["model"])] = int(row["tokens"])
    return reports


def throughput(reports):
    """Training tokens per second of all models together between the first report and the last, or None with
    fewer than two reports. The first report's window holds step 1, whose first launches still warm up kernels,
    so it is left out; the metrics file's trainSeconds has millisecond resolution, the log's s/step two digits."""
    steps = sorted(reports)
    if len(steps) < 2:
        return None
    (firstSeconds, firstTokens), (lastSeconds, lastTokens) = reports[steps[0]], reports[steps[-1]]
    tokens = sum(count - firstTokens.get(model, 0) for model, count in lastTokens.items())
    seconds = lastSeconds - firstSeconds
    return {"tokens": tokens, "seconds": seconds, "tokensPerSecond": tokens / seconds if seconds > 0 else None,
            "fromStep": steps[0], "toStep": steps[-1]}


def effectiveContext(seqLength, contextSize):
    """Mean number of keys a query attends under the causal sliding window (query i sees min(i + 1, window) keys;
    document boundaries, which only remove keys, are not counted: the model FLOPs of the configuration)."""
    window = min(contextSize, seqLength)
    return (window * (window + 1) / 2 + (seqLength - window) * window) / seqLength


def flopsPerToken(parameters, vocabSize, nLayers, dimEmb, seqLength, contextSize):
    """Training FLOPs per token: 6 x (parameters outside the embedding and head + vocab x dim, the head's matmul)
    + 12 x nLayers x dimEmb x effective context (attention scores and values, forward and backward)."""
    body = sum(count for name, count in parameters.items() if name not in ("embed", "head"))
    matmulParameters = body + vocabSize * dimEmb
    return 6 * matmulParameters + 12 * nLayers * dimEmb * effectiveContext(seqLength, contextSize), matmulParameters


def peakTflops(gpuName):
    """(label, TF32 TFLOPS, bf16 TFLOPS) of a known GPU, or None."""
    for pattern, label, tf32, bf16 in PEAK_TFLOPS:
        if re.search(pattern, gpuName):
            return label, tf32, bf16
    return None


def mfu(tokensPerSecond, flops, peak):
    """Model-FLOPs utilisation (fraction) against a peak in TFLOPS."""
    return tokensPerSecond * flops / (peak * 1e12)


def pytestCounts(output):
    """{outcome: count} from pytest's last summary line ('3 passed, 1 skipped in 12.3s')."""
    for line in reversed(output.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line)
        if found and re.search(r" in [\d.]+s", line):
            counts = {}
            for count, outcome in found:
                counts[outcome.rstrip("s") if outcome.startswith("error") else outcome] = int(count)
            return counts
    return {}


def benchRatio(output):
    match = re.search(rf"^ratio {NUMBER}\s*$", output, re.MULTILINE)
    return float(match.group(1)) if match else None


def tail(text, lines=40):
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------
# Evaluating a finished check


def processProblems(run):
    if run.stopped == "timeout":
        return [f"timed out after {run.seconds:.0f} s"]
    if run.returnCode != 0:
        return [f"exit code {run.returnCode}"]
    return []


def evaluateTraining(check, run):
    problems, figures = processProblems(run), {}
    files = RunFiles(check.runDir, check.runName)
    logPath = files.log
    if not os.path.isfile(logPath):
        return Result("FAIL", problems + [f"no log file {logPath}"])
    log = parseLog(logPath)
    n = check.nSteps
    lossTr = [(step, loss) for step, model, loss, _ in log["train"] if model == 0]
    for losses, label in ((lossTr, "lossTr"), (log["val"], "lossVa"), (log["peakMemory"], "Peak CUDA memory")):
        if not losses:
            problems.append(f"the log has no {label} line")
    if not log["actMean"] + log["actMax"]:
        problems.append("the log has no Activation magnitudes line (AF-input statistics at --plottingLevel 2)")
    if lossTr and lossTr[-1][0] != n:
        problems.append(f"the last lossTr line is at step {lossTr[-1][0]}, not {n}")
    missingPeaks = sorted({6, 11, n} - {step for step, _ in log["peakMemory"]})
    if log["peakMemory"] and missingPeaks:
        problems.append(f"no Peak CUDA memory line at step(s) {', '.join(map(str, missingPeaks))}")
    losses = ([("lossTr", s, v) for s, v in lossTr] + [("lossVa", s, v) for s, v, _ in log["val"]]
              + [(f"model {m} lossTr", s, v) for s, m, v, _ in log["train"] if m > 0])
    bad = [(what, step, value) for what, step, value in losses if not math.isfinite(value)]
    if bad:
        problems.append(f"non-finite loss: {bad[0][0]} {bad[0][2]} at step {bad[0][1]} ({len(bad)} in all)")
    attention = [line for line in log["kernels"] if line.startswith("Attention:")]
    if not any("FlexAttention" in line for line in attention):
        problems.append(f"attention did not run in FlexAttention: {attention[0] if attention else 'no Attention line'}")
    problems += log["fallbacks"]
    problems += [f"the scores did not run in FlexAttention: {line}" for line in log["kernels"]
                 if line.startswith("Attention weights:") and "FlexAttention" not in line]
    splineLines = [line for line in log["kernels"] if line.startswith("Spline kernels:")]
    if check.splines and (not splineLines or re.search(r"\btorch\b", splineLines[0])):
        problems.append(f"the spline kernels did not run in Triton: {splineLines[0] if splineLines else 'no line'}")
    # a Triton kernel that fails later warns (on stderr, not in the log) and hands over to the next backend
    switches = re.findall(r"spline \w+ kernel \S+ failed.*", run.output)
    problems += [f"during the run: {line}" for line in switches if line.rstrip().endswith("now uses torch")]
    notes = [f"during the run: {line}" for line in switches if not line.rstrip().endswith("now uses torch")]
    for name in check.expectFiles:
        if not os.path.isfile(os.path.join(check.runDir, name)):
            problems.append(f"{name} was not written")
    plots = [f for f in os.listdir(check.runDir) if f.endswith(".png")]
    if not any(f.startswith(f"tr-{check.runName}") for f in plots):
        problems.append("no loss plot (tr-*.png) was written")
    figures.update(log=log, peakGiB=max((v for _, v in log["peakMemory"]), default=None),
                   lossTr=lossTr[-1][1] if lossTr else None,
                   lossVa=log["val"][-1][1] if log["val"] else None)
    if os.path.isfile(files.metrics):
        figures["throughput"] = throughput(readMetrics(files.metrics))
    return Result("FAIL" if problems else "PASS", problems, figures, notes=notes)


def evaluatePytest(check, run):
    problems = processProblems(run)
    counts = pytestCounts(run.output)
    if not counts:
        problems.append("no pytest summary line")
    elif counts.get("failed") or counts.get("error"):
        problems.append(f"{counts.get('failed', 0)} failed, {counts.get('error', 0)} error(s)")
    elif not counts.get("passed"):
        problems.append("no test passed (were they all skipped? then PyTorch saw no GPU)")
    return Result("FAIL" if problems else "PASS", problems, {"counts": counts})


def evaluatePreflight(check, run):
    problems = processProblems(run)
    estimate = re.search(r"^peak memory per pass\s+(?:ok|FAIL)\s+([\d.]+) GiB estimated", run.output, re.MULTILINE)
    perPass = re.search(r"^modelsPerPass\s+(?:ok|FAIL)\s+(\d+)", run.output, re.MULTILINE)
    if "the run will fit and compile" not in run.output:
        problems.append("the preflight did not say 'the run will fit and compile'")
    if not estimate or not perPass:
        problems.append("no 'peak memory per pass' or 'modelsPerPass' row")
    figures = {"estimateGiB": float(estimate.group(1)) if estimate else None,
               "modelsPerPass": int(perPass.group(1)) if perPass else None,
               "table": [line for line in run.output.splitlines() if re.match(r"^\S.*\s(ok  |FAIL)\s", line)]}
    return Result("FAIL" if problems else "PASS", problems, figures)


def evaluateBench(check, run):
    problems = processProblems(run)
    ratio = benchRatio(run.output)
    if ratio is None or not math.isfinite(ratio):
        problems.append("no finite 'ratio X' line")
    failures = [line for line in run.output.splitlines() if line.startswith("note:") and " failed: " in line]
    problems += failures
    return Result("FAIL" if problems else "PASS", problems, {"ratio": ratio})


def evaluateBenchSpline(check, run):
    """Also: what a model calls (splineActivation) ran in Triton, and every row's knot gradient agrees with the
    bucketize reference (relative difference at most 1e-2, bf16 inputs and atomics included)."""
    result = evaluateBench(check, run)
    rows = re.findall(r"^(\S.*?)\s{2,}(torch|triton-\S+)\s+(torch|triton-\S+)\s+[\d.]+\s+[\d.]+(?:\s+([-+.\de]+))?\s*$",
                      run.output, re.MULTILINE)
    model = [row for row in rows if row[0] == "splineActivation"]
    if not model:
        result.problems.append("no splineActivation row")
    elif "torch" in model[0][1:3]:
        result.problems.append(f"splineActivation ran forward {model[0][1]}, backward {model[0][2]}: not Triton")
    result.problems += [f"{name}: knot gradient differs from bucketize's by {error} (relative)"
                        for name, _, _, error in rows if error and float(error) > 1e-2]
    result.status = "FAIL" if result.problems else "PASS"
    return result


# ----------------------------------------------------------------------------------------------
# Running the checks


class Runner:
    """The checks on the scheduler compareAfs.py's studies use too (scheduler.py): each a process in its own session
    (torchrun and pytest start children of their own) with its output in WORKDIR/NAME.out, --jobs side by side on
    the GPU, alone checks with the GPU to themselves; a check's result comes from its output when it ends."""

    def __init__(self, settings, checks, say=print, minimumStart=20, onResult=None):
        self.settings, self.checks, self.say = settings, checks, say
        self.onResult = onResult  # called with the results so far after every check, so a report keeps them
        self.minimumStart = minimumStart  # seconds of budget below which no check starts: none would finish
        self.results = {}
        self.byName = {check.name: check for check in checks}

    def outPath(self, check):
        return os.path.join(self.settings.workDir, f"{check.name}.out")

    def runAll(self):
        os.makedirs(self.settings.workDir, exist_ok=True)
        # inductor's caches (on by default; a user's setting wins) let a check reuse the graphs an earlier one compiled
        env = {name: "1" for name in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")
               if name not in os.environ}
        tasks = [scheduler.Task(check.name, check.command, after=check.needs, alone=check.alone,
                                timeout=check.timeout, stdout=self.outPath(check), stderr=scheduler.STDOUT,
                                env={**env, "PYTHONUNBUFFERED": "1"}, cwd=REPO) for check in self.checks]
        slots = [scheduler.Slot(f"slot {index + 1}", {}) for index in range(self.settings.jobs)]
        self.local = scheduler.LocalScheduler(slots, self, interrupt="stop", budget=self.settings.budget,
                                              minimumStart=self.minimumStart, poll=0.5)
        self.local.run(tasks)
        return self.results

    def onStart(self, task, slot):
        self.say(f"[{self.local.elapsed():5.0f}s] start {task.name}: {shlex.join(task.argv)}")

    def onFinish(self, task, outcome):
        """The check's Result; True when it passed (the checks that need it may start)."""
        check = self.byName[task.name]
        budget = f"the --budget of {self.settings.budget:g} s"
        if outcome.skipped == "budget":
            self.results[check.name] = Result("not run (time)", [f"{budget} ran out before it started"])
            return False
        if outcome.skipped == "after":
            failed = outcome.failedBefore
            timeOnly = all(self.results[name].status == "not run (time)" for name in failed)
            self.results[check.name] = Result("not run (time)" if timeOnly else "skipped",
                                              [f"needs {', '.join(failed)}, which did not pass"])
            return False
        with open(self.outPath(check), errors="replace") as f:
            output = f.read()
        run = Run(outcome.returncode, output, outcome.seconds, outcome.stopped)
        if outcome.stopped == "budget":
            result = Result("not run (time)", [f"stopped after {outcome.seconds:.0f} s: {budget} ran out"])
        else:
            try:
                result = check.evaluate(check, run)
            except Exception as err:  # a parser meeting output it does not know must not lose the other results
                result = Result("FAIL", [f"its output could not be read: {type(err).__name__}: {err}"])
        result.seconds, result.output = outcome.seconds, output
        self.results[check.name] = result
        self.say(f"[{self.local.elapsed():5.0f}s] {result.status:<4} {check.name} ({outcome.seconds:.0f} s)"
                 + (f": {result.problems[0]}" if result.problems else ""))
        if self.onResult:
            self.onResult(self.results)
        return result.status == "PASS"


# ----------------------------------------------------------------------------------------------
# Figures derived from several checks, and the report


def throughputRows(results, gpuName):
    """Rows (what, tokens/s, FLOPs/token, achieved TFLOPS, MFU vs TF32, MFU vs bf16, note) for the timed runs."""
    peak = peakTflops(gpuName)
    rows = []
    for name, label in (("baseline", "baseline (float32, TF32 matmuls)"), ("phase1", "phase I, 20 models (float32)")):
        result = results.get(name)
        if result is None or result.status != "PASS" or not result.figures.get("throughput"):
            continue
        log, speed = result.figures["log"], result.figures["throughput"]
        hp = log["hyperparameters"]
        flops, _ = flopsPerToken(log["parameters"], log["vocabSize"], int(hp["nLayers"]), int(hp["dimEmb"]),
                                 int(hp["seqLength"]), int(hp["contextSize"]))
        if speed["tokensPerSecond"]:
            rows.append(throughputRow(label, speed["tokensPerSecond"], flops, peak))
    bench, phase1 = results.get("benchPhase1"), results.get("phase1")
    if bench and bench.status == "PASS" and phase1 and phase1.status == "PASS":
        # benchPhase1 trains the default phase-I model (spline;att-spline, 4 x 256, seqLength 4096, contextSize
        # 1024, the GPT-2 vocabulary), so phase1's FLOPs per token apply; it synchronises the GPU around each step
        log = phase1.figures["log"]
        hp = log["hyperparameters"]
        flops, _ = flopsPerToken(log["parameters"], log["vocabSize"], int(hp["nLayers"]), int(hp["dimEmb"]),
                                 int(hp["seqLength"]), int(hp["contextSize"]))
        for label, tokensPerSecond in benchPhase1Throughput(bench.output):
            rows.append(throughputRow(f"benchPhase1: {label}", tokensPerSecond, flops, peak))
    return rows


def benchPhase1Throughput(output):
    """(label, tokens/s) of benchPhase1.py's batched row and its single-model float32 and bfloat16 lines."""
    rows = []
    batched = re.search(r"^batched \(one pass, all models\)\s+[\d.]+\s+([\d,]+)", output, re.MULTILINE)
    if batched:
        rows.append(("phase I batched, float32", float(batched.group(1).replace(",", ""))))
    for dtype, count in re.findall(r"^single model \(baseline path\) (\w+)\s*:\s+([\d,]+) tokens/s", output,
                                   re.MULTILINE):
        rows.append((f"one spline model, {dtype}", float(count.replace(",", ""))))
    return rows


def throughputRow(label, tokensPerSecond, flops, peak):
    achieved = tokensPerSecond * flops / 1e12
    if peak is None:
        return (label, tokensPerSecond, flops, achieved, "unknown", "unknown")
    return (label, tokensPerSecond, flops, achieved, f"{100 * mfu(tokensPerSecond, flops, peak[1]):.1f}%",
            f"{100 * mfu(tokensPerSecond, flops, peak[2]):.1f}%")


def memoryComparison(results):
    """(status, line): --preflight's estimated peak per pass against phase I's measured peak."""
    preflight, phase1 = results.get("preflight"), results.get("phase1")
    if not (preflight and phase1 and preflight.figures.get("estimateGiB") and phase1.figures.get("peakGiB")):
        return None, "not available: it needs the preflight and phase1 checks' figures"
    estimate, measured = preflight.figures["estimateGiB"], phase1.figures["peakGiB"]
    perPassPreflight, perPassRun = preflight.figures["modelsPerPass"], phase1.figures["log"]["modelsPerPass"]
    line = (f"estimated {estimate:.2f} GiB per pass ({perPassPreflight} models per pass), measured "
            f"{measured:.2f} GiB ({perPassRun} models per pass): estimate / measured = {estimate / measured:.2f}")
    if perPassPreflight != perPassRun:
        return "info", line + "; the two chose different modelsPerPass, so they are not comparable"
    # the preflight runs eager autograd on fake tensors and is meant to err high; 5% below is the slack for
    # allocator rounding that max_memory_allocated sees and the estimate does not
    if measured > 1.05 * estimate:
        return "FAIL", line + ": the run needed more than the preflight estimated"
    return "PASS", line


NOT_YET = "not run yet"  # a report written while checks still run, or after an interrupt


def verdict(results, memoryStatus):
    failed = [name for name, r in results.items() if r.status in ("FAIL", "skipped")]
    if memoryStatus == "FAIL":
        failed.append("preflight estimate vs peak")
    missing = [name for name, r in results.items() if r.status in ("not run (time)", NOT_YET)]
    if failed:
        return "FAIL", failed, missing
    return ("INCOMPLETE" if missing else "PASS"), failed, missing


def writeReport(settings, checks, results, wallSeconds):
    """Write the Markdown report, also while checks still run (those not finished are 'not run yet'); returns
    (verdict, failed names, names not run)."""
    results = {check.name: results.get(check.name, Result(NOT_YET)) for check in checks}
    memoryStatus, memoryLine = memoryComparison(results)
    outcome, failed, missing = verdict(results, memoryStatus)
    gpu = settings.gpu
    lines = [f"# GPU check: {gpu.get('name', '?')}, {datetime.datetime.now():%Y-%m-%d %H:%M}", ""]
    notRun = "; ".join(f"{status}: {', '.join(names)}" for status in ("not run (time)", NOT_YET)
                       if (names := [name for name in missing if results[name].status == status]))
    summary = {"PASS": "every check passed",
               "FAIL": "failed: " + ", ".join(failed) + (f"; {notRun}" if missing else ""),
               "INCOMPLETE": f"nothing failed, but {notRun}"}[outcome]
    lines += [f"**{outcome}**: {summary}", ""]
    lines += [f"- command: `{shlex.join(['python', 'bench/gpuCheck.py'] + settings.argv)}`",
              f"- GPU: {gpu.get('name')} (compute capability {gpu.get('capability')}, {gpu.get('memoryGiB', 0):.1f} "
              f"GiB, {gpu.get('count')} visible); torch {gpu.get('torch')}, CUDA {gpu.get('cuda')}; git commit "
              f"{gitCommit()}",
              f"- {len(checks)} checks in {wallSeconds:.0f} s (budget {settings.budget:g} s, {settings.jobs} side by "
              f"side where nothing is timed); runs of {settings.steps[0]} steps; logs, plots and data in "
              f"`{settings.workDir}`", ""]
    lines += ["## Checks", "", "| check | result | s | what |", "|---|---|---:|---|"]
    for check in checks:
        r = results[check.name]
        lines.append(f"| {check.name} | {r.status} | {r.seconds:.0f} | {check.what} |")
    lines.append(f"| preflight estimate vs peak | {memoryStatus or 'not available'} | | {memoryLine} |")
    lines += [""] + throughputSection(settings, results) + [""] + kernelSection(checks, results)
    lines += ["", "## Each check", ""]
    for check in checks:
        r = results[check.name]
        lines += [f"### {check.name}: {r.status}", "", f"{check.what}. Rerun: `python bench/gpuCheck.py --only "
                                                        f"{check.name}`; its command, run in the repository:",
                  "", "```", shlex.join(check.command), "```", ""]
        lines += [f"- {problem}" for problem in r.problems + r.notes] + ([""] if r.problems + r.notes else [])
        lines += figureLines(check, r)
        if r.status == "FAIL" and r.output:
            lines += ["Last lines of its output:", "", "```", tail(r.output), "```", ""]
    text = "\n".join(lines).rstrip() + "\n"
    atomicWriteText(settings.out, text)
    return outcome, failed, missing


def throughputSection(settings, results):
    gpuName = settings.gpu.get("name", "")
    peak = peakTflops(gpuName)
    lines = ["## Throughput and model-FLOPs utilisation", "",
             "FLOPs per token = 6 x (parameters outside the embedding and head + vocab x dimEmb, the head's matmul) "
             "+ 12 x nLayers x dimEmb x effective context, the mean number of keys a query attends under the causal "
             "window (query i: min(i + 1, contextSize); 896.1 for seqLength 4096, contextSize 1024; document "
             "boundaries not subtracted). tokens/s: all models' training tokens between the first report (step 1, "
             "left out) and the last, over the trainer's training seconds (metrics-RUN.csv, to the millisecond; the "
             "log's s/step has two digits). A step's time ends with a synchronisation of the GPU, so it includes the "
             "step's own GPU work. The bench rows time synchronised steps of the same model (benchPhase1.py).", ""]
    if peak:
        lines += [f"Peaks used ({peak[0]}, dense): TF32 {peak[1]:g} TFLOPS, bf16 {peak[2]:g} TFLOPS "
                  "(sources in bench/gpuCheck.py, PEAK_TFLOPS).", ""]
    else:
        lines += [f"MFU unknown: {gpuName!r} is not in bench/gpuCheck.py's PEAK_TFLOPS table (dense TF32 and bf16 "
                  "peaks); add its datasheet figures there.", ""]
    rows = throughputRows(results, gpuName)
    if not rows:
        return lines + ["No timed run passed, so there are no figures."]
    lines += ["| run | tokens/s | GFLOPs/token | achieved TFLOPS | MFU vs TF32 peak | MFU vs bf16 peak |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, tokensPerSecond, flops, achieved, versusTf32, versusBf16 in rows:
        lines.append(f"| {label} | {tokensPerSecond:,.0f} | {flops / 1e9:.4f} | {achieved:.1f} | {versusTf32} | "
                     f"{versusBf16} |")
    return lines


def kernelSection(checks, results):
    lines = ["## Kernels that ran", ""]
    for check in checks:
        r = results.get(check.name)
        if r and r.figures.get("log"):
            lines += [f"- {check.name}: " + "; ".join(r.figures["log"]["kernels"])]
    return lines


def figureLines(check, result):
    figures = result.figures
    if "log" in figures:
        log, lines = figures["log"], []
        lines.append(f"- last lossTr {figures['lossTr']}, last lossVa {figures['lossVa']}")
        if figures.get("peakGiB") is not None:
            lines.append(f"- peak CUDA memory {figures['peakGiB']} GiB, the largest of {len(log['peakMemory'])} lines "
                         "(the log's GB are 2^30 bytes)")
        windows = ", ".join(f"step {step}: {seconds:.2f}" for step, seconds in log["secondsPerStep"])
        lines.append(f"- s/step per report window (log): {windows}")
        speed = figures.get("throughput")
        if speed and speed["tokensPerSecond"]:
            alone = "" if check.alone else " (ran side by side with other checks)"
            lines.append(f"- {speed['tokensPerSecond']:,.0f} tokens/s, steps {speed['fromStep'] + 1}-{speed['toStep']}"
                         + alone)
        return lines + [""]
    if "counts" in figures:
        return [f"- pytest: {', '.join(f'{n} {k}' for k, n in figures['counts'].items()) or 'no summary'}", ""]
    if "estimateGiB" in figures:
        return ["```"] + figures["table"] + ["```", ""]
    if "ratio" in figures and result.output:
        return ["```"] + [line for line in result.output.splitlines() if line.strip()][-30:] + ["```", ""]
    return []


def gitCommit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=REPO).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def printPlan(settings, checks):
    print(f"gpuCheck plan: {len(checks)} checks, budget {settings.budget:g} s, runs of {settings.steps[0]} steps; "
          f"report {settings.out}; data and logs in {settings.workDir}")
    graphs, cold, perCheck, seconds = compilePlan(checks, settings.jobs)
    for check in checks:
        how = ("alone on the GPU" if check.alone else "side by side") + f", timeout {check.timeout:g} s"
        if check.needs:
            how += f", after {', '.join(check.needs)}"
        if check.graphs:
            how += f", compiles {len(check.graphs)} graph(s), about {perCheck[check.name]} s"
        print(f"\n{check.name}: {check.what} ({how})\n  {shlex.join(check.command)}")
    print(f"\nestimated compile on a cold cache: {graphs} graphs, {cold} compiled, {graphs - cold} from inductor's "
          f"cache; about {seconds:.0f} s of the {settings.budget:g} s budget (the alone checks one after another, "
          f"the others {settings.jobs} side by side; per graph {COMPILE_SECONDS['first']} s for a process's first, "
          f"{COMPILE_SECONDS['next']} s for each further one, {COMPILE_SECONDS['cached']} s from the cache: "
          "estimates until a GPU report measures them)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parseArgs(argv)
    try:
        # bad flags are reported before the GPU probe, which takes seconds
        preliminary = resolveSettings(args, {})
        selectChecks(planChecks(preliminary), preliminary.only)
        gpu = {} if args.dryRun else probeGpu()
        settings = resolveSettings(args, gpu, argv)
        checks = selectChecks(planChecks(settings), settings.only)
    except CheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if settings.dryRun:
        printPlan(settings, checks)
        return 0
    began = time.monotonic()
    print(f"gpuCheck on {gpu['name']}: {len(checks)} checks, budget {settings.budget:g} s; writing random data",
          flush=True)
    def report(results):
        return writeReport(settings, checks, results, time.monotonic() - began)

    try:
        writeRandomData(settings.dataDir, tokensNeeded(settings), VALIDATION_TOKENS + 4096)
        runner = Runner(settings, checks, say=lambda line: print(line, flush=True), onResult=report)
        try:
            results = runner.runAll()
        except KeyboardInterrupt:  # every figure measured so far stays in the report, INCOMPLETE
            report(runner.results)
            print(f"report: {settings.out}", flush=True)
            raise
        outcome, failed, missing = report(results)
    except OSError as err:  # a full disk or a folder removed meanwhile
        print(f"error: cannot write in {settings.workDir} or {settings.out}: {err}", file=sys.stderr)
        return 2
    print(f"{outcome}" + (f": failed {', '.join(failed)}" if failed else "")
          + (f"; not run (time): {', '.join(missing)}" if missing else ""))
    print(f"report: {settings.out}")
    return {"PASS": 0, "FAIL": 1, "INCOMPLETE": 3}[outcome]


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the running checks, in sessions of their own, are stopped too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("error: interrupted; the checks that were running were stopped with it, the report holds those that "
              "finished", file=sys.stderr)
        sys.exit(130)
