"""Every command of README.md and docs/ is checked against the code, so that the documentation cannot drift from it:
what a CPU runs in seconds runs (a study's --dryRun, the GPU check's --dryRun, gathering a corpus), every other
command of this repository's scripts has its flags parsed and checked (trainLmAf.py's flags' checks too), and a
command with placeholders (`...`, `[--flag X]`, `<...>`) has its flag names checked. Shell setup (git, pip, cp, ...)
and the test command itself are the only things not checked."""
import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

import compareAfs
import evalBlimp
import evalHarness
import generate
import plotting
import preprocessFineweb
import trainLmAf
from conftest import REPO
from lmafs.run import flagChecks
from lmafs.study import studyRuns

SHELL_SETUP = ("git", "pip", "mkdir", "cp", "cd", "apt-get")
DOCS = ["README.md"] + sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "docs", "*.md")))


def documentedCommands():
    """(file, command words) of every command in the ```bash blocks of the documentation, continuation lines
    joined, comments dropped, leading VAR=value assignments removed."""
    found = []
    for name in DOCS:
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            text = f.read()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                for command in line.split(" && "):
                    words = shlex.split(command, comments=True)
                    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                        words = words[1:]
                    if words:
                        found.append((name, words))
    return found


def isPlaceholder(words):
    return any(word == "..." or word.startswith(("[", "<")) or word.endswith("]") for word in words)


def knownFlags(parser):
    return {option for action in parser._actions for option in action.option_strings}


def flagsOf(words):
    return {word.split("=")[0] for word in words if word.startswith("--")}


def trainerCheck(argv):
    hp, _ = trainLmAf.parseArgs(argv)
    flagChecks.checkFlags(hp)


def runQuietly(function, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        return function(argv), out.getvalue()


def standInAfFiles(argv, folder):
    """The AF files a documented study loads, so that its plan-time check of each runs: the repository's
    (results-fineweb10B/) linked, and each seed's file of an earlier study's phase I written as shared splines of
    the study's layer count (that study is not run here)."""
    import torch

    from activationFunctions import FORMAT

    os.symlink(os.path.join(REPO, "results-fineweb10B"), folder / "results-fineweb10B")
    seeds = argv[argv.index("--seeds") + 1].split(",") if "--seeds" in argv else ["0"]
    nLayers = 4 if "medium" in argv else 2
    variants = [shlex.split(argv[i + 1]) for i, word in enumerate(argv[:-1]) if word == "--variant"]
    files = [words[i + 1] for words in variants for i, word in enumerate(words[:-1]) if word == "--afFileToLoad"]
    for seed, pattern in ((seed, f) for seed in seeds for f in files if "{seed}" in f):
        path = folder / pattern.replace("{seed}", seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        knots = torch.linspace(-15, 15, 64, device="cpu")
        torch.save({"format": FORMAT, "knots": knots, "nLayers": nLayers, "afTypeMlp": "spline", "afTypeAtt": "spline",
                    "mlpValues": [torch.relu(knots) ** 2] * nLayers, "attValues": [knots] * nLayers}, path)


COMMANDS = documentedCommands()


def testTheDocumentationHasCommandsToCheck():
    scripts = {words[1] for _, words in COMMANDS if words[0] == "python" and len(words) > 1}
    assert {"trainLmAf.py", "compareAfs.py", "preprocessFineweb.py", "generate.py", "evalBlimp.py", "evalHarness.py",
            "plotting.py", "bench/gpuCheck.py"} <= scripts, scripts
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("where, words", COMMANDS, ids=[f"{n}:{' '.join(w)[:60]}" for n, w in COMMANDS])
def testEveryDocumentedCommand(where, words, tmp_path, monkeypatch):
    program, argv = words[0], words[1:]
    if program in SHELL_SETUP or words[:3] in (["python", "-m", "pip"], ["python", "-m", "pytest"]):
        return  # installing and copying, and this very test command: not this repository's scripts
    monkeypatch.chdir(tmp_path)
    if program == "bash":
        assert argv[0] == "recipes/studyLearnedAfs.sh", words
        corpus = tmp_path / argv[1]
        # enough text, of enough distinct words, for a validation shard and a vocabulary of 4,096 ids
        vocabulary = [f"w{i}x{i * 7919 % 1000}" for i in range(6000)]
        corpus.write_text("\n\n".join(" ".join(vocabulary[(j * 37 + k) % 6000] for k in range(60))
                                       for j in range(4000)))
        standInAfFiles(argv, tmp_path)
        proc = subprocess.run(["bash", os.path.join(REPO, argv[0])] + argv[1:] + ["--dryRun", "--device", "cpu"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert re.search(r"^\[\d+/\d+\] study-", proc.stdout, re.M)
        return
    assert program == "python", words
    script, argv = argv[0], argv[1:]
    if isPlaceholder(argv):  # only the flag names can be checked
        known = knownFlags(trainLmAf.buildParser())
        if script == "compareAfs.py":  # and compareAfs.py's own, from its --help
            with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
                compareAfs.main(["--help"])
            known |= set(re.findall(r"--\w+", out.getvalue()))
        else:
            assert script == "trainLmAf.py", words
        assert flagsOf(argv) <= known, flagsOf(argv) - known
        return
    if script == "trainLmAf.py":
        trainerCheck(argv)
    elif script == "compareAfs.py":
        monkeypatch.setattr(studyRuns.torch.cuda, "device_count", lambda: 4)  # for --gpus all
        code, out = runQuietly(compareAfs.main, argv + ["--dryRun"])
        assert code == 0 and out.startswith("[1/"), out[-2000:]
    elif script == "preprocessFineweb.py":
        preprocessFineweb.parseArgs(argv)
    elif script in ("generate.py", "evalBlimp.py", "evalHarness.py"):
        {"generate.py": generate, "evalBlimp.py": evalBlimp, "evalHarness.py": evalHarness}[script].parseArgs(argv)
    elif script == "plotting.py":
        plotting.parseArgs(argv)
    elif script == "recipes/pythonCorpus.py":
        proc = subprocess.run([sys.executable, os.path.join(REPO, script)] + argv + ["--chars", "20000"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and os.path.getsize(tmp_path / argv[0]) >= 20000, proc.stderr[-2000:]
    elif script == "bench/gpuCheck.py":
        proc = subprocess.run([sys.executable, os.path.join(REPO, script)] + argv
                              + ([] if "--dryRun" in argv else ["--dryRun"]), capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert proc.returncode == 0 and "estimated compile on a cold cache" in proc.stdout, proc.stderr[-2000:]
    else:
        raise AssertionError(f"{where}: no check for {script}")
