"""compareAfs.py --launcher slurm against a real Slurm (slurmctld and slurmd on this machine, .ci/startSlurm.sh): a
two-seed study with phase I and phase II gives the local runner's table; a job signalled with SIGTERM mid-run is
requeued and ends on the final line of an uninterrupted run; a run that fails is reported with its last lines.
Skipped where no slurmctld answers (the README's test command then still passes on a laptop)."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time

import pytest

import compareAfs
from conftest import PRETENDED_CUDA, tinyFlags


def slurmAnswers():
    if shutil.which("scontrol") is None:
        return "no Slurm client commands (apt-get install slurm-wlm munge, then .ci/startSlurm.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scontrol ping failed: {err}"
    if "UP" not in ping:
        return f"no slurmctld answers (scontrol ping: {ping.strip()}); start one with .ci/startSlurm.sh"
    if importlib.util.find_spec("submitit") is None:
        return "submitit is not installed"
    return ""


REASON = "torch claims a GPU here (tests/pretendCuda); Slurm jobs test no CUDA path" if PRETENDED_CUDA else \
    slurmAnswers()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON)


def studyFlags(dataDir, resultsDir, **overrides):
    return tinyFlags(dataDir, resultsDir, **{"nSteps": 6, "nStepsWarmup": 1, "nStepsCooldown": 2, "valEvery": 3,
                                             **overrides})


def comparable(path, folder):
    """The table without what differs between two launches of the same runs: the folder, tokens/s."""
    text = open(path).read().replace(str(folder), "DIR")
    return [re.sub(r"\| [\d,]+ \| (\d+/\d+) \|$", r"| \1 |", line) for line in text.splitlines()]


def waitUntil(condition, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"waited {seconds} s for {what}"
        time.sleep(1)


def jobOf(folder, name, runName):
    with open(os.path.join(folder, "submitit", f"jobs-{name}.json")) as f:
        return json.load(f)[runName]["job"]


def testASlurmStudyGivesTheLocalTable(tinyData, tmp_path, capsys):
    common = ["--afTypes", "gelu", "--variant", "sp=spline;att-spline", "--splinePhases", "2", "--splineModels",
              "2", "--seeds", "0,1", "--name", "s", "--baseline", "gelu"]
    assert compareAfs.main(common + studyFlags(tinyData, tmp_path / "local")) == 0, capsys.readouterr().err
    slurm = common + studyFlags(tinyData, tmp_path / "slurm") + ["--launcher", "slurm"]
    assert compareAfs.main(slurm) == 0  # submits and returns
    out = capsys.readouterr().out
    assert "submitted 6 run(s) to Slurm" in out and "--status" in out
    with open(tmp_path / "slurm" / "submitit" / "jobs-s.json") as f:
        jobs = json.load(f)
    # the four runs that can start now are one array; each phase II its own job, after its phase I
    arrays = {name: job["job"].split("_")[0] for name, job in jobs.items()}
    assert len({arrays[n] for n in ("s-gelu-s0", "s-gelu-s1", "s-sp-s0-phase1", "s-sp-s1-phase1")}) == 1
    assert "_" not in jobs["s-sp-s0"]["job"] and arrays["s-sp-s0"] != arrays["s-gelu-s0"]
    dependency = subprocess.run(["scontrol", "show", "job", jobs["s-sp-s1"]["job"]], capture_output=True,
                                text=True).stdout
    assert re.search(r"Dependency=(afterok:" + re.escape(jobs["s-sp-s1-phase1"]["job"]) + r"|\(null\))", dependency)
    assert compareAfs.main(slurm + ["--wait"]) == 0, capsys.readouterr().err
    assert "submitted" not in capsys.readouterr().out  # nothing missing: nothing submitted again
    assert comparable(tmp_path / "slurm" / "compare-s.md", tmp_path / "slurm") == \
        comparable(tmp_path / "local" / "compare-s.md", tmp_path / "local")
    assert compareAfs.main(slurm + ["--status"]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[-1] == "6 done (Slurm)" and all(": done (job " in line for line in status[:-1])
    assert os.path.isfile(jobs["s-sp-s0"]["stdout"]) and "s-sp-s0" in open(jobs["s-sp-s0"]["stdout"]).read()


def testAJobStoppedBySigtermIsRequeuedAndResumes(tinyData, tmp_path, capsys):
    """Slurm's SIGTERM (a preemption, or scancel --signal TERM) reaches the trainer, which saves; the job requeues
    itself and resumes from that checkpoint, to the final line of a run never stopped (Slurm starts a requeued job
    after a delay of about two minutes)."""
    flags = dict(nSteps=300, nStepsWarmup=10, nStepsCooldown=100, valEvery=100, plotEvery=50, dimEmb=64,
                 seqLength=128, contextSize=64, nTokensVa=512)
    common = ["--afTypes", "gelu", "--seeds", "0", "--name", "q"]
    assert compareAfs.main(common + studyFlags(tinyData, tmp_path / "local", **flags)) == 0
    argv = common + studyFlags(tinyData, tmp_path / "slurm", **flags) + ["--launcher", "slurm"]
    assert compareAfs.main(argv) == 0
    log = tmp_path / "slurm" / "log-q-gelu-s0.txt"
    waitUntil(lambda: log.exists() and "Step 101/300" in log.read_text(), 240, "step 101")
    jobId = jobOf(tmp_path / "slurm", "q", "q-gelu-s0")
    subprocess.run(["scancel", "--signal", "TERM", jobId], check=True)
    waitUntil(lambda: "Stopped at step" in log.read_text(), 60, "the trainer's save on SIGTERM")
    assert compareAfs.main(argv + ["--wait"]) == 0, capsys.readouterr().err
    text = log.read_text()
    stopped = int(re.search(r"Stopped at step (\d+)/300", text).group(1))
    assert f"==== resuming from {tmp_path / 'slurm'}/pt-q-gelu-s0-step{stopped:04d}.pt at step {stopped}" in text
    final = [line for line in text.splitlines() if line.startswith("Step 300/300   ")]
    local = [line for line in (tmp_path / "local" / "log-q-gelu-s0.txt").read_text().splitlines()
             if line.startswith("Step 300/300   ")]
    assert [line for line in final if "Va " in line] == [line for line in local if "Va " in line]
    assert subprocess.run(["scontrol", "show", "job", jobId], capture_output=True, text=True).stdout.count(
        "Restarts=1") == 1


def testAFailedRunIsReportedWithItsLastLines(tinyData, tmp_path, capsys):
    argv = ["--afTypes", "gelu", "--variant", "boom=gelu --lr 1e30", "--seeds", "0", "--name", "f", "--launcher",
            "slurm"] + studyFlags(tinyData, tmp_path)
    assert compareAfs.main(argv + ["--wait"]) == 1
    captured = capsys.readouterr()
    assert "1 of 2 runs failed: f-boom-s0" in captured.err
    table = open(tmp_path / "compare-f.md").read()
    assert "`f-boom-s0`: its Slurm job failed: " in table
    assert compareAfs.main(argv + ["--status"]) == 0
    status = capsys.readouterr().out
    assert re.search(r"^f-boom-s0: failed \(job \d+_1\)$", status, re.M)
    assert "non-finite training loss" in status and status.strip().endswith("1 done, 1 failed (Slurm)")


def testAPartitionSlurmDoesNotKnowIsOneLineBeforeAnySubmission(tinyData, tmp_path, capsys):
    argv = ["--afTypes", "gelu", "--launcher", "slurm", "--slurmPartition", "nosuch"] + studyFlags(tinyData,
                                                                                                     tmp_path / "out")
    assert compareAfs.main(argv) == 2
    err = capsys.readouterr().err
    known = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    assert err == f"error: Slurm knows no partition 'nosuch' (sinfo: {', '.join(p.rstrip('*') for p in known)})\n"
    assert not (tmp_path / "out").exists()
