"""Runs commands on this machine: each task a process, started when a slot is free (a CPU share, or a GPU of its own
through CUDA_VISIBLE_DEVICES) and the tasks it comes after have succeeded; the scheduler of compareAfs.py's studies
and of bench/gpuCheck.py's checks. slurmJobs.py submits the same tasks to a Slurm cluster instead.

A task's process runs in a session of its own, so that a Ctrl-C in the terminal reaches it only as the scheduler
passes it on: "forward" (a study: each running trainLmAf.py gets SIGINT once, finishes its step, saves and stops; no
new task starts; a second Ctrl-C passes on a second SIGINT, which stops them at once) or "stop" (the checks: SIGTERM
to each running process group, SIGKILL 3 s later, and the KeyboardInterrupt goes on to the caller).
"""
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

TERMINAL = "terminal"  # Task.stdout: the scheduler's own terminal
STDOUT = "stdout"  # Task.stderr: into the task's stdout file


@dataclass
class Task:
    name: str
    argv: list  # the command
    after: tuple = ()  # names of the tasks that must succeed before it starts
    alone: bool = False  # starts only when nothing else runs, and nothing starts beside it
    timeout: float = math.inf  # seconds before it is stopped
    stdout: str = None  # a file, TERMINAL, or None (discarded)
    stderr: str = None  # a file, STDOUT, or None (discarded)
    env: dict = field(default_factory=dict)  # on top of the scheduler's environment and the slot's
    kind: str = ""  # tasks of one kind take about as long (the estimate of the time left)
    cwd: str = None  # its working folder (None: the scheduler's)


@dataclass
class Outcome:
    returncode: int = None  # None when it did not start or did not end by itself
    seconds: float = 0.0
    stopped: str = ""  # "timeout", "budget" (the scheduler's deadline) or "" (it ended by itself)
    skipped: str = ""  # why it never started: "after" (a task it comes after did not succeed) or "budget"
    failedBefore: tuple = ()  # with skipped "after": those tasks


@dataclass
class Slot:
    name: str  # for the lines the caller prints, e.g. "GPU 3"
    env: dict  # what a task on it gets, e.g. {"CUDA_VISIBLE_DEVICES": "3"}


class SlotError(Exception):
    """--gpus names no GPU of this machine; one line for the user."""


