"""A study's trainLmAf.py runs as Slurm jobs, through submitit: the runs that can start now as one job array, each
phase II a job of its own that starts after its phase I succeeded (afterok), only the runs not done and not queued;
each job resumes its run from the newest checkpoint, and a job stopped by its time limit or preempted comes back by
itself (requeued) and continues from the checkpoint the run saved on the signal. The jobs' output goes to
DIRRESULTS/submitit/ (the trainer's errors to DIRRESULTS/stderr-RUN.txt, as in a local study), and which job runs
which run to DIRRESULTS/submitit/jobs-NAME.json.
"""
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from lmafs.atomicFiles import atomicWriteText
from lmafs.run.runFiles import RunFiles

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINER = os.path.join(REPO, "trainLmAf.py")
FOLDER = "submitit"  # under dirResults
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


class SlurmError(Exception):
    """Slurm or submitit cannot take the study; one line for the user."""


@dataclasses.dataclass
class SlurmSettings:
    partition: str = ""
    minutes: int = 60  # each job's time limit; a run that needs longer is requeued and resumes
    gpusPerRun: int = 0
    cpusPerRun: int = 1
    account: str = ""
    extra: dict = dataclasses.field(default_factory=dict)  # other sbatch options, KEY=VALUE


def parseTime(text):
    """Slurm's time formats (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes (at least 1)."""
    days, _, rest = text.partition("-") if "-" in text else ("0", "", text)
    parts = rest.split(":")
    try:
        numbers = [int(part) for part in parts]
        days = int(days)
    except ValueError:
        raise SlurmError(f"--slurmTime {text!r} is not a Slurm time (MINUTES, HH:MM:SS or D-HH:MM)") from None
    if "-" in text:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (numbers + [0, 0])[:3]
    elif len(numbers) == 1:
        hours, minutes, seconds = 0, numbers[0], 0
    elif len(numbers) == 2:
        hours, minutes, seconds = 0, numbers[0], numbers[1]
    else:
        hours, minutes, seconds = numbers[:3]
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total < 1 or min(numbers + [days]) < 0:
        raise SlurmError(f"--slurmTime {text!r} must be at least one minute")
    return total


