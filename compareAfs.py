"""Compare activation functions under identical conditions: a trainLmAf.py run per (AF, seed), a table and a plot.

    python compareAfs.py --afTypes gelu,relu,prelu,swiglu,spline --seeds 0,1,2 [any trainLmAf.py flags]
    python compareAfs.py --afTypes relu2 --variant "spline-relu2=spline;att-spline --afInit relu2;att-linear" ...

Every run gets the same trainLmAf.py flags except --afType, --seed and --runName (NAME-AF-sSEED), so data order,
steps and seeds are identical across AFs. A --variant LABEL=AFTYPE FLAGS... is one more row: that afType with its own
extra flags (e.g. the spline's --afInit or --afSmoothness), its runs named NAME-LABEL-sSEED.
Each run is a trainLmAf.py subprocess (the training code itself, no second
loop), so one AF that crashes does not stop the others. The results are read back from the runs' metrics-RUN.csv
files (and the parameter count from their logs) and written to dirResults as compare-NAME.md (parameters, final validation loss and accuracy as mean ± std over seeds, tokens/s)
and compare-NAME.png (validation curves). The exit status is 1 when any run failed (they are named), 2 for bad flags.

A run whose log already holds its final step is not trained again (trainLmAf.py's "already complete"), so a
comparison that was stopped continues where it stopped; use another --name for new settings.

--jobs N trains N runs side by side (a phase II waits for its phase I). Each then gets CPU cores / N threads unless
OMP_NUM_THREADS is set, and its progress lines go only to its log. Ctrl-C (or SIGTERM) reaches every running
trainLmAf.py once: it finishes its step, saves a resumable checkpoint and stops, and no new run starts; a second
Ctrl-C stops them at once.

--splinePhases 2: an AF with a spline is first trained in phase I (--splineModels models sharing it, the given
--afLr), then in phase II from phase I's ptAf file with --afLr 0; the table reports phase II. A variant's own
--nModels sets its phase I's model count (--nModels 1: the single-model control; its phase II trains the common
--nModels). A spline variant whose own flags say --afLr 0 is a frozen-init control: one run, the spline frozen at its
--afInit shape, no phase I.

--baseline LABEL adds a table of paired differences: every other row's final validation loss minus the baseline's on
the same seed (same data order and initialisation), their mean ± standard error (sample std / sqrt(n)), the paired t
test's 95% interval (mean ± t(0.975, n-1) s.e.; one that holds 0 is within the noise) and the seeds won (lower
loss); --baseline best-fixed takes the row without learned AFs that has the lowest mean loss. --pairs
LEARNED:CONTROL (repeatable) adds the same for chosen pairs, e.g. a phase-II row against its frozen-init control.
Both go into the table and into a lower row of the plot.

Every learnable AF gets the same --afLr. The spline's default 0.1 bends `rational` into spikes within a few hundred
steps (its coefficients multiply x^5); about 0.01 keeps it smooth.
"""
import argparse
import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import runPlan
import trainLmAf
from activationFunctions import LEARNABLE_TYPES, MLP_INPUT_TYPES, SPLINE_TYPES
from afFiles import atomicWrite
from plotting import parseLog
from runFiles import RunFiles

TRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainLmAf.py")
# Flags the comparison sets per run; given by the user they would make the runs differ or collide.
PER_RUN_FLAGS = ("afType", "seed", "runName", "resumeFrom", "afFileToLoad")
# --baseline's word for the fixed-AF row (nothing learned in its AFs) with the lowest mean final validation loss.
BEST_FIXED = "best-fixed"


