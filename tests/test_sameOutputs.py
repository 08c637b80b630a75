"""A fixed run's outputs stay what they were: phase I with staggered starts, two models per pass, validation,
plottingLevel 3, model and AF checkpoints, and a resume from the mid-run checkpoint into a second folder, compared
with the reference in tests/data/sameOutputs (log lines, metrics rows, ptAf files, checkpoint contents, --help).

Timings, timestamps, the machine and the paths are normalised away; everything else must be equal, tensors bit
for bit. After a change that is meant to change these outputs, record the reference again:
    OMP_NUM_THREADS=1 python tests/test_sameOutputs.py record
"""
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from conftest import REPO, runTrainer  # noqa: E402
from tokenShards import writeShard  # noqa: E402

REFERENCE = os.path.join(HERE, "data", "sameOutputs")
SEPARATOR = 255  # a 256-token vocabulary keeps the checkpoints small
TIMING_FIELDS = {"trainSeconds", "seconds"}  # in the checkpoint: the run's own wall-clock figures


def writeData(folder):
    """Two training shards and one validation shard of random documents, the same on every call."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for name, nTokens in (("fineweb_val_000000.bin", 3000), ("fineweb_train_000001.bin", 6000),
                          ("fineweb_train_000002.bin", 5000)):
        tokens = []
        while len(tokens) < nTokens:
            tokens.append(SEPARATOR)
            tokens.extend(rng.integers(0, SEPARATOR, rng.integers(5, 60)).tolist())
        writeShard(os.path.join(folder, name), np.array(tokens[:nTokens]))


def runFlags(dataDir, resultsDir):
    flags = {"filesTokensTr": f"{dataDir}/fineweb_train_*.bin", "filesTokensVa": f"{dataDir}/fineweb_val_*.bin",
             "dirResults": resultsDir, "runName": "same", "tokenDocSep": SEPARATOR, "nLayers": 2, "nHeads": 2,
             "dimEmb": 32, "seqLength": 32, "contextSize": 16, "nSteps": 8, "nStepsWarmup": 2, "nStepsCooldown": 3,
             "nModels": 3, "staggeredStarts": 2, "modelsPerPass": 2, "afType": "spline;att-spline",
             "afSmoothness": 0.001, "valEvery": 4, "plotEvery": 4, "nTokensVa": 256, "plottingLevel": 3,
             "saveModelEvery": 4, "saveAfEvery": 4, "device": "cpu"}
    return [part for name, value in flags.items() for part in (f"--{name}", str(value))]


def normaliseLog(text, root):
    """The log's lines less what differs between machines and runs: time, durations, paths, machine, commit."""
    lines = []
    for line in text.replace(root, "<root>").splitlines():
        if line.startswith(("command: ", "git commit ", "python ", "device: ")):
            continue
        line = re.sub(r"^(==== trainLmAf\.py  )\S+ \S+", r"\1<time>", line)
        line = re.sub(r"\d+s = \d+\.\d+s/step", "<seconds>s = <seconds>s/step", line)
        lines.append(line)
    return lines


def metricsRows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "trainSeconds"} for row in csv.DictReader(f)]


def digest(value, root):
    """A JSON-able picture of a loaded .pt file: tensors as dtype, shape and the SHA-256 of their bytes, paths
    normalised, timing fields dropped."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        tensor = torch.as_tensor(value).detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        return ["tensor", str(tensor.dtype), list(tensor.shape), hashlib.sha256(data).hexdigest()]
    if isinstance(value, dict):
        return {str(k): digest(v, root) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, (list, tuple)):
        return [digest(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<root>")
    if isinstance(value, float):
        return float.hex(value)
    return repr(value)


def collect(root):
    """Every output of the two runs under root, as the reference stores them."""
    outputs = {}
    for folder in ("full", "resumed"):
        path = os.path.join(root, folder)
        names = sorted(os.listdir(path))
        files = {"names": names}
        for name in names:
            full = os.path.join(path, name)
            if name.startswith("log-"):
                files[name] = normaliseLog(open(full).read(), root)
            elif name.startswith("metrics-"):
                files[name] = metricsRows(full)
            elif name.endswith(".csv"):
                files[name] = open(full).read()
            elif name.endswith(".pt"):
                files[name] = digest(torch.load(full, weights_only=False), root)
        outputs[folder] = files
    return outputs


def runBoth(root):
    """The fixed run into root/full, then its step-4 checkpoint resumed into root/resumed."""
    data = os.path.join(root, "data")
    writeData(data)
    full = runTrainer(runFlags(data, os.path.join(root, "full")))
    assert full.returncode == 0, full.stderr
    resumed = runTrainer(["--resumeFrom", os.path.join(root, "full", "pt-same-step0004.pt"),
                          "--dirResults", os.path.join(root, "resumed")])
    assert resumed.returncode == 0, resumed.stderr
    return collect(root)


def helpText():
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "trainLmAf.py", "--help"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def loadReference():
    with open(os.path.join(REFERENCE, "outputs.json")) as f:
        outputs = json.load(f)
    with open(os.path.join(REFERENCE, "help.txt")) as f:
        return outputs, f.read()


def testRunOutputsMatchTheReference(tmp_path):
    expected, _ = loadReference()
    actual = json.loads(json.dumps(runBoth(str(tmp_path))))
    for folder in ("full", "resumed"):
        assert actual[folder]["names"] == expected[folder]["names"], folder
        for name in expected[folder]["names"]:
            assert actual[folder].get(name) == expected[folder].get(name), f"{folder}/{name} differs"
    assert actual == expected


def testHelpIsUnchanged():
    assert helpText() == loadReference()[1]


def record():
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        outputs = runBoth(root)
    os.makedirs(REFERENCE, exist_ok=True)
    text = io.StringIO()
    json.dump(outputs, text, indent=1, sort_keys=True)
    with open(os.path.join(REFERENCE, "outputs.json"), "w") as f:
        f.write(text.getvalue() + "\n")
    with open(os.path.join(REFERENCE, "help.txt"), "w") as f:
        f.write(helpText())


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python tests/test_sameOutputs.py record")
    record()
