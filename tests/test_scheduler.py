"""scheduler.py, the scheduler of studies and checks: slots on the CPU and one GPU each (CUDA_VISIBLE_DEVICES),
tasks after the tasks they need, an interrupt passed on once to each running task; and the runs' files that let a
stopped run resume (RunFiles.resumeArguments)."""
import os
import signal
import sys
import threading
import time

import pytest

from lmafs.study import scheduler
from lmafs.run.runFiles import RunFiles


class Recorder:
    def __init__(self, fail=()):
        self.started, self.finished, self.fail, self.interrupts = [], {}, set(fail), []

    def onStart(self, task, slot):
        self.started.append((task.name, slot.name))

    def onFinish(self, task, outcome):
        self.finished[task.name] = outcome
        return outcome.returncode == 0 and task.name not in self.fail

    def onInterrupt(self, running):
        self.interrupts.append(running)


def stamping(path, seconds=0.0, code=0):
    """A task that writes its CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS and start/end times to path."""
    script = ("import os, sys, time; t0 = time.time(); time.sleep(float(sys.argv[2])); "
              "open(sys.argv[1], 'w').write(f\"{os.environ.get('CUDA_VISIBLE_DEVICES')} "
              "{os.environ.get('OMP_NUM_THREADS')} {t0} {time.time()}\"); sys.exit(int(sys.argv[3]))")
    return [sys.executable, "-c", script, str(path), str(seconds), str(code)]


def readStamp(path):
    device, threads, start, end = open(path).read().split()
    return device, threads, float(start), float(end)