def cpuSlots(jobs):
    """jobs slots on the CPU, each with cores / jobs threads unless OMP_NUM_THREADS is set."""
    env = {} if jobs == 1 or "OMP_NUM_THREADS" in os.environ else {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    return [Slot(f"slot {index + 1}", env) for index in range(jobs)]


def gpuSlots(spec, visibleCount):
    """One slot per GPU of spec ("all" or comma-separated indices, as nvidia-smi numbers them; under a
    CUDA_VISIBLE_DEVICES of its own, indices into that list), each with CUDA_VISIBLE_DEVICES of that GPU alone and
    cores / GPUs threads unless OMP_NUM_THREADS is set. visibleCount: the GPUs this process sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in visible.split(",")] if visible else [str(i) for i in range(visibleCount)]
    names = names[:visibleCount]
    if spec == "all":
        indices = list(range(len(names)))
    else:
        try:
            indices = [int(part) for part in spec.split(",")]
        except ValueError:
            raise SlotError(f"--gpus must be 'all' or GPU indices separated by commas, got {spec!r}") from None
    missing = [i for i in indices if not 0 <= i < len(names)]
    if not names or missing or len(set(indices)) != len(indices):
        seen = f"GPUs 0-{len(names) - 1}" if len(names) > 1 else "GPU 0" if names else "no GPU"
        problem = "repeats a GPU" if not missing and names else f"names GPU {missing[0]}" if missing else "needs a GPU"
        raise SlotError(f"--gpus {spec} {problem}, but this machine has {seen}"
                        + (" (CUDA_VISIBLE_DEVICES)" if visible else ""))
    threads = {} if "OMP_NUM_THREADS" in os.environ else {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(indices)))}
    return [Slot(f"GPU {i}", {"CUDA_VISIBLE_DEVICES": names[i], **threads}) for i in indices]


class LocalScheduler:
    """Runs tasks on slots. The caller's events get onStart(task, slot) and onFinish(task, outcome), which returns
    whether the task succeeded (the tasks after it start only then); budget: seconds after which running tasks are
    stopped and no task starts (tasks that could not start with minimumStart seconds left are skipped)."""

    def __init__(self, slots, events, interrupt="forward", budget=math.inf, minimumStart=0.0, poll=0.2):
        self.slots, self.events, self.interruptMode = slots, events, interrupt
        self.budget, self.minimumStart, self.poll = budget, minimumStart, poll
        self.outcomes, self.succeeded = {}, set()
        self.running = []  # dicts: task, process, slot, start, limit, budgetBound, files
        self.interrupted = False

    def run(self, tasks):
        """Every task, in order as slots free up; {name: Outcome}. self.interrupted tells whether a Ctrl-C ended it."""
        self.began = time.monotonic()
        pending = list(tasks)
        try:
            while pending or self.running:
                try:
                    self.reap()
                    if not self.interrupted:
                        self.startReady(pending)
                    elif pending:
                        pending.clear()
                    time.sleep(self.poll)
                except KeyboardInterrupt:
                    if self.interruptMode == "stop":
                        raise
                    self.passOnInterrupt()
        finally:
            if self.interruptMode == "stop":
                for job in list(self.running):
                    self.stopJob(job)
                    self.closeFiles(job)
        return self.outcomes

    def elapsed(self):
        return time.monotonic() - self.began

    def startReady(self, pending):
        remaining = self.budget - self.elapsed()
        for task in list(pending):
            failed = tuple(name for name in task.after if name in self.outcomes and name not in self.succeeded)
            if failed:
                pending.remove(task)
                self.conclude(task, Outcome(skipped="after", failedBefore=failed))
                continue
            if any(name not in self.outcomes for name in task.after):
                continue  # what it comes after is still running or waiting
            if remaining < self.minimumStart:
                pending.remove(task)
                self.conclude(task, Outcome(skipped="budget"))
                continue
            busy = {id(job["slot"]) for job in self.running}
            free = [slot for slot in self.slots if id(slot) not in busy]
            if (task.alone and self.running) or (self.running and self.running[0]["task"].alone) or not free:
                break  # an alone task waits for an idle machine, and nothing joins one
            pending.remove(task)
            self.start(task, free[0], min(task.timeout, remaining), remaining < task.timeout)

    def start(self, task, slot, limit, budgetBound):
        files = []

        def destination(where, terminal):
            if where == terminal:
                return None if terminal == TERMINAL else subprocess.STDOUT
            if where is None:
                return subprocess.DEVNULL
            files.append(open(where, "w"))
            return files[-1]

        stdout = destination(task.stdout, TERMINAL)
        stderr = destination(task.stderr, STDOUT)
        process = subprocess.Popen(task.argv, stdout=stdout, stderr=stderr, env={**os.environ, **slot.env, **task.env},
                                   cwd=task.cwd, start_new_session=True)
        job = {"task": task, "process": process, "slot": slot, "start": time.monotonic(), "limit": limit,
               "budgetBound": budgetBound, "files": files}
        self.running.append(job)
        self.events.onStart(task, slot)
        return job

    def reap(self):
        for job in list(self.running):
            overdue = time.monotonic() - job["start"] > job["limit"]
            if job["process"].poll() is None and not overdue:
                continue
            self.running.remove(job)
            stopped = ""
            if job["process"].poll() is None:
                self.stopJob(job)
                stopped = "budget" if job["budgetBound"] else "timeout"
            self.closeFiles(job)
            self.conclude(job["task"], Outcome(None if stopped else job["process"].returncode,
                                               time.monotonic() - job["start"], stopped))

    def conclude(self, task, outcome):
        self.outcomes[task.name] = outcome
        if self.events.onFinish(task, outcome):
            self.succeeded.add(task.name)

    def passOnInterrupt(self):
        """SIGINT to each running task's process: the first finishes its step and saves, a second stops it."""
        self.interrupted = True
        for job in self.running:
            try:
                job["process"].send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        self.events.onInterrupt(len(self.running))

    @staticmethod
    def stopJob(job):
        """SIGTERM to the whole process group, SIGKILL after 3 s."""
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            try:
                os.killpg(job["process"].pid, sig)
            except ProcessLookupError:
                return
            try:
                job["process"].wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    @staticmethod
    def closeFiles(job):
        for f in job["files"]:
            f.close()
