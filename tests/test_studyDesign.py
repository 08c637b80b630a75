"""What a study may ask (compareAfs.py): phase I on seeds of its own, AF files as rows (the original authors'
published AFs, or each seed's AFs from another study), phase I on another corpus with another vocabulary, and bits
per byte, which compare them; bad input stops with one line before anything is written. The trainer's bits per byte
equal the validation loss over the bytes its tokens decode to, by each vocabulary's own decoder."""
import glob
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import compareAfs
from lmafs.study import studyPlan
import trainLmAf
from lmafs.data import vocabulary
from conftest import REPO, runTrainer, tinyFlags

UPSTREAM_CSV = glob.glob(os.path.join(REPO, "..", "shared", "data", "ptAf-upstream-*.csv")) or \
    glob.glob(os.path.join(REPO, "results-fineweb10B", "upstream", "ptAf-upstream-*.csv"))


def studyFlags(dataDir, resultsDir, **overrides):
    return tinyFlags(dataDir, resultsDir, **{"nSteps": 6, "nStepsWarmup": 1, "nStepsCooldown": 2, "valEvery": 3,
                                             **overrides})


@pytest.fixture(scope="module")
def bpeCorpus(tmp_path_factory):
    """Another corpus with a vocabulary of its own: Python source, tokenized by a BPE of 300 ids."""
    folder = tmp_path_factory.mktemp("bpeCorpus")
    with open(os.path.join(REPO, "compareAfs.py"), encoding="utf-8") as f:
        (folder / "code.txt").write_text(f.read() * 2, encoding="utf-8")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "preprocessFineweb.py"), str(folder / "data"), "--input",
                           str(folder / "code.txt"), "--shard_size", "8000", "--vocabSize", "300"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return folder / "data"


def plan(argv):
    args, trainerArgv, hp = compareAfs.parseArgs(argv)
    runs = studyPlan.planRuns(args, trainerArgv, hp)
    studyPlan.checkRuns(runs, args)
    return runs


def testPhaseOneTrainsOnSeedsOfItsOwn(tinyData, tmp_path):
    runs = plan(["--afTypes", "relu2", "--variant", "sp=spline;att-spline", "--variant",
                 "sp1=spline;att-spline --nModels 1", "--variant", "fr=spline;att-spline --afLr 0", "--splinePhases",
                 "2", "--splineModels", "3", "--seeds", "0,1,2,3"] + studyFlags(tinyData, tmp_path))
    parsed = [(run, trainLmAf.parseArgs(run["argv"])[0]) for run in runs]
    reported = [(run, hp) for run, hp in parsed if run["reported"]]
    phase1 = [(run, hp) for run, hp in parsed if run["phase"] == 1]
    assert len(phase1) == 8 and len(reported) == 16
    for run, hp in phase1:
        assert hp.seed == 1234 + run["seed"]  # the original's phase I runs on --seed 1234, its phase II on 0
    # a model's initial weights come from its run's seed, its data stream is TokenStream(seed, model index)
    streams = lambda pairs: {(hp.seed, model) for _, hp in pairs for model in range(hp.nModels)}  # noqa: E731
    assert not streams(phase1) & streams(reported)
    assert not {hp.seed for _, hp in phase1} & {hp.seed for _, hp in reported}
    for run, hp in reported:  # every reported run of seed s trains on seed s, phase II included
        assert hp.seed == run["seed"]
    # by hand, trainLmAf.py keeps its seed
    assert trainLmAf.parseArgs(["--nModels", "3"])[0].seed == 0
    assert [hp.seed for _, hp in phase1[:4]] == [1234, 1235, 1236, 1237]


