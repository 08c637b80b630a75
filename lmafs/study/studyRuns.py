"""Where a comparison's runs train and how they are followed: on this machine's CPU slots or GPUs (scheduler.py),
with a line per run and the estimated time left, or as Slurm jobs (slurmJobs.py); each run's result read back from
its files; --status of every run."""
import fcntl
import os
import shlex
import signal
import sys
import time

import numpy as np
import torch

import trainLmAf
from lmafs.run.runFiles import RunFiles
from lmafs.study import scheduler, slurmJobs
from lmafs.study.studyPlan import CompareError, readRun, trainedTokens




RUN_KINDS = ("phase-I", "other")


def runKind(run):
    """Phase-I runs train several models and take several times longer than the others."""
    return RUN_KINDS[0] if run["phase"] == 1 else RUN_KINDS[1]


def formatDuration(seconds):
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


class StudyProgress:
    """The scheduler's events for a study's runs: a line when a run starts (and on which GPU) and when it ends, with
    its result read back from its files, and the estimated time left; fills each run's 'result' or 'failure'."""

    def __init__(self, runs, slots):
        self.byName = {run["runName"]: run for run in runs}
        self.index = {run["runName"]: index for index, run in enumerate(runs, 1)}
        self.total, self.slots = len(runs), slots
        self.left = {kind: 0 for kind in RUN_KINDS}  # runs not yet finished, by kind
        self.seconds = {kind: [] for kind in RUN_KINDS}  # wall times of the runs trained here, by kind
        for run in runs:
            self.left[runKind(run)] += 1
        self.interruptSaid = False

    def say(self, run, text):
        print(f"[{self.index[run['runName']]}/{self.total}] {run['runName']}: {text}", flush=True)

    def onStart(self, task, slot):
        run = self.byName[task.name]
        where = f" (on {slot.name})" if slot.name.startswith("GPU") else ""
        self.say(run, f"trainLmAf.py {shlex.join(task.argv[2:])}{where}")

    def onFinish(self, task, outcome):
        run = self.byName[task.name]
        if outcome.skipped:
            run["failure"] = f"its phase I {run['after']['runName']} failed"
            self.say(run, f"skipped, {run['failure']}")
            self.report(run, 0.0, trained=False)
            return False
        runHp, _ = trainLmAf.parseArgs(run["argv"])
        files = RunFiles(runHp.dirResults, run["runName"])
        stderr = ""
        if os.path.isfile(files.stderr):
            with open(files.stderr, errors="replace") as f:
                stderr = f.read()
        if stderr:
            sys.stderr.write(stderr)
        fillResult(run, runHp, outcome.returncode, stderr)
        status = run.get("failure") or f"val loss {run['result']['val'][-1][1]:.4f}" + (
            f", bpb {run['result']['val'][-1][3]:.4f}" if run["result"]["val"][-1][3] is not None else "")
        self.say(run, f"{'FAILED, ' if 'failure' in run else ''}{status} ({outcome.seconds:.0f} s)")
        self.report(run, outcome.seconds, trained=not run["alreadyDone"] and "failure" not in run)
        return "failure" not in run

    def onInterrupt(self, running):
        if not self.interruptSaid:
            print("interrupted: the running runs finish their step and save (Ctrl-C again stops them at once)",
                  file=sys.stderr, flush=True)
        self.interruptSaid = True

    def report(self, run, wall, trained):
        estimate = self.timeLeft(run, wall, trained)
        if estimate:
            print(f"[{self.index[run['runName']]}/{self.total}] {estimate}", flush=True)

    def timeLeft(self, run, wall, trained):
        """After a run: the estimated time until the last run ends (the mean wall time of each kind so far, times
        the runs of that kind left, as many at a time as there are slots), as a line; None before a kind left to run
        has a time."""
        kind = runKind(run)
        self.left[kind] -= 1
        if trained:
            self.seconds[kind].append(wall)
        left = {k: n for k, n in self.left.items() if n}
        if not left or any(not self.seconds[k] for k in left):
            return None
        means = {k: float(np.mean(self.seconds[k])) for k in left}
        slots = len(self.slots)
        total = sum(left[k] * means[k] for k in left) / min(slots, sum(left.values()))
        parts = ", ".join(f"{left[k]} {k} run(s) at {means[k]:.0f} s" for k in RUN_KINDS if k in left)
        where = f"{slots} GPUs" if self.slots[0].name.startswith("GPU") else f"{slots} at a time"
        return f"estimated time left: {formatDuration(total)} ({parts}, {where})"


def fillResult(run, runHp, returncode, stderr):
    """run['result'] (its final validation and tokens/s) when it finished, else run['failure'] (why, in a line)."""
    result = readRun(runHp.dirResults, run["runName"], runHp.nSteps)
    lastError = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if returncode:
        # trainLmAf.py exits 128 + N after saving on signal N; subprocess reports a signal that killed it as -N.
        signalNumber = returncode - 128 if returncode > 128 else -returncode
        killedBy = f" ({signal.Signals(signalNumber).name})" if signalNumber in set(signal.Signals) else ""
        run["failure"] = f"exit code {returncode}{killedBy}" + (f": {lastError}" if lastError else "")
    elif result is None or not result["complete"] or not result["val"]:
        run["failure"] = "its metrics hold no final step or no validation result"
    else:
        result["tokensPerSecond"] = trainedTokens(runHp) / max(result["trainSeconds"] or 0.0, 1e-9)
        run["result"] = result


