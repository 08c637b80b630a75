"""A fixed run's outputs stay what they were: phase I with staggered starts, two models per pass, validation,
plottingLevel 3, model and AF checkpoints, and a resume from the mid-run checkpoint into a second folder, compared
with the reference in tests/data/sameOutputs (log lines, metrics rows, ptAf files, checkpoint contents, --help).

Timings, timestamps, the machine and the paths are normalised away. Structure must be equal exactly: file names,
the log's lines and their order, the text around every number and the number's printed format, metrics columns
and row keys, checkpoint keys, tensor shapes and dtypes, integers. Floating-point values are compared with the
tolerances below, because float32 sums come out in a different order on another CPU or thread count and so differ
in their last bits (e.g. `AF smoothness S 8.2991` where the recording machine printed `8.2990`). Checkpoint tensors
are stored as their dtype, shape, mean, mean absolute value, largest absolute value and a fixed sample of elements
(all of them for small tensors such as the AF values), which keeps the reference small. After a change that is
meant to change these outputs, record the reference again:
    OMP_NUM_THREADS=1 python tests/test_sameOutputs.py record
"""
import copy
import csv
import hashlib
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
from lmafs.data.tokenShards import writeShard  # noqa: E402

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


def summary(value, root):
    """A JSON-able picture of a loaded .pt file: floating-point tensors as dtype, shape, statistics and a sample
    (see the module docstring), other tensors (the RNG states) as the SHA-256 of their bytes, which every machine
    reproduces; paths normalised, timing fields dropped."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        tensor = torch.as_tensor(value).detach().cpu().contiguous()
        picture = {"dtype": str(tensor.dtype), "shape": list(tensor.shape)}
        if not tensor.is_floating_point():
            data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            return {"tensor": {**picture, "sha256": hashlib.sha256(data).hexdigest()}}
        flat = tensor.reshape(-1).double()
        if flat.numel() <= SAMPLE_SIZE:
            sample = flat
        else:
            sample = flat[torch.linspace(0, flat.numel() - 1, SAMPLE_SIZE).round().long()]
        stats = ([flat.mean().item(), flat.abs().mean().item(), flat.abs().max().item()] if flat.numel() else [])
        return {"tensor": {**picture, "meanAbsMeanAbsMax": [shortFloat(x) for x in stats],
                           "sample": [shortFloat(x) for x in sample.tolist()]}}
    if isinstance(value, dict):
        return {str(k): summary(v, root) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, (list, tuple)):
        return [summary(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<root>")
    if isinstance(value, float):
        return value
    if isinstance(value, (bool, int)) or value is None:
        return value
    return repr(value)


def shortFloat(value):
    """The value as the shortest decimal that reads back as the same float32: the tensors are float32, so more
    digits would only grow the reference."""
    return float(str(np.float32(value)))


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
                with open(full, newline="") as f:
                    files[name] = {"csvRows": list(csv.reader(f))}
            elif name.endswith(".pt"):
                files[name] = summary(torch.load(full, weights_only=False), root)
        outputs[folder] = files
    return outputs


# ---- Comparison: structure exactly, floating-point values within a tolerance
#
# The tolerance. The run is 8 steps of float32 training. On another CPU, instruction set or thread count its sums
# are added in another order, so every result differs by a few float32 ulps (relative ~1e-7), and Adam's
# normalised updates carry that through the steps: an element whose gradient is near zero can move by much more
# than its own last bits, though never by much compared with the other elements of its tensor. Measured against
# the machine that recorded the first reference and against this machine restricted to other CPU kernels
# (ATEN_CPU_CAPABILITY=default, MKL_ENABLE_INSTRUCTIONS=SSE4_2), values moved by at most 4.4e-5 of their tensor's
# (or AF row's) largest |value|, and printed numbers by one unit in their last digit. RELATIVE is ~20 times that
# drift and still far below a deliberate change (a changed learning rate, init or formula moves the losses and
# weights by 1e-2 or more). So:
# - a tensor element, an AF value in the ptAf .csv, or a float in a list of floats (the checkpoint's history)
#   may differ by RELATIVE times the largest |value| of its tensor, row or list (torch.testing's rtol and atol in
#   one, with atol scaled to the tensor: a near-zero element of a cancelling sum gets an absolute error on the
#   tensor's scale, not its own);
# - a lone float by RELATIVE of itself;
# - a printed number by RELATIVE of itself plus one unit in its last printed digit, which absorbs rounding to the
#   other side; its format (decimals, exponent, digit grouping) must be the same;
# - integers (steps, token counts, shapes), text, keys and the order of everything must be equal.
RELATIVE = 1e-3
SAMPLE_SIZE = 64
NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def closeEnough(actual, expected, scale=0.0):
    return abs(actual - expected) <= RELATIVE * max(abs(expected), scale)


def printedNumberDiffers(actual, expected):
    """Why two printed numbers differ, or None (see the tolerance above)."""
    def form(text):
        mantissa, _, exponent = text.lower().partition("e")
        decimals = len(mantissa.partition(".")[2]) if "." in mantissa else None
        return (decimals, exponent != "", "," in mantissa), int(exponent or 0)

    (expectedForm, exponent), (actualForm, _) = form(expected), form(actual)
    if actualForm != expectedForm:
        return f"format {actual!r} != {expected!r}"
    decimals, hasExponent, _ = expectedForm
    if decimals is None and not hasExponent:
        return None if actual == expected else f"{actual} != {expected}"
    a, e = float(actual.replace(",", "")), float(expected.replace(",", ""))
    lastDigit = 10.0 ** (exponent - (decimals or 0))
    return None if abs(a - e) <= RELATIVE * abs(e) + lastDigit * (1 + 1e-9) else f"{actual} != {expected}"


def textDiffers(actual, expected):
    """Why two lines of text differ, or None: the text between numbers equal, the numbers as printedNumberDiffers."""
    if NUMBER.split(actual) != NUMBER.split(expected):
        return f"{actual!r} != {expected!r}"
    for a, e in zip(NUMBER.findall(actual), NUMBER.findall(expected)):
        why = printedNumberDiffers(a, e)
        if why:
            return f"{why} in {expected!r}"
    return None


def csvDiffers(actual, expected):
    """Why two ptAf .csv files differ, or None: the same rows and columns, each cell written the same way (float32's
    or float64's shortest form), each value within RELATIVE of its row's largest |value|."""
    def form(cell):
        return "float32" if str(np.float32(cell)) == cell else "float64" if repr(float(cell)) == cell else cell

    if [len(row) for row in actual] != [len(row) for row in expected]:
        return f"layout {[len(row) for row in actual]} != {[len(row) for row in expected]}"
    for i, (actualRow, expectedRow) in enumerate(zip(actual, expected)):
        scale = max(abs(float(cell)) for cell in expectedRow) if expectedRow else 0.0
        for j, (a, e) in enumerate(zip(actualRow, expectedRow)):
            if form(a) != form(e) or not closeEnough(float(a), float(e), scale):
                return f"row {i} column {j}: {a} != {e} (largest |value| in the row {scale})"
    return None


def tensorDiffers(actual, expected):
    """Why two tensor summaries differ, or None: dtype and shape equal, integer tensors' bytes equal, the sample and
    statistics of floating-point ones within RELATIVE of the tensor's largest |value|."""
    exact = ("dtype", "shape", "sha256")
    if [actual.get(k) for k in exact] != [expected.get(k) for k in exact]:
        return f"{[actual.get(k) for k in exact]} != {[expected.get(k) for k in exact]}"
    if "sha256" in expected:
        return None
    if len(actual["sample"]) != len(expected["sample"]):
        return "sample sizes differ"
    scale = expected["meanAbsMeanAbsMax"][-1] if expected["sample"] else 0.0
    pairs = [("element", a, e) for a, e in zip(actual["sample"], expected["sample"])]
    pairs += [("statistic", a, e) for a, e in zip(actual["meanAbsMeanAbsMax"], expected["meanAbsMeanAbsMax"])]
    for what, a, e in pairs:
        if not closeEnough(a, e, scale):
            return f"{what} {a} != {e} (largest |value| {scale})"
    return None


def differences(actual, expected, where="", scale=0.0):
    """Every place where actual does not match the reference expected, as 'where: why' lines; [] when it matches."""
    why = None
    if type(actual) is not type(expected):
        why = f"{actual!r} != {expected!r}"
    elif isinstance(expected, dict) and list(expected) in (["tensor"], ["csvRows"]):
        if list(actual) != list(expected):
            why = f"{list(actual)} != {list(expected)}"
        elif "tensor" in expected:
            why = tensorDiffers(actual["tensor"], expected["tensor"])
        else:
            why = csvDiffers(actual["csvRows"], expected["csvRows"])
    elif isinstance(expected, dict):
        if list(actual) != list(expected):
            return [f"{where}: keys {list(actual)} != {list(expected)}"]
        return [line for key in expected for line in differences(actual[key], expected[key], f"{where}/{key}")]
    elif isinstance(expected, list):
        if len(actual) != len(expected):
            return [f"{where}: {len(actual)} items != {len(expected)}"]
        floats = [abs(e) for e in expected if isinstance(e, float)]
        scale = max(floats) if floats else 0.0
        return [line for i, (a, e) in enumerate(zip(actual, expected))
                for line in differences(a, e, f"{where}[{i}]", scale)]
    elif isinstance(expected, str):
        why = textDiffers(actual, expected)
    elif isinstance(expected, float):
        why = None if closeEnough(actual, expected, scale) else f"{actual} != {expected}"
    elif actual != expected:
        why = f"{actual!r} != {expected!r}"
    return [f"{where}: {why}"] if why else []


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
    found = differences(actual, expected)
    assert not found, "\n".join(found[:20])


def perturbed(value, relative):
    """value with every float, in the structure and in the tensors' summaries, scaled by 1 + relative."""
    if isinstance(value, float):
        return value * (1 + relative)
    if isinstance(value, dict):
        return {k: perturbed(v, relative) for k, v in value.items()}
    if isinstance(value, list):
        return [perturbed(v, relative) for v in value]
    return value


def lastDigitBumped(line):
    """line with its first number that has decimals raised by one unit in its last digit, its format kept."""
    match = re.search(r"\d+\.(\d+)", line)
    decimals = len(match.group(1))
    bumped = f"{float(match.group(0)) + 10.0 ** -decimals:.{decimals}f}"
    return line[:match.start()] + bumped + line[match.end():]


def testLastBitDifferencesPass():
    """What another CPU or thread count changes: every float by relative 1e-6, a printed number by one unit in its
    last digit (`AF smoothness S 8.2991` for 8.2990), AF values in the .csv files by 1e-6 of themselves."""
    expected, _ = loadReference()
    actual = perturbed(copy.deepcopy(expected), 1e-6)
    log = actual["full"]["log-same.txt"]
    smoothness = next(i for i, line in enumerate(log) if "Step 5/8   AF smoothness S" in line)
    log[smoothness] = lastDigitBumped(log[smoothness])
    actual["full"]["metrics-same.csv"][0]["loss"] = lastDigitBumped(actual["full"]["metrics-same.csv"][0]["loss"])
    rows = actual["full"]["ptAf-same-step0008.csv"]["csvRows"]
    rows[1] = [str(np.float32(float(cell) * (1 + 1e-6))) for cell in rows[1]]
    assert differences(actual, expected) == []


def mutations(expected):
    """Deliberate changes to the recorded outputs, each of which the comparison must report, by name."""
    log = expected["full"]["log-same.txt"]
    smoothness = next(i for i, line in enumerate(log) if "Step 5/8   AF smoothness S" in line)
    checkpoint = "pt-same-step0008.pt"
    tensor = expected["full"][checkpoint]["afValuesMlp"][0]["tensor"]

    def swapLines(outputs):
        lines = outputs["full"]["log-same.txt"]
        lines[smoothness], lines[smoothness + 1] = lines[smoothness + 1], lines[smoothness]

    def changeFormat(outputs):  # %.4f -> %.3f
        lines = outputs["full"]["log-same.txt"]
        lines[smoothness] = re.sub(r"S (\d+\.\d+)", lambda m: f"S {float(m.group(1)):.3f}", lines[smoothness])

    def movePrintedNumber(outputs):  # well beyond RELATIVE and the last digit
        lines = outputs["full"]["log-same.txt"]
        lines[smoothness] = re.sub(r"S (\d+\.\d+)", lambda m: f"S {float(m.group(1)) * 1.01:.4f}",
                                   lines[smoothness])

    def changeText(outputs):
        outputs["full"]["log-same.txt"][smoothness] = log[smoothness].replace("smoothness", "smoothnes")

    def moveMetric(outputs):
        row = outputs["full"]["metrics-same.csv"][1]
        row["loss"] = f"{float(row['loss']) * 1.01:.6f}"

    def renameColumn(outputs):
        for row in outputs["full"]["metrics-same.csv"]:
            row["lossValue"] = row.pop("loss")

    def moveTensorElement(outputs):
        t = outputs["full"][checkpoint]["afValuesMlp"][0]["tensor"]
        t["sample"][3] += 0.01 * tensor["meanAbsMeanAbsMax"][-1]

    def changeShape(outputs):
        outputs["full"][checkpoint]["afValuesMlp"][0]["tensor"]["shape"] = [65]

    def changeDtype(outputs):
        outputs["full"][checkpoint]["afValuesMlp"][0]["tensor"]["dtype"] = "torch.bfloat16"

    def dropCheckpointKey(outputs):
        del outputs["full"][checkpoint]["window"]

    def moveAfValue(outputs):
        rows = outputs["full"]["ptAf-same-step0008.csv"]["csvRows"]
        rows[1][10] = str(np.float32(float(rows[1][10]) + 0.01 * max(abs(float(c)) for c in rows[1])))

    def changeAfLayout(outputs):
        outputs["full"]["ptAf-same-step0008.csv"]["csvRows"][1].pop()

    def renameFile(outputs):
        outputs["full"]["names"][0] = outputs["full"]["names"][0].replace("act-", "acts-")

    def moveHistoryFloat(outputs):
        row = outputs["full"][checkpoint]["history"]["train"][0]
        row[2] *= 1.01

    return [swapLines, changeFormat, movePrintedNumber, changeText, moveMetric, renameColumn, moveTensorElement,
            changeShape, changeDtype, dropCheckpointKey, moveAfValue, changeAfLayout, renameFile, moveHistoryFloat]


def testDeliberateChangesFail():
    expected, _ = loadReference()
    for mutate in mutations(expected):
        actual = copy.deepcopy(expected)
        mutate(actual)
        assert actual != expected, mutate.__name__
        assert differences(actual, expected), f"{mutate.__name__} was not reported"


def testHelpIsUnchanged():
    assert helpText() == loadReference()[1]


def referenceText(outputs):
    """The outputs as JSON in the runs' own key order (the metrics columns' order is part of the outputs), one line
    per list of numbers so that the tensors' samples keep the file small."""
    text = json.dumps(outputs, indent=1)
    return re.sub(r"\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]",
                  lambda match: "[" + " ".join(match.group(1).split()) + "]", text) + "\n"


def record():
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        outputs = runBoth(root)
    os.makedirs(REFERENCE, exist_ok=True)
    with open(os.path.join(REFERENCE, "outputs.json"), "w") as f:
        f.write(referenceText(outputs))
    with open(os.path.join(REFERENCE, "help.txt"), "w") as f:
        f.write(helpText())


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python tests/test_sameOutputs.py record")
    record()