def testAPhaseOneSeedOnAReportedSeedIsRefused(tinyData, tmp_path, capsys):
    argv = ["--afTypes", "spline", "--splinePhases", "2", "--seeds", "0,1", "--phase1SeedOffset", "1"] \
        + studyFlags(tinyData, tmp_path)
    assert compareAfs.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cmp-spline-s0-phase1 would train with --seed 1, the seed" in err
    assert "cmp-spline-s1" in err and "--phase1SeedOffset" in err
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(not UPSTREAM_CSV, reason="the original authors' ptAf CSV is not in this checkout")
def testAfFilesAreRowsFrozenInEverySeed(tinyData, tmp_path):
    runs = plan(["--afTypes", "relu2", "--variant", f"up=spline;att-spline --afFileToLoad {UPSTREAM_CSV[0]}",
                 "--splinePhases", "2", "--seeds", "0,1"] + studyFlags(tinyData, tmp_path, nLayers=4,
                                                                         afLayerSpecific=0))
    assert [(run["runName"], run["phase"]) for run in runs] == [("cmp-relu2-s0", None), ("cmp-relu2-s1", None),
                                                                ("cmp-up-s0", None), ("cmp-up-s1", None)]
    for run in runs[2:]:
        hp = trainLmAf.parseArgs(run["argv"])[0]
        assert (hp.afFileToLoad, hp.afLr, hp.seed) == (os.path.abspath(UPSTREAM_CSV[0]), 0, run["seed"])
    # with {seed}, each seed loads its own file, e.g. the phase-I AFs of the same seed in another study
    for seed in (0, 1):
        shutil.copy(UPSTREAM_CSV[0], tmp_path / f"other-s{seed}.csv")
    runs = plan(["--variant", f"up=spline;att-spline --afFileToLoad {tmp_path}/other-s{{seed}}.csv --afLr 0.01",
                 "--seeds", "0,1"] + studyFlags(tinyData, tmp_path, nLayers=4, afLayerSpecific=0))
    loaded = [trainLmAf.parseArgs(run["argv"])[0] for run in runs]
    assert [(hp.afFileToLoad, hp.afLr) for hp in loaded] == [(f"{tmp_path}/other-s0.csv", 0.01),
                                                              (f"{tmp_path}/other-s1.csv", 0.01)]