def parseExtra(items):
    """--slurmExtra KEY=VALUE (repeatable) -> {KEY: VALUE}, KEY as sbatch spells it without the dashes."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().lstrip("-"):
            raise SlurmError(f"--slurmExtra {item!r} must be KEY=VALUE, e.g. qos=high or constraint=a100")
        extra[key.strip().lstrip("-")] = value
    return extra


def slurmCommand(argv):
    """The output of a Slurm client command; SlurmError when Slurm cannot be asked."""
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]} is not on PATH: --launcher slurm runs where Slurm's client commands are")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer within 60 s: is slurmctld reachable?") from None
    if proc.returncode:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise SlurmError(f"{' '.join(argv)} failed: {message[-1] if message else f'exit code {proc.returncode}'}")
    return proc.stdout


def checkCluster(settings):
    """submitit installed, slurmctld answering, the partition known: else SlurmError before anything is submitted."""
    if importlib.util.find_spec("submitit") is None:
        raise SlurmError("--launcher slurm submits through submitit, which is not installed: pip install submitit")
    answer = slurmCommand(["scontrol", "ping"])
    if "UP" not in answer:
        raise SlurmError(f"no reachable slurmctld: scontrol ping says {answer.strip() or 'nothing'}")
    if settings.partition:
        known = [name.rstrip("*") for name in slurmCommand(["sinfo", "-h", "-o", "%P"]).split()]
        if settings.partition not in known:
            raise SlurmError(f"Slurm knows no partition {settings.partition!r} (sinfo: {', '.join(known) or 'none'})")


class TrainerRun:
    """What a Slurm job runs: trainLmAf.py with the run's flags, from the run's newest checkpoint when it has one.
    The trainer saves on SIGTERM and exits 128+15; submitit's SIGUSR2 before the time limit reaches checkpoint(),
    which sends the trainer SIGTERM and hands submitit the same run to requeue. A SIGTERM from Slurm (a preemption,
    `scancel --signal TERM`) reaches the trainer directly; the run then asks submitit to requeue it the same way."""

    def __init__(self, argv, dirResults, runName, nSteps):
        self.argv, self.dirResults, self.runName, self.nSteps = list(argv), dirResults, runName, nSteps
        self.process = None

    def __call__(self):
        files = RunFiles(self.dirResults, self.runName)
        argv = [sys.executable, TRAINER] + self.argv + files.resumeArguments(self.nSteps)
        print(f"{self.runName}: {' '.join(argv)}", flush=True)
        # submitit's SIGUSR2 warning is for this process; Slurm signals every process of the job, and the trainer
        # would die of it without saving
        # its errors next to its log (as a local study keeps them), appended over requeues
        with open(files.stderr, "a") as stderr:
            self.process = subprocess.Popen(argv, stderr=stderr,
                                            preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
            code = None
            while code is None:
                time.sleep(1)
                code = self.reap(os.WNOHANG)
        if code == 128 + signal.SIGTERM and not files.complete(self.nSteps):
            os.kill(os.getpid(), signal.SIGUSR2)  # submitit requeues the job, which resumes from the checkpoint
            signal.pause()
        if code != 0:
            raise RuntimeError(f"trainLmAf.py exited with code {code}: {lastLines(files.stderr, count=1)}")
        return self.runName

    def reap(self, flags):
        """The trainer's exit code, or None while it runs (flags os.WNOHANG). os.waitpid, not Popen.wait: checkpoint()
        runs in a signal handler that may interrupt __call__'s wait, and Popen.wait's lock would deadlock there."""
        pid, status = os.waitpid(self.process.pid, flags)
        if pid == 0:
            return None
        self.process.returncode = os.waitstatus_to_exitcode(status)
        return self.process.returncode

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)  # it finishes its step, saves and exits
            try:
                self.reap(0)
            except ChildProcessError:  # __call__ reaped it just before the signal
                pass
        return DelayedSubmission(TrainerRun(self.argv, self.dirResults, self.runName, self.nSteps))


class SlurmStudy:
    """The Slurm jobs of one study (its dirResults and name): submitting what is missing, and what the queue says."""

    def __init__(self, dirResults, name, settings=None):
        self.folder = os.path.join(dirResults, FOLDER)
        self.stateFile = os.path.join(self.folder, f"jobs-{name}.json")
        self.settings = settings or SlurmSettings()

    def load(self):
        """{run name: {'job', 'stdout', 'stderr'}} of the jobs submitted so far."""
        if not os.path.isfile(self.stateFile):
            return {}
        with open(self.stateFile) as f:
            return json.load(f)

    def save(self, jobs):
        os.makedirs(self.folder, exist_ok=True)
        atomicWriteText(self.stateFile, json.dumps(jobs, indent=1, sort_keys=True))

    def queueStates(self, jobIds):
        """{job id: (state, reason)} of those jobs Slurm still knows (pending, running and recently ended)."""
        if not jobIds:
            return {}
        states = {}
        for line in slurmCommand(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r"]).splitlines():
            jobId, state, reason = (line.split("|") + ["", ""])[:3]
            states[jobId.strip()] = (state.strip(), reason.strip())
        return {jobId: states[jobId] for jobId in jobIds if jobId in states}

    def executor(self, jobName):
        import submitit

        executor = submitit.SlurmExecutor(folder=os.path.join(self.folder, "%j"))
        settings = self.settings
        parameters = {"time": settings.minutes, "cpus_per_task": settings.cpusPerRun, "job_name": jobName,
                      "setup": [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}",
                                f"export OMP_NUM_THREADS={settings.cpusPerRun}"],
                      "additional_parameters": dict(settings.extra)}
        if settings.partition:
            parameters["partition"] = settings.partition
        if settings.gpusPerRun:
            parameters["gpus_per_node"] = settings.gpusPerRun
        if settings.account:
            parameters["account"] = settings.account
        executor.update_parameters(**parameters)
        return executor

    def submit(self, runs, jobName):
        """Submit the runs (dicts with runName, argv, dirResults, nSteps, after: the run name it follows or None)
        that are neither complete nor queued or running: the ready ones as one array, each follower after its
        predecessor's job (afterok; Slurm cancels it when that job fails). Returns {run name: job id} submitted."""
        jobs = self.load()
        active = {jobId for jobId, (state, _) in self.queueStates([j["job"] for j in jobs.values()]).items()
                  if state in ACTIVE_STATES}
        queued = {name for name, job in jobs.items() if job["job"] in active}
        done = {run["runName"] for run in runs if RunFiles(run["dirResults"], run["runName"]).complete(run["nSteps"])}
        missing = [run for run in runs if run["runName"] not in done | queued]
        ready = [run for run in missing if run["after"] is None or run["after"] in done]
        followers = [run for run in missing if run not in ready]
        executor = self.executor(jobName)
        submitted = {}
        if ready:
            with executor.batch():
                pending = [(run, executor.submit(self.trainerRun(run))) for run in ready]
            for run, job in pending:
                submitted[run["runName"]] = job
        for run in followers:
            before = submitted.get(run["after"]) or jobs.get(run["after"], {}).get("job")
            jobId = before.job_id if hasattr(before, "job_id") else before
            executor.update_parameters(dependency=f"afterok:{jobId}",
                                       additional_parameters={**self.settings.extra, "kill-on-invalid-dep": "yes"})
            submitted[run["runName"]] = executor.submit(self.trainerRun(run))
        for name, job in submitted.items():
            jobs[name] = {"job": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
        if submitted:
            self.save(jobs)
        return {name: job.job_id for name, job in submitted.items()}

    @staticmethod
    def trainerRun(run):
        return TrainerRun(run["argv"], run["dirResults"], run["runName"], run["nSteps"])

    def status(self, runs):
        """(run name, state, job id or '', detail) per run: done, queued, running, failed (with the last lines of
        its job's output) or not submitted."""
        jobs = self.load()
        states = self.queueStates([job["job"] for job in jobs.values()])
        rows = []
        for run in runs:
            name, job = run["runName"], jobs.get(run["runName"])
            if RunFiles(run["dirResults"], name).complete(run["nSteps"]):
                rows.append((name, "done", job["job"] if job else "", ""))
            elif job is None:
                rows.append((name, "not submitted", "", ""))
            else:
                state, reason = states.get(job["job"], ("", ""))
                if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"):
                    rows.append((name, "queued", job["job"], reason if reason not in ("None", "") else ""))
                elif state in ACTIVE_STATES:
                    rows.append((name, "running", job["job"], ""))
                else:
                    rows.append((name, "failed", job["job"], lastLines(RunFiles(run["dirResults"], name).stderr,
                                                                       job["stderr"], job["stdout"])))
        return rows


def lastLines(*paths, count=5):
    """The last non-empty lines of the first of the files that has any (a job's stderr, then its stdout)."""
    for path in paths:
        if path and os.path.isfile(path):
            with open(path, errors="replace") as f:
                lines = [line.rstrip() for line in f if line.strip()]
            if lines:
                return "\n".join(lines[-count:])
    return "(no output)"