def runLocally(runs, slots):
    """Train every run on this machine's slots, a phase II after its own phase I, each from its newest checkpoint
    when an earlier study stopped it; False when interrupted."""
    tasks = []
    for run in runs:
        runHp, _ = trainLmAf.parseArgs(run["argv"])
        files = RunFiles(runHp.dirResults, run["runName"])
        run["alreadyDone"] = files.complete(runHp.nSteps)  # it only reports itself: no time for the estimate
        tasks.append(scheduler.Task(
            run["runName"], [sys.executable, slurmJobs.TRAINER] + run["argv"] + files.resumeArguments(runHp.nSteps),
            after=(run["after"]["runName"],) if run["phase"] == 2 else (),
            # progress lines (also in each run's log) on the terminal for one run at a time; errors kept per run
            stdout=scheduler.TERMINAL if len(slots) == 1 else None, stderr=files.stderr, kind=runKind(run)))
    localScheduler = scheduler.LocalScheduler(slots, StudyProgress(runs, slots), interrupt="forward")
    previous = signal.signal(signal.SIGTERM, raiseKeyboardInterrupt)
    try:
        localScheduler.run(tasks)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return not localScheduler.interrupted


def slurmRuns(runs):
    """The runs as slurmJobs.SlurmStudy takes them."""
    described = []
    for run in runs:
        runHp, _ = trainLmAf.parseArgs(run["argv"])
        described.append({"runName": run["runName"], "argv": run["argv"], "dirResults": runHp.dirResults,
                          "nSteps": runHp.nSteps, "after": run["after"]["runName"] if run["phase"] == 2 else None})
    return described


def runOnSlurm(runs, args, hp, settings):
    """Submit what is missing; with --wait, wait until no job of the study is queued or running. True when every
    run has ended (the table can be made), False when jobs are still queued or running."""
    study = slurmJobs.SlurmStudy(hp.dirResults, args.name, settings)
    described = slurmRuns(runs)
    submitted = study.submit(described, jobName=f"{args.name}")
    if submitted:
        arrays = sorted({jobId.split("_")[0] for jobId in submitted.values()})
        print(f"submitted {len(submitted)} run(s) to Slurm (job{'s' if len(arrays) > 1 else ''} {', '.join(arrays)}); "
              f"their output: {study.folder}", flush=True)
    said = {}
    while True:
        rows = study.status(described)
        for name, state, jobId, _ in rows:
            if said.get(name) != state:
                said[name] = state
                if state in ("running", "done", "failed") and args.wait:
                    print(f"{name}: {state}" + (f" (job {jobId})" if jobId else ""), flush=True)
        active = [row for row in rows if row[1] in ("queued", "running")]
        if not active:
            break
        if not args.wait:
            print(f"{len(active)} of {len(rows)} runs queued or running; `compareAfs.py ... --status` shows them, and "
                  "this command writes the table once they are done (--wait: wait for them)", flush=True)
            return False
        time.sleep(SLURM_POLL_SECONDS)
    failed = {name: detail for name, state, _, detail in rows if state in ("failed", "not submitted")}
    for run in runs:
        runHp, _ = trainLmAf.parseArgs(run["argv"])
        fillResult(run, runHp, 0, "")
        if "failure" in run and run["runName"] in failed:
            run["failure"] = f"its Slurm job failed: {failed[run['runName']].splitlines()[-1]}"
    return True


SLURM_POLL_SECONDS = 10  # --wait asks Slurm this often


def printStatus(runs, args, hp):
    """Which runs are done, queued, running or failed (with the last lines of their output), and not started."""
    study = slurmJobs.SlurmStudy(hp.dirResults, args.name)
    onSlurm = bool(study.load())
    rows = study.status(slurmRuns(runs)) if onSlurm else [localStatus(run) for run in runs]
    counts = {}
    for name, state, jobId, detail in rows:
        counts[state] = counts.get(state, 0) + 1
        print(f"{name}: {state}" + (f" (job {jobId})" if jobId else ""))
        for line in detail.splitlines():
            print(f"    {line}")
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + (" (Slurm)" if onSlurm else ""))


def localStatus(run):
    """(run name, state, '', detail) of a run trained on this machine: done, running (its log is locked by the
    trainer), stopped (a checkpoint to resume from), failed (what it wrote to stderr) or not started."""
    runHp, _ = trainLmAf.parseArgs(run["argv"])
    files = RunFiles(runHp.dirResults, run["runName"])
    if files.complete(runHp.nSteps):
        return run["runName"], "done", "", ""
    if os.path.isfile(files.log):
        with open(files.log, "a") as log:
            try:
                fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return run["runName"], "running", "", ""
    checkpoint = files.newestCheckpoint()
    if checkpoint:
        return run["runName"], "stopped", "", f"resumes from {checkpoint}"
    if os.path.isfile(files.stderr) and os.path.getsize(files.stderr):
            return run["runName"], "failed", "", slurmJobs.lastLines(files.stderr)
    return run["runName"], "not started", "", ""


def raiseKeyboardInterrupt(signum, frame):
    raise KeyboardInterrupt


def localSlots(args):
    """The scheduler's slots: one per GPU of --gpus, else --jobs on the CPU; CompareError for a GPU not there."""
    if not args.gpus:
        return scheduler.cpuSlots(args.jobs)
    try:
        return scheduler.gpuSlots(args.gpus, torch.cuda.device_count())
    except scheduler.SlotError as err:
        raise CompareError(str(err)) from None