class CompareError(Exception):
    """Bad comparison flags; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# Flags and the list of runs


def parseArgs(argv):
    """(comparison options, the trainLmAf.py flags given, their Hyperparameters)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Every other flag goes to each trainLmAf.py run unchanged "
                                            "(python trainLmAf.py --help lists them).")
    parser.add_argument("--afTypes", default="",
                        help="comma-separated afType values, e.g. gelu,relu,prelu,swiglu,'spline;att-spline'")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=AFTYPE [FLAGS]",
                        help="one more row: AFTYPE with extra trainLmAf.py flags, labelled LABEL (repeatable), e.g. "
                             "'spline-relu2=spline;att-spline --afInit relu2;att-linear'")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every AF is trained once per seed")
    parser.add_argument("--name", default="cmp", help="comparison name: runs NAME-AF-sSEED, outputs compare-NAME.*")
    parser.add_argument("--splinePhases", type=int, choices=(1, 2), default=1,
                        help="2: spline AFs are learned in phase I, then frozen in phase II (reported)")
    parser.add_argument("--splineModels", type=int, default=4, help="--splinePhases 2: models in phase I")
    parser.add_argument("--baseline", default="", metavar="LABEL",
                        help="paired per-seed differences of every other row from this row (an AF or variant label; "
                             f"{BEST_FIXED}: the fixed-AF row with the lowest mean final validation loss)")
    parser.add_argument("--pairs", action="append", default=[], metavar="LEARNED:CONTROL",
                        help="paired per-seed differences LEARNED - CONTROL of two rows (repeatable)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained side by side, each with CPU cores / JOBS threads unless OMP_NUM_THREADS "
                             "is set; their progress goes to their logs only")
    parser.add_argument("--dryRun", action="store_true",
                        help="check every run's flags and print the trainLmAf.py commands, without training")
    args, trainerArgv = parser.parse_known_args(argv)
    hp, given = trainLmAf.parseArgs(trainerArgv)
    clash = [name for name in PER_RUN_FLAGS if name in given]
    if clash:
        raise CompareError(f"--{clash[0]} is set per run by compareAfs.py; use --afTypes, --seeds or --name instead")
    args.afTypes = [af.strip() for af in args.afTypes.split(",") if af.strip()]
    args.entries = [{"label": af, "af": af, "slug": afTypeSlug(af), "flags": [], "frozen": False, "phase1Models": None}
                    for af in args.afTypes]
    args.entries += [parseVariant(text) for text in args.variant]
    labels = [entry["label"] for entry in args.entries]
    if not args.entries or len(set(labels)) != len(labels) or len({e["slug"] for e in args.entries}) != len(labels):
        raise CompareError(f"--afTypes and --variant need distinct entries (at least one), got {', '.join(labels)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise CompareError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
    if len(set(args.seeds)) != len(args.seeds):
        raise CompareError(f"--seeds must be distinct, got {args.seeds}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        raise CompareError(f"--name {args.name!r} may hold only letters, digits and _ . -")
    if args.splineModels < 1:
        raise CompareError(f"--splineModels must be >= 1, got {args.splineModels}")
    if args.jobs < 1:
        raise CompareError(f"--jobs must be >= 1, got {args.jobs}")
    if not hp.filesTokensVa or hp.valEvery < 0:
        raise CompareError("the comparison reports validation loss: give --filesTokensVa and --valEvery >= 0")
    args.bestFixed = args.baseline == BEST_FIXED
    if args.bestFixed:
        if not any(isFixedAf(entry["af"]) for entry in args.entries):
            raise CompareError(f"--baseline {BEST_FIXED} needs a row whose AFs learn nothing, e.g. --afTypes gelu")
    elif args.baseline and args.baseline not in labels:
        raise CompareError(f"--baseline {args.baseline!r} is none of the rows ({', '.join(labels)}) nor "
                           f"{BEST_FIXED}")
    args.pairs = [parsePair(text, labels) for text in args.pairs]
    return args, trainerArgv, hp


def parsePair(text, labels):
    """'LEARNED:CONTROL' -> (LEARNED, CONTROL), both row labels."""
    learned, sep, control = (part.strip() for part in text.partition(":"))
    if not sep or learned not in labels or control not in labels or learned == control:
        raise CompareError(f"--pairs {text!r} must be LEARNED:CONTROL, two different rows of {', '.join(labels)}")
    return learned, control


def parseVariant(text):
    """'LABEL=AFTYPE --flag value ...' -> a comparison entry."""
    label, _, rest = text.partition("=")
    label, words = label.strip(), shlex.split(rest)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or not words:
        raise CompareError(f"--variant {text!r} must look like LABEL=AFTYPE [FLAGS], LABEL of letters, digits, _ . -")
    own, given = trainLmAf.parseArgs(words[1:])
    clash = [name for name in PER_RUN_FLAGS if name in given]
    if clash:
        raise CompareError(f"--variant {label}: --{clash[0]} is set per run by compareAfs.py")
    return {"label": label, "af": words[0], "slug": label, "flags": words[1:],
            "frozen": "afLr" in given and own.afLr == 0, "phase1Models": own.nModels if "nModels" in given else None}


def afParts(afType):
    """The MLP, attention and score AFs an afType names."""
    return runPlan.splitAfType(afType) + (runPlan.splitScoreType(afType)[1],)


def isSplineAf(afType):
    return any(part in SPLINE_TYPES for part in afParts(afType))


def isFixedAf(afType):
    """Whether nothing in the afType's AFs is trained (no spline, no learnable or gated-mixture AF)."""
    return not any(part in SPLINE_TYPES + LEARNABLE_TYPES + MLP_INPUT_TYPES for part in afParts(afType))


def resolveBaseline(rows, args):
    """The baseline row's label: --baseline's, or for best-fixed the finished fixed-AF row with the lowest mean final
    validation loss ('' when none finished)."""
    if args.baseline != BEST_FIXED:
        return args.baseline
    fixed = {entry["label"] for entry in args.entries if isFixedAf(entry["af"])}
    finished = [row for row in rows if row["af"] in fixed and row["nDone"]]
    return min(finished, key=lambda row: meanStd(row["loss"])[0])["af"] if finished else ""


def afTypeSlug(afType):
    """afType as a piece of a file name: 'spline;att-spline' -> 'spline_att-spline',
    'gelu;att-linear;score-sigmoid' -> 'gelu_att-linear_score-sigmoid'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", afType.replace(";", "_"))


def hasPhaseOne(entry, splinePhases):
    """Whether the entry's reported runs load splines learned in a phase I (a frozen-init control has none)."""
    return splinePhases == 2 and isSplineAf(entry["af"]) and not entry["frozen"]


def withoutFlag(flags, name):
    """flags without `name VALUE` and `name=VALUE`."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == name:
            skip = True
        elif not flag.startswith(name + "="):
            kept.append(flag)
    return kept


def planRuns(args, trainerArgv, hp):
    """One dict per trainLmAf.py run, in order; a phase-II run names the phase-I run it loads."""
    runs = []
    for entry in args.entries:
        af = entry["label"]
        for seed in args.seeds:
            runName = f"{args.name}-{entry['slug']}-s{seed}"
            argv = trainerArgv + entry["flags"] + ["--afType", entry["af"], "--seed", str(seed)]
            if hasPhaseOne(entry, args.splinePhases):
                # The variant's --nModels is its phase I's, given there once; phase II trains as many models as
                # every other row.
                argv = trainerArgv + withoutFlag(entry["flags"], "--nModels") + ["--afType", entry["af"], "--seed",
                                                                                 str(seed)]
                phase1 = {"af": af, "seed": seed, "runName": runName + "-phase1", "phase": 1, "reported": False,
                          "argv": argv + ["--runName", runName + "-phase1", "--nModels",
                                          str(entry["phase1Models"] or args.splineModels), "--saveAfEvery", "0"]}
                afFile = RunFiles(hp.dirResults, phase1["runName"]).afFile(hp.nSteps)
                runs.append(phase1)
                runs.append({"af": af, "seed": seed, "runName": runName, "phase": 2, "reported": True, "after": phase1,
                             "argv": argv + ["--runName", runName, "--afLr", "0", "--afFileToLoad", afFile]})
            else:
                runs.append({"af": af, "seed": seed, "runName": runName, "phase": None, "reported": True,
                             "argv": argv + ["--runName", runName]})
    return runs


def checkRuns(runs, args):
    """Validate every run's flags before any training starts, so a typo costs seconds, not hours."""
    for run in runs:
        hp, _ = trainLmAf.parseArgs(run["argv"])
        if run["phase"] == 2:
            hp.afFileToLoad = ""  # the file appears only once phase I has run
        try:
            runPlan.checkFlags(hp)
        except runPlan.ConfigError as err:
            raise CompareError(f"{run['runName']}: {err}") from None
        if run["phase"] == 1 and hp.afLr == 0:
            raise CompareError("--splinePhases 2 learns the splines in phase I: --afLr must not be 0")


# ----------------------------------------------------------------------------------------------
# Running and reading back


def trainedTokens(hp):
    """Tokens all models of a run train on (staggered phase-I models start late)."""
    return hp.batchSize * hp.seqLength * sum(hp.nSteps - start for start in runPlan.modelStartSteps(hp))


def readRun(dirResults, runName, nSteps):
    """Parameters (from the log's last run), validation curve of model 0 and training seconds (from the metrics
    CSV) of a run; None when it wrote no metrics."""
    files = RunFiles(dirResults, runName)
    metricsPath, logPath = files.metrics, files.log
    if not os.path.isfile(metricsPath):
        return None
    with open(metricsPath, newline="") as f:
        rows = list(csv.DictReader(f))
    result = {"params": None, "complete": any(int(r["step"]) == nSteps for r in rows),
              "val": [(int(r["step"]), float(r["loss"]), float(r["accuracy"])) for r in rows
                      if r["split"] == "val" and r["model"] == "0"],
              "trainSeconds": max((float(r["trainSeconds"]) for r in rows), default=None)}
    if os.path.isfile(logPath):
        result["params"] = parseLog(logPath)["parametersTotal"]
    return result


class SideBySide:
    """Trains the planned runs `jobs` at a time. Each trainLmAf.py runs in a session of its own, so that a Ctrl-C
    reaches it once, from here (interrupt): a second signal from the terminal would make it stop without saving."""

    def __init__(self, jobs, hp):
        self.jobs, self.hp = jobs, hp
        self.env = dict(os.environ)
        if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        self.lock = threading.Lock()
        self.running = set()
        self.stopping = False
        self.left = {kind: 0 for kind in RUN_KINDS}  # runs not yet finished, by kind
        self.seconds = {kind: [] for kind in RUN_KINDS}  # wall times of the runs trained here, by kind

    def train(self, runs):
        """Every run, a phase II in the same worker right after its phase I; False when interrupted."""
        for run in runs:
            self.left[runKind(run)] += 1
        chains, chainOf = [], {}
        for index, run in enumerate(runs, 1):
            chain = chainOf[id(run["after"])] if run["phase"] == 2 else []
            if not chain:
                chains.append(chain)
            chain.append((index, run))
            chainOf[id(run)] = chain
        with ThreadPoolExecutor(self.jobs) as pool:
            futures = [pool.submit(self.trainChain, chain, len(runs)) for chain in chains]
            while True:
                try:
                    for future in futures:
                        future.result()
                    break
                except KeyboardInterrupt:
                    self.interrupt()
        return not self.stopping

    def trainChain(self, chain, total):
        for index, run in chain:
            if not runOne(run, index, total, self):
                return

    def start(self, argv):
        """The trainLmAf.py process of argv, or None once interrupted."""
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen([sys.executable, TRAINER] + argv, env=self.env, start_new_session=True,
                                    stdout=subprocess.DEVNULL if self.jobs > 1 else None, stderr=subprocess.PIPE,
                                    text=True)
            self.running.add(proc)
            return proc

    def finished(self, proc):
        with self.lock:
            self.running.discard(proc)

    def timeLeft(self, run, wall, trained):
        """After a run: the estimated time until the last run ends (the mean wall time of each kind so far, times
        the runs of that kind left, `jobs` at a time), as a line; None before a kind left to run has a time."""
        kind = runKind(run)
        with self.lock:
            self.left[kind] -= 1
            if trained:
                self.seconds[kind].append(wall)
            left = {k: n for k, n in self.left.items() if n}
            if not left:
                return None
            if any(not self.seconds[k] for k in left):
                return None
            means = {k: float(np.mean(self.seconds[k])) for k in left}
        total = sum(left[k] * means[k] for k in left) / min(self.jobs, sum(left.values()))
        parts = ", ".join(f"{left[k]} {k} run(s) at {means[k]:.0f} s" for k in RUN_KINDS if k in left)
        return f"estimated time left: {formatDuration(total)} ({parts}, {self.jobs} at a time)"

    def interrupt(self):
        """Start no new run; send each running one SIGINT (the first: finish the step and save; again: stop now)."""
        with self.lock:
            if not self.stopping:
                print("interrupted: the running runs finish their step and save (Ctrl-C again stops them at once)",
                      file=sys.stderr, flush=True)
            self.stopping = True
            for proc in self.running:
                proc.send_signal(signal.SIGINT)


RUN_KINDS = ("phase-I", "other")


def runKind(run):
    """Phase-I runs train several models and take several times longer than the others."""
    return RUN_KINDS[0] if run["phase"] == 1 else RUN_KINDS[1]


def formatDuration(seconds):
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


def runOne(run, index, total, workers):
    """Train one run in a subprocess; fills run['result'] or run['failure']. False when it did not start."""
    hp = workers.hp
    if run["phase"] == 2 and "failure" in run["after"]:
        run["failure"] = f"its phase I {run['after']['runName']} failed"
        print(f"[{index}/{total}] {run['runName']}: skipped, {run['failure']}", flush=True)
        workers.timeLeft(run, 0.0, trained=False)
        return True
    runHp, _ = trainLmAf.parseArgs(run["argv"])
    # a run finished earlier only reports itself; its seconds would make the estimate of the others too short
    alreadyDone = (readRun(hp.dirResults, run["runName"], runHp.nSteps) or {}).get("complete", False)
    start = time.perf_counter()
    proc = workers.start(run["argv"])
    if proc is None:
        return False
    print(f"[{index}/{total}] {run['runName']}: trainLmAf.py {shlex.join(run['argv'])}", flush=True)
    # stderr is kept to name the cause of a failure; stdout (the run's progress lines, also in its log) goes to the
    # terminal for one job at a time.
    _, stderr = proc.communicate()
    workers.finished(proc)
    wall = time.perf_counter() - start
    if stderr:
        sys.stderr.write(stderr)
    result = readRun(hp.dirResults, run["runName"], runHp.nSteps)
    lastError = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if proc.returncode != 0:
        # trainLmAf.py exits 128 + N after saving on signal N; subprocess reports a signal that killed it as -N.
        signalNumber = proc.returncode - 128 if proc.returncode > 128 else -proc.returncode
        killedBy = f" ({signal.Signals(signalNumber).name})" if signalNumber in set(signal.Signals) else ""
        run["failure"] = f"exit code {proc.returncode}{killedBy}" + (f": {lastError}" if lastError else "")
    elif result is None or not result["complete"] or not result["val"]:
        run["failure"] = "its metrics hold no final step or no validation result"
    else:
        result["tokensPerSecond"] = trainedTokens(runHp) / max(result["trainSeconds"] or 0.0, 1e-9)
        run["result"] = result
    status = run.get("failure") or f"val loss {run['result']['val'][-1][1]:.4f}"
    print(f"[{index}/{total}] {run['runName']}: {'FAILED, ' if 'failure' in run else ''}{status} ({wall:.0f} s)",
          flush=True)
    estimate = workers.timeLeft(run, wall, trained=not alreadyDone and "failure" not in run)
    if estimate:
        print(f"[{index}/{total}] {estimate}", flush=True)
    return True


# ----------------------------------------------------------------------------------------------
# Table and plot


def meanStd(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def formatMeanStd(values, digits):
    mean, std = meanStd(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def summarize(runs, entries, splinePhases):
    """One row per entry (AF or variant) over its reported runs that succeeded."""
    rows = []
    for entry in entries:
        af = entry["label"]
        mine = [r for r in runs if r["af"] == af and r["reported"]]
        done = [r["result"] for r in mine if "result" in r]
        suffix = " (frozen init)" if entry["frozen"] and isSplineAf(entry["af"]) else \
            " (phase II)" if hasPhaseOne(entry, splinePhases) else ""
        row = {"af": af, "label": af + suffix, "nRuns": len(mine), "nDone": len(done), "runs": done,
               "seedLoss": {r["seed"]: r["result"]["val"][-1][1] for r in mine if "result" in r}}
        if done:
            row.update(params=done[0]["params"], loss=[d["val"][-1][1] for d in done],
                       acc=[100 * d["val"][-1][2] for d in done], speed=[d["tokensPerSecond"] for d in done])
        rows.append(row)
    return rows


# Student's t, 97.5% quantile, by degrees of freedom (two-sided 95% intervals of a mean over few seeds).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(dof):
    """t(0.975, dof): the table up to 30, then the Cornish-Fisher expansion around the normal's 1.96 (within 1e-4)."""
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def pairedDifference(row, control):
    """row's final validation loss minus control's, seed by seed over the seeds both finished: {'seeds', 'deltas',
    'mean', 'se' (sample std / sqrt(n)), 'ci' (the paired t test's 95% interval, mean ± t(0.975, n-1) se), 'won'
    (seeds where row's loss is lower)}, se and ci None for one seed; None when they share no finished seed."""
    seeds = sorted(set(row["seedLoss"]) & set(control["seedLoss"]))
    if not seeds:
        return None
    deltas = np.array([row["seedLoss"][s] - control["seedLoss"][s] for s in seeds])
    mean = float(deltas.mean())
    se = float(deltas.std(ddof=1) / np.sqrt(len(deltas))) if len(deltas) > 1 else None
    ci = (mean - t975(len(deltas) - 1) * se, mean + t975(len(deltas) - 1) * se) if se is not None else None
    return {"seeds": seeds, "deltas": deltas.tolist(), "mean": mean, "se": se, "ci": ci,
            "won": int((deltas < 0).sum())}


def pairedComparisons(rows, args):
    """(baseline comparisons, --pairs comparisons): lists of (label, paired difference or None)."""
    byLabel = {row["af"]: row for row in rows}
    againstBaseline = []
    if args.baseline:
        base = byLabel[args.baseline]
        againstBaseline = [(f"{row['label']} − {base['label']}", pairedDifference(row, base))
                           for row in rows if row is not base]
    pairs = [(f"{byLabel[a]['label']} − {byLabel[b]['label']}", pairedDifference(byLabel[a], byLabel[b]))
             for a, b in args.pairs]
    return againstBaseline, pairs


def formatPaired(paired):
    if paired["se"] is None:
        return f"{paired['mean']:+.4f}"
    return f"{paired['mean']:+.4f} ± {paired['se']:.4f}"


def pairedTable(title, comparisons, seeds):
    """Markdown lines: one row per comparison, its Δ per seed, mean ± s.e., 95% interval and seeds won."""
    lines = ["", title, "",
             "| difference | " + " | ".join(f"Δ seed {s}" for s in seeds) + " | mean Δ ± s.e. | 95% CI | won |",
             "|---|" + "---:|" * (len(seeds) + 3)]
    for label, paired in comparisons:
        if paired is None:
            lines.append(f"| {label} | " + " | ".join("–" for _ in seeds) + " | – | – | – |")
            continue
        perSeed = dict(zip(paired["seeds"], paired["deltas"]))
        cells = [f"{perSeed[s]:+.4f}" if s in perSeed else "–" for s in seeds]
        ci = "[{:+.4f}, {:+.4f}]".format(*paired["ci"]) if paired["ci"] else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {formatPaired(paired)} | {ci} | "
                     f"{paired['won']}/{len(paired['seeds'])} |")
    return lines


def markdownTable(rows, args, trainerArgv, hp, failures):
    finished = [row for row in rows if row["nDone"]]
    best = min((meanStd(row["loss"])[0] for row in finished), default=None)
    reference = next(row for row in rows if row["af"] == args.baseline) if args.baseline else rows[0]
    baseline = meanStd(reference["loss"])[0] if reference["nDone"] else None
    lines = [f"# Activation-function comparison `{args.name}`", "",
             f"Every run: `trainLmAf.py {shlex.join(trainerArgv)}` plus its `--afType`, `--seed` and `--runName`; "
             f"seeds {', '.join(map(str, args.seeds))}; {hp.nSteps} steps. Validation loss and accuracy of model 0 "
             f"at the last step, mean ± std over seeds; Δ loss against {reference['label']}"
             + (" (the best fixed AF, --baseline best-fixed)" if args.bestFixed and args.baseline else "")
             + "; parameters per model "
             "(embeddings included)." + (f" Tokens/s with up to {args.jobs} runs side by side (--jobs)."
                                           if args.jobs > 1 else ""), "",
             "| AF | params | val loss | Δ loss | val acc (%) | tokens/s | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if not row["nDone"]:
            lines.append(f"| {row['label']} | – | failed | – | – | – | 0/{row['nRuns']} |")
            continue
        loss = formatMeanStd(row["loss"], 4)
        meanLoss = meanStd(row["loss"])[0]
        if meanLoss == best and len(finished) > 1:
            loss = f"**{loss}**"
        delta = f"{meanLoss - baseline:+.4f}" if baseline is not None else "–"
        speed = f"{meanStd(row['speed'])[0]:,.0f}"
        lines.append(f"| {row['label']} | {row['params']:,} | {loss} | {delta} | {formatMeanStd(row['acc'], 2)} | "
                     f"{speed} | {row['nDone']}/{row['nRuns']} |")
    variants = [entry for entry in args.entries if entry["flags"] or entry["label"] != entry["af"]]
    if variants:
        lines += ["", "Variants: " + "; ".join(f"`{e['label']}` = `{shlex.join(['--afType', e['af']] + e['flags'])}`"
                                                 for e in variants) + "."]
    if args.splinePhases == 2:
        lines += ["", f"Phase II rows: splines learned by {args.splineModels} models in phase I (unless the variant "
                      "sets its own --nModels; runs NAME-AF-sSEED-phase1), then loaded frozen (--afLr 0)."]
    if any(entry["frozen"] and isSplineAf(entry["af"]) for entry in args.entries):
        lines += ["", "Frozen-init rows: the spline frozen at its --afInit shape from step 0 (--afLr 0, no phase I)."]
    againstBaseline, pairs = pairedComparisons(rows, args)
    pairedNote = ("Δ: final validation loss of the first row minus the second's on the same seed (same data order "
                  "and initialisation); mean over seeds ± standard error (sample std / √n); 95% CI: the paired t "
                  "test's interval, mean ± t(0.975, n−1) · s.e. (one that holds 0: the difference is within the "
                  "seed-to-seed noise); won: seeds where the first row's loss is lower.")
    if againstBaseline:
        bestFixed = ", the best fixed AF" if args.bestFixed else ""
        lines += pairedTable(f"Paired against {reference['label']}{bestFixed} (per seed). {pairedNote}",
                             againstBaseline, args.seeds)
    if pairs:
        lines += pairedTable("Chosen pairs, --pairs (per seed)." + ("" if againstBaseline else f" {pairedNote}"), pairs,
                             args.seeds)
    if failures:
        lines += ["", "Failed runs:"] + [f"- `{name}`: {why}" for name, why in failures]
    return "\n".join(lines) + "\n"


def drawPaired(ax, comparisons, title):
    """Paired differences as a dot plot: a row per comparison, each seed a dot, the mean a bar ± s.e. (grey when the
    95% interval holds 0), 0 dashed; the right margin names mean ± s.e., the interval and the seeds won."""
    shown = [(label, paired) for label, paired in comparisons if paired is not None]
    ax.set_title(title, fontsize=10)
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=0.9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel("Δ final val loss (first − second, same seed); left of 0: the first is better")
    if not shown:
        ax.text(0.5, 0.5, "no seed finished in both rows", transform=ax.transAxes, ha="center", va="center",
                color="grey")
        ax.set_yticks([])
        return
    for y, (label, paired) in enumerate(shown):
        withinNoise = paired["ci"] is None or paired["ci"][0] <= 0.0 <= paired["ci"][1]
        color = "grey" if withinNoise else "tab:green" if paired["mean"] < 0 else "tab:red"
        ax.plot(paired["deltas"], [y] * len(paired["deltas"]), linestyle="none", marker="o", markersize=4,
                color="dimgrey", alpha=0.7)
        ax.errorbar(paired["mean"], y, xerr=paired["se"], fmt="|", markersize=14, markeredgewidth=2.2, color=color,
                    ecolor=color, elinewidth=1.6, capsize=4)
        ci = "   95% CI [{:+.3f}, {:+.3f}]".format(*paired["ci"]) if paired["ci"] else ""
        ax.annotate(f"{formatPaired(paired)}{ci}   won {paired['won']}/{len(paired['seeds'])}", (1.0, y),
                    xycoords=("axes fraction", "data"), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_yticks(range(len(shown)), [label for label, _ in shown], fontsize=8)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    low = min(min(p["deltas"]) for _, p in shown)
    high = max(max(p["deltas"]) for _, p in shown)
    pad = 0.1 * max(high - low, 1e-3)
    ax.set_xlim(min(low, 0.0) - pad, max(high, 0.0) + pad)


def plotAfStudy(path, rows, title, pairedPanels=()):
    """Validation loss over steps, one colour per AF: each seed thin, the mean over seeds thick; right panel
    zooms on the last third of training, where the AFs' differences are small next to the early drop. Each of
    pairedPanels, (comparisons, title) with paired comparisons (--baseline, --pairs), adds a full-width panel below
    with their per-seed differences."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(c, name) for c, name in pairedPanels if c]
    heights = [0.9 + 0.32 * len(c) for c, _ in panels]
    fig = Figure(figsize=(13, 5.4 + sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)
    top = fig
    if panels:  # subfigures, so the paired panels' long labels do not narrow the curves above them
        top, bottom = fig.subfigures(2, 1, height_ratios=[5.4, sum(heights)])
        for ax, (comparisons, name) in zip(np.atleast_1d(bottom.subplots(len(panels), 1, height_ratios=heights)),
                                           panels):
            drawPaired(ax, comparisons, name)
    axFull, axZoom = top.subplots(1, 2)
    colors = colormaps["tab10" if len(rows) <= 10 else "tab20"].colors
    lastStep = max((d["val"][-1][0] for row in rows for d in row["runs"]), default=1)
    zoomFrom = lastStep * 2 / 3
    bounds = {"full": [], "zoom": []}
    for i, row in enumerate(rows):
        if not row["nDone"]:
            continue
        color = colors[i % len(colors)]
        curves = [np.asarray([(s, loss) for s, loss, _ in d["val"]]) for d in row["runs"]]
        length = min(len(c) for c in curves)
        steps = curves[0][:length, 0]
        mean = np.mean([c[:length, 1] for c in curves], axis=0)
        marker = "o" if length <= 30 else None
        label = f"{row['label']}: {formatMeanStd(row['loss'], 4)}"
        for ax in (axFull, axZoom):
            if len(curves) > 1:
                for c in curves:
                    ax.plot(c[:, 0], c[:, 1], color=color, linewidth=0.8, alpha=0.45)
            ax.plot(steps, mean, color=color, linewidth=2.2, marker=marker, markersize=3.5,
                    label=label if ax is axFull else None)
        # The first evaluation (step 1, near log(vocab)) would squash everything else, so it sets no limits.
        later = np.concatenate([c[1:, 1] if len(c) > 2 else c[:, 1] for c in curves])
        bounds["full"].append((later.min(), later.max()))
        tail = np.concatenate([c[c[:, 0] >= zoomFrom, 1] for c in curves])
        bounds["zoom"].append((tail.min(), tail.max()) if tail.size else (later.min(), later.max()))
    for ax, key, name in ((axFull, "full", "validation loss"),
                          (axZoom, "zoom", "validation loss, last third of training")):
        if bounds[key]:
            low, high = min(b[0] for b in bounds[key]), max(b[1] for b in bounds[key])
            pad = 0.08 * (high - low) if high > low else 0.05
            ax.set_ylim(low - pad, high + pad)
        else:
            ax.text(0.5, 0.5, "no finished runs", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
    axZoom.set_xlim(zoomFrom - 0.02 * lastStep, lastStep * 1.02)
    if axFull.get_legend_handles_labels()[0]:
        longest = max(len(r["label"]) for r in rows if r["nDone"])
        top.legend(loc="outside lower center", ncols=min(4 if longest < 28 else 3, sum(1 for r in rows if r["nDone"])),
                   frameon=False,
                   title="AF: final val loss (mean ± std over seeds); thin lines: single seeds")
    fig.suptitle(title, fontweight="bold")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def writeText(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------
# Entry point


def raiseKeyboardInterrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    try:
        args, trainerArgv, hp = parseArgs(sys.argv[1:] if argv is None else argv)
        runs = planRuns(args, trainerArgv, hp)
        checkRuns(runs, args)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dryRun:
        for index, run in enumerate(runs, 1):
            print(f"[{index}/{len(runs)}] {run['runName']}: trainLmAf.py {shlex.join(run['argv'])}")
        return 0
    os.makedirs(hp.dirResults, exist_ok=True)
    previousTermHandler = signal.signal(signal.SIGTERM, raiseKeyboardInterrupt)
    try:
        completed = SideBySide(args.jobs, hp).train(runs)
    finally:
        signal.signal(signal.SIGTERM, previousTermHandler)
    if not completed:
        print("interrupted: run the same command again to continue (finished runs are kept)", file=sys.stderr)
        return 130
    failures = [(run["runName"], run["failure"]) for run in runs if "failure" in run]
    rows = summarize(runs, args.entries, args.splinePhases)
    args.baseline = resolveBaseline(rows, args)
    stem = os.path.join(hp.dirResults, f"compare-{args.name}")
    table = markdownTable(rows, args, trainerArgv, hp, failures)
    atomicWrite(stem + ".md", lambda tmp: writeText(tmp, table))
    againstBaseline, pairs = pairedComparisons(rows, args)
    baselineTitle = f"paired against {args.baseline}" + (", the best fixed AF" if args.bestFixed else "")
    plotAfStudy(stem + ".png", rows, f"{args.name}: {len(args.entries)} AFs x {len(args.seeds)} seeds",
                   [(againstBaseline, baselineTitle), (pairs, "chosen pairs (--pairs)")])
    print(table)
    print(f"wrote {stem}.md and {stem}.png")
    if failures:
        print(f"error: {len(failures)} of {len(runs)} runs failed: {', '.join(name for name, _ in failures)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
