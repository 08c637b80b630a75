"""Tests for evalBlimp.py and the checkpoint loading it shares with generate.py: scoring against a hand
computation, per-set/field aggregation on the BLiMP sample, the command line, and the error lines."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tinyFlags

from lmafs.network import afFiles
from lmafs.run import checkpoints
import evalBlimp
import trainLmAf
from model import GPT
from lmafs.data.vocabulary import SHIPPED_VOCAB_FILE

BLIMP_SAMPLE = os.path.join(REPO, "tests", "data", "blimp-sample")
SAMPLE_UIDS = ["anaphor_gender_agreement", "determiner_noun_agreement_1", "regular_plural_subject_verb_agreement_1"]


def trainTinyRun(dataDir, resultsDir, runName, **overrides):
    """Train a tiny model in this process (6 steps) and return its final model checkpoint."""
    flags = tinyFlags(dataDir, resultsDir, runName=runName, nSteps=6, nStepsWarmup=1, nStepsCooldown=2, valEvery=0,
                      plotEvery=100, saveModelEvery=0, **overrides)
    assert trainLmAf.main(flags) == 0
    return os.path.join(resultsDir, f"pt-{runName}-step0006.pt")


class RunsCode:
    """Unpickling this calls os.system: the booby trap a weights-only load must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def badModelFiles(folder, checkpoint):
    """{case: (path, words the error line must hold, marker that must not appear)} for every kind of bad --modelFile."""
    folder.mkdir(exist_ok=True)
    spline = GPT(vocabSize=128, nLayers=2, nHeads=2, dimEmb=16, afMlp="spline", afAtt="linear")
    ptAf = afFiles.saveAfFiles(str(folder / "ptAf-x-step0006"), spline, {"afType": "spline"}, 6)[0]
    damaged = folder / "pt-damaged-step0006.pt"
    data = open(checkpoint, "rb").read()
    damaged.write_bytes(data[:len(data) // 2])
    trapped, marker = folder / "pt-trapped-step0006.pt", folder / "trapWasSprung"
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model": RunsCode(marker)}, trapped)
    foreign = folder / "other.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    return {"ptAf": (ptAf, ["ptAf file", "only the activation functions", "--saveModelEvery"], None),
            "damaged": (str(damaged), ["not a readable PyTorch file"], None),
            "missing": (str(folder / "pt-nothing-step0001.pt"), ["does not exist"], None),
            "trapped": (str(trapped), ["refusing to load", "could run code"], marker),
            "foreign": (str(foreign), ["not a model checkpoint"], None)}


@pytest.fixture(scope="module")
def runs(tinyData, tmp_path_factory):
    folder = tmp_path_factory.mktemp("blimpRuns")
    single = trainTinyRun(tinyData, folder, "tiny")
    phase1 = trainTinyRun(tinyData, folder, "phase1", nModels=2, afType="spline")
    return {"single": single, "phase1": phase1, "bad": badModelFiles(folder / "bad", single)}


def randomGpt(contextSize):
    torch.manual_seed(0)
    gpt = GPT(vocabSize=64, nLayers=2, nHeads=2, dimEmb=16, contextSize=contextSize, tokenDocSep=63)
    with torch.no_grad():
        for p in gpt.parameters():  # every weight random: the zero-initialised projections would hide attention
            p.normal_(0.0, 0.5)
    return gpt.eval()


def handLogProb(gpt, sequence):
    """Sum of log p(token t | tokens before t), one forward pass per prefix, log_softmax by hand."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(sequence)):
            logits = gpt.logits(torch.tensor(sequence[:t])[None, None])[0, 0, -1].double()
            logProbs = logits - torch.logsumexp(logits, dim=0)
            total += float(logProbs[sequence[t]])
    return total


def testBatchedScoresMatchTheHandComputation():
    gpt = randomGpt(contextSize=5)
    generator = torch.Generator().manual_seed(1)
    # Lengths 1..12 (beyond the window of 5), one with a separator inside; batches of 3 mix lengths, so padding.
    sequences = [[63] + torch.randint(0, 63, (n,), generator=generator).tolist() for n in range(12)]
    sequences[7][4] = 63
    scores = evalBlimp.sentenceLogProbs(gpt, sequences, batchSize=3, device=torch.device("cpu"))
    expected = torch.tensor([handLogProb(gpt, s) for s in sequences], dtype=torch.float64)
    assert scores[0] == 0.0  # only the prefix: nothing predicted
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    single = evalBlimp.sentenceLogProbs(gpt, sequences, batchSize=1, device=torch.device("cpu"))
    torch.testing.assert_close(scores, single, atol=1e-4, rtol=1e-5)


def testPairIsRightOnlyWhenTheGoodSentenceScoresHigher():
    scores = torch.tensor([-3.0, -5.0, -5.0, -3.0, -4.0, -4.0], dtype=torch.float64)  # (good, bad) interleaved
    assert evalBlimp.pairsCorrect(scores) == [True, False, False]


def testSampleSetsAreReadAndLimited():
    sets = evalBlimp.readLocalSets(BLIMP_SAMPLE, None)
    assert [s.uid for s in sets] == SAMPLE_UIDS
    assert [len(s.pairs) for s in sets] == [200, 200, 200]
    assert {s.field for s in sets} == {"morphology"}
    assert sets[0].linguisticsTerm == "anaphor_agreement"
    assert sets[0].pairs[0] == ("Katherine can't help herself.", "Katherine can't help himself.")
    limited = evalBlimp.readLocalSets(BLIMP_SAMPLE, 7)
    assert [len(s.pairs) for s in limited] == [7, 7, 7]
    assert limited[0].pairs == sets[0].pairs[:7]


def testAggregationPerSetFieldAndOverall():
    sets = evalBlimp.readLocalSets(BLIMP_SAMPLE, 20)
    correct = [True] * 20 + [True] * 10 + [False] * 10 + [False] * 15 + [True] * 5
    setRows, fieldRows, overall = evalBlimp.aggregate(sets, correct)
    assert [(r["UID"], r["nPairs"], r["accuracy"]) for r in setRows] == [
        (SAMPLE_UIDS[0], 20, 100.0), (SAMPLE_UIDS[1], 20, 50.0), (SAMPLE_UIDS[2], 20, 25.0)]
    assert [(r["field"], r["nPairs"], r["nSets"]) for r in fieldRows] == [("morphology", 60, 3)]
    assert fieldRows[0]["accuracy"] == pytest.approx(100 * 35 / 60)
    assert (overall["nPairs"], overall["nSets"]) == (60, 3) and overall["accuracy"] == pytest.approx(100 * 35 / 60)
    lines = evalBlimp.reportLines(setRows, fieldRows, overall)
    assert lines[0].startswith("anaphor_gender_agreement (morphology)") and lines[0].endswith("acc 100.0  (20 pairs)")
    assert lines[-1].startswith("overall") and lines[-1].endswith("acc  58.3  (60 pairs, 3 sets)")


def testFieldsGroupTheirOwnSets():
    sets = [evalBlimp.BlimpSet("a", "syntax", "t", [("x", "y")] * 4), evalBlimp.BlimpSet("b", "semantics", "t", [("x", "y")] * 2),
            evalBlimp.BlimpSet("c", "syntax", "t", [("x", "y")] * 4)]
    _, fieldRows, overall = evalBlimp.aggregate(sets, [True] * 4 + [False, False] + [True, False, False, False])
    assert [(r["field"], r["nPairs"], r["nSets"], r["accuracy"]) for r in fieldRows] == [
        ("semantics", 2, 1, 0.0), ("syntax", 8, 2, 62.5)]
    assert overall["accuracy"] == 50.0


@pytest.mark.parametrize("content, words", [
    ('{"sentence_good": "A.", "sentence_bad": "B.", "UID": "u", "field": "f"}\n', ["bad.jsonl:1", "'linguistics_term'"]),
    ('\n{"sentence_good": "A.",\n', ["bad.jsonl:2", "not valid JSON"]),
    ('[1, 2]\n', ["bad.jsonl:1", "JSON object"]),
])
def testBadBlimpRecordsNameTheLine(tmp_path, content, words):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(evalBlimp.BlimpError) as caught:
        evalBlimp.readLocalSets(str(tmp_path), None)
    assert all(word in str(caught.value) for word in words), str(caught.value)


def testBlimpDirWithoutJsonlFiles(tmp_path):
    with pytest.raises(evalBlimp.BlimpError, match="no .jsonl files"):
        evalBlimp.readLocalSets(str(tmp_path), None)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(evalBlimp.BlimpError, match="hold no BLiMP pairs"):
        evalBlimp.readLocalSets(str(tmp_path), None)
    with pytest.raises(evalBlimp.BlimpError, match="not a folder"):
        evalBlimp.readLocalSets(str(tmp_path / "absent"), None)


def testCommandLineScoresTheSampleAndWritesCsvAndPng(runs, capsys, offline):
    assert evalBlimp.main(["--device", "cpu", "--modelFile", runs["single"], "--blimpDir", BLIMP_SAMPLE, "--limit", "10"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"GPT-2 vocabulary: shipped copy {SHIPPED_VOCAB_FILE}" in out  # no flag, no cache, no network
    setLines = [line for line in out if line.endswith("(10 pairs)")]
    assert [line.split()[0] for line in setLines] == SAMPLE_UIDS
    assert any(line.startswith("field morphology") and line.endswith("(30 pairs, 3 sets)") for line in out)
    overall = [line for line in out if line.startswith("overall")]
    assert len(overall) == 1 and overall[0].endswith("(30 pairs, 3 sets)")
    stem = os.path.join(os.path.dirname(runs["single"]), "blimp-tiny-step0006-limit10")
    with open(stem + ".csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["UID", "field", "linguistics_term", "nPairs", "accuracy"]
    assert [(r["UID"], r["nPairs"]) for r in rows] == [(uid, "10") for uid in SAMPLE_UIDS]
    printed = [float(line.split("acc")[1].split()[0]) for line in setLines]
    assert [100 * float(r["accuracy"]) for r in rows] == pytest.approx(printed, abs=0.05)
    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in os.listdir(os.path.dirname(stem)) if ".tmp" in name]


def testPhaseOneCheckpointUsesModelZeroUnlessTold(runs, capsys, offline):
    common = ["--device", "cpu", "--modelFile", runs["phase1"], "--blimpDir", BLIMP_SAMPLE, "--limit", "4"]
    assert evalBlimp.main(common) == 0
    assert "model 0 of 2" in capsys.readouterr().out
    assert evalBlimp.main(common + ["--modelId", "1"]) == 0
    assert "model 1 of 2" in capsys.readouterr().out
    folder = os.path.dirname(runs["phase1"])
    assert os.path.isfile(os.path.join(folder, "blimp-phase1-step0006-model0-limit4.csv"))
    assert os.path.isfile(os.path.join(folder, "blimp-phase1-step0006-model1-limit4.csv"))
    assert evalBlimp.main(common + ["--modelId", "2"]) == 1
    assert capsys.readouterr().err == f"error: --modelId 2: {runs['phase1']!r} holds 2 model(s), numbered 0 to 1\n"


@pytest.mark.parametrize("case", ["ptAf", "damaged", "missing", "trapped", "foreign"])
def testBadModelFileIsOneErrorLine(runs, capsys, case):
    path, words, marker = runs["bad"][case]
    assert evalBlimp.main(["--device", "cpu", "--modelFile", path, "--blimpDir", BLIMP_SAMPLE]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert all(word in captured.err for word in words), captured.err
    assert marker is None or not os.path.exists(marker)


def testVocabFileThatIsNotGpt2IsOneErrorLine(runs, capsys, tmp_path):
    wrong = tmp_path / "other.tiktoken"
    wrong.write_bytes(open(SHIPPED_VOCAB_FILE, "rb").read()[:1000])
    assert evalBlimp.main(["--device", "cpu", "--modelFile", runs["single"], "--blimpDir", BLIMP_SAMPLE, "--vocab_file", str(wrong)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --vocab_file {wrong} is not the GPT-2 vocabulary") and err.count("\n") == 1, err


def testCommandLineErrorsHaveNoTraceback(runs):
    done = subprocess.run([sys.executable, os.path.join(REPO, "evalBlimp.py"), "--device", "cpu", "--modelFile", runs["bad"]["ptAf"][0],
                           "--blimpDir", BLIMP_SAMPLE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--batchSize", "-2"], "--batchSize must be at least 1, got -2"),
    (["--modelId", "-1"], "--modelId must be >= 0, got -1"),
])
def testBadFlagsAreOneErrorLine(capsys, flags, message):
    with pytest.raises(SystemExit) as exited:
        evalBlimp.main(["--device", "cpu", "--modelFile", "pt-x-step0001.pt", "--blimpDir", BLIMP_SAMPLE] + flags)
    assert exited.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