@pytest.mark.parametrize("case, message", [
    ("layers", "holds 8 splines, but --afType 'spline;att-spline;score-softmax' with 2 layers needs 4"),
    ("missing", "--variant up: --afFileToLoad {tmp}/nowhere-s0.csv does not exist (seed 0)"),
    ("kinds", "holds 'splinePerDim' MLP AFs, but --afType asks for 'spline'"),
    ("common", "--afFileToLoad is set per row: give it in a --variant"),
    ("phase1", "--variant up: a row loading --afFileToLoad has no phase I"),
])
def testBadAfFileRowsStopWithOneLine(case, message, tinyData, tmp_path, capsys):
    out = tmp_path / "out"
    flags = studyFlags(tinyData, out)
    if case == "layers":
        if not UPSTREAM_CSV:
            pytest.skip("the original authors' ptAf CSV is not in this checkout")
        variant = f"up=spline;att-spline --afFileToLoad {UPSTREAM_CSV[0]}"
    elif case == "missing":
        variant = f"up=spline --afFileToLoad {tmp_path}/nowhere-s{{seed}}.csv"
    elif case == "kinds":  # a per-channel file for a shared spline row
        assert runTrainer(studyFlags(tinyData, tmp_path / "pd", afType="splinePerDim;att-linear", runName="pd",
                                     nSteps=2, nStepsWarmup=0, nStepsCooldown=1)).returncode == 0
        variant = f"up=spline --afFileToLoad {tmp_path}/pd/ptAf-pd-step0002.pt"
    elif case == "common":
        variant = "up=spline"
        flags += ["--afFileToLoad", "x.pt"]
    else:
        variant = "up=spline --afFileToLoad x.pt --phase1FilesTokensTr a --phase1FilesTokensVa b"
    assert compareAfs.main(["--variant", variant, "--seeds", "0,1"] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert not out.exists()


def testBadPhaseOneCorporaStopWithOneLine(tinyData, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--afTypes", "spline", "--splinePhases", "2"] + studyFlags(tinyData, out)
    assert compareAfs.main(base + ["--phase1FilesTokensTr", f"{tmp_path}/none_*.bin", "--phase1FilesTokensVa",
                                   f"{tinyData}/fineweb_val_*.bin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cmp-spline-s0-phase1: no token files match" in err and "none_*.bin" in err
    assert compareAfs.main(base + ["--phase1FilesTokensTr", f"{tinyData}/fineweb_train_*.bin"]) == 2
    assert "--phase1FilesTokensTr and --phase1FilesTokensVa go together" in capsys.readouterr().err
    assert compareAfs.main(["--variant", "x=spline --phase1FilesTokensVa v"] + base[2:]) == 2
    assert "--variant x: --phase1FilesTokensTr and --phase1FilesTokensVa go together" in capsys.readouterr().err
    assert not out.exists()


def writeFinishedRun(folder, runName, seed, withBpb):
    """A finished run's log and metrics, as an earlier study (or an older trainLmAf.py) left them."""
    os.makedirs(folder, exist_ok=True)
    (folder / f"log-{runName}.txt").write_text(f"Hyperparameters:\n  seed = {seed}\nStep 6/6   lossVa 5.0000   "
                                               "accVa 20.0\n")
    header = "step,model,split,loss,accuracy,lr,trainSeconds,tokens" + (",bpb" if withBpb else "")
    (folder / f"metrics-{runName}.csv").write_text(header + "\n6,0,val,5.0,0.2,0.001,2.0,100"
                                                   + (",2.1" if withBpb else "") + "\n")


def testRunsOfAnotherPlanOrWithoutBitsPerByteAreRefused(tinyData, tmp_path, capsys):
    flags = ["--afTypes", "spline", "--splinePhases", "2", "--seeds", "0"] + studyFlags(tinyData, tmp_path)
    writeFinishedRun(tmp_path, "cmp-spline-s0-phase1", 0, True)  # phase I on the reported seed, as before
    assert compareAfs.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cmp-spline-s0-phase1 in" in err and "seed = 0, but this study plans 1234" in err
    writeFinishedRun(tmp_path, "cmp-spline-s0-phase1", 1234, True)
    writeFinishedRun(tmp_path, "cmp-spline-s0", 0, False)
    assert compareAfs.main(flags + ["--metric", "bpb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--metric bpb:" in err and "holds no bits per byte" in err
    assert not glob.glob(str(tmp_path / "compare-*"))


def testTwoSeedStudyWithALoadedRowAndPhaseOneOnAnotherCorpus(tinyData, bpeCorpus, tmp_path, capsys):
    """End to end: phase I of one row on a corpus of Python source with a BPE of its own, phase II and every other
    row on the GPT-2 shards; a row of loaded AFs (each seed's phase-I file of a first study); tables in loss and in
    bits per byte."""
    out = tmp_path / "study"
    flags = ["--splinePhases", "2", "--splineModels", "2", "--seeds", "0,1"] + studyFlags(tinyData, out)
    assert compareAfs.main(["--variant", "first=spline;att-spline", "--name", "a"] + flags) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    other = f"{bpeCorpus}/fineweb_train_*.bin"
    argv = ["--afTypes", "relu2", "--variant", "sp=spline;att-spline", "--variant",
            f"sp-code=spline;att-spline --phase1FilesTokensTr {other} --phase1FilesTokensVa "
            f"{bpeCorpus}/fineweb_val_*.bin",
            "--variant", f"loaded=spline;att-spline --afFileToLoad {out}/ptAf-a-first-s{{seed}}-phase1-step0006.pt",
            "--baseline", "best-fixed", "--pairs", "sp-code:sp", "--name", "b", "--metric", "bpb"] + flags
    assert compareAfs.main(argv) == 0, capsys.readouterr().err
    with open(out / "log-b-sp-code-s1-phase1.txt") as f:
        log = f.read()
    assert "Training data: " in log and f"({other})" in log and "byte-level BPE of 300 ids" in log
    assert re.search(r"^  seed = 1235$", log, re.M)
    with open(out / "log-b-sp-code-s1.txt") as f:  # phase II: GPT-2 shards, seed 1, the other corpus's AFs
        log = f.read()
    assert "ptAf-b-sp-code-s1-phase1-step0006.pt" in log and "frozen" in log and re.search(r"^  seed = 1$", log, re.M)
    assert "GPT-2 (r50k_base)" in log
    with open(out / "log-b-loaded-s1.txt") as f:
        assert f"loaded AFs from {out}/ptAf-a-first-s1-phase1-step0006.pt" in f.read()
    with open(out / "compare-b.md") as f:
        table = f.read()
    assert "Phase I of seed s trains with --seed 1234 + s (1234, 1235)" in table
    assert "phase I of sp on" in table and "of sp-code on" in table and "byte-level BPE of 300 ids" in table
    assert "every reported run trains on" in table and "GPT-2 (r50k_base)" in table
    rows = {line.split(" | ")[0][2:]: [c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith(("| AF", "| difference")) and " − " not in line}
    assert set(rows) == {"relu2", "sp (phase II)", "sp-code (phase II)", "loaded (loaded)"}
    for cells in rows.values():
        loss, bpb = float(cells[2].strip("*").split(" ± ")[0]), float(cells[3].strip("*").split(" ± ")[0])
        assert 0 < bpb < loss and cells[-1] == "2/2"
    assert "Δ val bpb against relu2" in table and "| sp-code (phase II) − sp (phase II) |" in table
    assert "Δ: final val bpb of the first row" in table
    # another table over some of the same runs: nothing is trained again, compare-b.md stays
    before = {path: os.path.getmtime(path) for path in glob.glob(str(out / "metrics-*"))}
    assert compareAfs.main(["--afTypes", "relu2", "--variant", "sp=spline;att-spline", "--name", "b",
                            "--table", "b-two"] + flags) == 0
    assert {path: os.path.getmtime(path) for path in glob.glob(str(out / "metrics-*"))} == before
    with open(out / "compare-b-two.md") as f:
        two = f.read()
    assert two.startswith("# Activation-function comparison `b-two`") and "| sp (phase II) |" in two
    assert "sp-code" not in two and open(out / "compare-b.md").read() == table


def testBitsPerByteAreTheLossOverTheDecodedBytes(tinyData, bpeCorpus, tmp_path):
    """The log's bpbVa = lossVa x tokens / (bytes x ln 2), the bytes counted by each vocabulary's own decoder:
    tiktoken's for GPT-2 shards, the tokenizers library's for a corpus BPE (<|endoftext|> is no part of the text)."""
    import tiktoken
    from tokenizers import Tokenizer

    from lmafs.data.tokenShards import validationSequences

    gpt2 = tiktoken.Encoding(**vocabulary.loadGpt2Vocabulary(None)[0])
    bpe = Tokenizer.from_file(str(bpeCorpus / "tokenizer.json"))
    for data, decodedBytes in ((tinyData, lambda ids: len(gpt2.decode_bytes([i for i in ids if i != 50256]))),
                               (bpeCorpus, lambda ids: len(bpe.decode([i for i in ids if i != 0]).encode("utf-8")))):
        out = tmp_path / os.path.basename(str(data))
        flags = studyFlags(data, out, runName="r", nSteps=3, nStepsWarmup=0, nStepsCooldown=1, valEvery=0,
                           nTokensVa=512, seqLength=64, contextSize=64)
        proc = runTrainer(flags)
        assert proc.returncode == 0, proc.stderr
        with open(out / "log-r.txt") as f:
            log = f.read()
        loss = float(re.search(r"Step 3/3   lossVa (\S+)", log).group(1))
        bpb = float(re.search(r"Step 3/3   bpbVa (\S+)", log).group(1))
        targets = validationSequences(sorted(glob.glob(f"{data}/fineweb_val_*.bin")), 64, 512)[:, 1:]
        nBytes = sum(decodedBytes(row.tolist()) for row in targets)
        assert f"Validation bytes: {nBytes:,} UTF-8 bytes of text in the {targets.size:,} predicted tokens" in log
        assert bpb == pytest.approx(loss * targets.size / (nBytes * math.log(2)), abs=2e-4)
        with open(out / "metrics-r.csv") as f:
            header, *rows = f.read().splitlines()
        assert header.endswith(",bpb")
        val = [row.split(",") for row in rows if ",val," in row]
        assert float(val[-1][-1]) == pytest.approx(bpb, abs=1e-4)
        assert all(row.endswith(",") for row in rows if ",train," in row)


def testTokenByteCountsAddUpToTheText(bpeCorpus):
    text = "Größe: naïve café, ✓ done.\n\tdef f(x):  return x ** 2  # ünïcode"
    from tokenizers import Tokenizer

    import tiktoken

    gpt2 = tiktoken.Encoding(**vocabulary.loadGpt2Vocabulary(None)[0])
    counts = vocabulary.tokenByteCounts(None)
    assert counts[gpt2.encode_ordinary(text)].sum() == len(text.encode("utf-8")) and counts[50256] == 0
    corpusVocabulary = vocabulary.readTokenizerFile(str(bpeCorpus / "tokenizer.json"))
    counts = vocabulary.tokenByteCounts(corpusVocabulary)
    ids = Tokenizer.from_file(str(bpeCorpus / "tokenizer.json")).encode(text).ids
    assert counts[ids].sum() == len(text.encode("utf-8")) and counts[corpusVocabulary.eotId] == 0
    assert vocabulary.bitsPerByte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert np.all(counts >= 0)