def testOneTaskPerGpuEachWithItsOwnDevice(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    slots = scheduler.gpuSlots("1,3", visibleCount=4)
    assert [(s.name, s.env["CUDA_VISIBLE_DEVICES"]) for s in slots] == [("GPU 1", "1"), ("GPU 3", "3")]
    events = Recorder()
    tasks = [scheduler.Task(f"t{i}", stamping(tmp_path / f"t{i}", 0.6)) for i in range(4)]
    scheduler.LocalScheduler(slots, events, poll=0.05).run(tasks)
    stamps = {name: readStamp(tmp_path / name) for name in ("t0", "t1", "t2", "t3")}
    assert {device for device, *_ in stamps.values()} == {"1", "3"}
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert all(t == threads for _, t, _, _ in stamps.values())
    # two at a time, never two on one GPU
    for a in stamps:
        for b in stamps:
            if a < b and stamps[a][0] == stamps[b][0]:
                assert stamps[a][3] <= stamps[b][2] or stamps[b][3] <= stamps[a][2], (a, b)
    assert stamps["t1"][2] < stamps["t0"][3]  # the first two side by side
    assert dict(events.started)["t0"] == "GPU 1" and dict(events.started)["t1"] == "GPU 3"


def testGpuIndicesUnderACudaVisibleDevicesOfItsOwn(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    slots = scheduler.gpuSlots("all", visibleCount=3)
    assert [s.env for s in slots] == [{"CUDA_VISIBLE_DEVICES": d} for d in ("5", "6", "7")]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in scheduler.gpuSlots("2,0", visibleCount=3)] == ["7", "5"]


@pytest.mark.parametrize("spec, visible, message", [
    ("4", 4, "--gpus 4 names GPU 4, but this machine has GPUs 0-3"),
    ("0,0", 2, "--gpus 0,0 repeats a GPU, but this machine has GPUs 0-1"),
    ("all", 0, "--gpus all needs a GPU, but this machine has no GPU"),
    ("0", 0, "--gpus 0 names GPU 0, but this machine has no GPU"),
    ("one", 2, "--gpus must be 'all' or GPU indices separated by commas, got 'one'"),
])
def testGpusThatAreNotThere(spec, visible, message, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(scheduler.SlotError) as caught:
        scheduler.gpuSlots(spec, visible)
    assert str(caught.value) == message


def testCpuSlotsShareTheCores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [s.env for s in scheduler.cpuSlots(2)] == [{"OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2))}] * 2
    assert scheduler.cpuSlots(1)[0].env == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert scheduler.cpuSlots(2)[0].env == {}


def testATaskWaitsForThoseItComesAfterAndIsSkippedWhenOneFails(tmp_path):
    events = Recorder(fail={"judged"})
    tasks = [scheduler.Task("first", stamping(tmp_path / "first", 0.3)),
             scheduler.Task("second", stamping(tmp_path / "second"), after=("first",)),
             scheduler.Task("crash", stamping(tmp_path / "crash", code=3)),
             scheduler.Task("afterCrash", stamping(tmp_path / "x"), after=("crash",)),
             scheduler.Task("judged", stamping(tmp_path / "judged")),  # exits 0, but its caller says it failed
             scheduler.Task("afterJudged", stamping(tmp_path / "y"), after=("judged",))]
    outcomes = scheduler.LocalScheduler(scheduler.cpuSlots(2), events, poll=0.05).run(tasks)
    assert readStamp(tmp_path / "second")[2] >= readStamp(tmp_path / "first")[3]
    assert outcomes["crash"].returncode == 3 and outcomes["second"].returncode == 0
    assert (outcomes["afterCrash"].skipped, outcomes["afterCrash"].failedBefore) == ("after", ("crash",))
    assert outcomes["afterJudged"].skipped == "after"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def testAnInterruptReachesEachRunningTaskOnceAndStartsNoOther(tmp_path):
    """SIGINT passed on to each running task once (a second Ctrl-C passes on another); no new task starts."""
    script = ("import signal, sys, time\n"
              "got = []\n"
              "def note(signum, frame):\n"
              "    got.append(signum)\n"
              "    open(sys.argv[1], 'a').write('SIGINT\\n')\n"
              "    if len(got) == 2: sys.exit(130)\n"
              "signal.signal(signal.SIGINT, note)\n"
              "open(sys.argv[1], 'a').write('start\\n')\n"
              "deadline = time.time() + 30\n"
              "while time.time() < deadline: time.sleep(0.02)\n")
    tasks = [scheduler.Task(f"t{i}", [sys.executable, "-c", script, str(tmp_path / f"t{i}")]) for i in range(3)]
    events = Recorder()
    runner = scheduler.LocalScheduler(scheduler.cpuSlots(2), events, poll=0.05)

    def ctrlC():
        deadline = time.time() + 30
        while not ((tmp_path / "t0").exists() and (tmp_path / "t1").exists()) and time.time() < deadline:
            time.sleep(0.05)
        for _ in range(2):
            time.sleep(0.5)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=ctrlC, daemon=True).start()
    runner.run(tasks)
    assert runner.interrupted and events.interrupts == [2, 2]
    for name in ("t0", "t1"):
        assert (tmp_path / name).read_text().splitlines() == ["start", "SIGINT", "SIGINT"]
    assert not (tmp_path / "t2").exists() and "t2" not in events.finished


def testAStoppedRunResumesFromItsNewestCheckpoint(tmp_path):
    files = RunFiles(str(tmp_path), "r")
    assert files.resumeArguments(8) == [] and files.newestCheckpoint() is None
    for step in (4, 12, 6):
        open(files.checkpoint(step), "w").close()
    open(RunFiles(str(tmp_path), "r-other").checkpoint(20), "w").close()  # another run's
    assert files.newestCheckpoint() == files.checkpoint(12)
    (tmp_path / "log-r.txt").write_text("Step 12/20   lossTr 1.0000   accTr 2.0   1s = 0.10s/step\n")
    assert files.resumeArguments(20) == ["--resumeFrom", files.checkpoint(12)]
    (tmp_path / "log-r.txt").write_text("Step 20/20   lossVa 1.0000   accVa 2.0\n")
    assert files.complete(20) and files.resumeArguments(20) == []  # done: trainLmAf.py says "already complete"
