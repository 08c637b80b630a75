"""trainLmAf.py end to end at tiny sizes: phase I -> ptAf .pt/.csv -> phase II frozen; the authors' CSV;
log lines; 'already complete'; every bad input gives one line on stderr, a non-zero exit and no files."""
import glob
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import UPSTREAM, runTrainer, tinyFlags
from lmafs.data.tokenShards import HEADER_INTS, MAGIC
from trainLmAf import buildParser, main

UPSTREAM_CSV = os.path.join(UPSTREAM, "ptAf-optimizedMlpAtt-layerShared-phase1-step20000.csv")


def runMain(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def phase1(tinyData, tmp_path_factory):
    """A tiny phase I: 3 models, MLP+attention splines shared across layers, staggered starts."""
    results = tmp_path_factory.mktemp("phase1")
    argv = tinyFlags(tinyData, results, seed=1234, nModels=3, staggeredStarts=1, afLayerSpecific=0,
                     afType="spline;att-spline", afLr=0.1, runName="p1", nSteps=9, plottingLevel=2, plotEvery=6)
    result = runTrainer(argv)
    assert result.returncode == 0, result.stderr
    return results, result


def testPhase1Outputs(phase1):
    results, result = phase1
    names = sorted(os.listdir(results))
    assert "log-p1.txt" in names and "ptAf-p1-step0009.pt" in names and "ptAf-p1-step0009.csv" in names
    assert any(n.startswith("tr-p1-step000009") for n in names)
    assert "af-p1-step000009.png" in names and "act-p1-step000009.png" in names
    lines = (results / "log-p1.txt").read_text().splitlines()
    final = [line for line in lines if line.startswith("Step 9/9 ") and "   model " not in line]
    assert final[0].startswith("Step 9/9   lossVa ") and "accVa" in final[0]
    assert final[1].startswith("Step 9/9   bpbVa ")
    assert final[2].startswith("Step 9/9   lossTr ") and "s/step" in final[2]
    assert final[3].startswith("Step 9/9   Activation magnitudes (2): ") and len(final[3].split(":")[1].split()) == 4
    assert final[4].startswith("Step 9/9   Activation magnitudes (3): ") and len(final[4].split(":")[1].split()) == 4
    assert any(line.startswith("Phase I: 3 models, start steps [0, 3, 6]; 3 models per pass") for line in lines)
    assert "Step 7/9   model 2   lossTr" in "\n".join(lines)  # model 2 started at step 6 (0-based)
    assert "\r" not in (results / "log-p1.txt").read_text()  # the progress bar stays out of the log
    data = torch.load(results / "ptAf-p1-step0009.pt", weights_only=True)
    assert len(data["mlpValues"]) == 2 and len(data["attValues"]) == 2
    assert torch.equal(data["mlpValues"][0], data["mlpValues"][1])  # shared across layers, written per layer
    assert not torch.equal(data["mlpValues"][0], data["attValues"][0])
    assert b"\r" not in (results / "ptAf-p1-step0009.csv").read_bytes()  # \n line endings, as the original
    csvLines = (results / "ptAf-p1-step0009.csv").read_text().splitlines()
    assert len(csvLines) == 8
    assert np.allclose([float(v) for v in csvLines[3].split(",")], data["mlpValues"][1].numpy())
    assert np.allclose([float(v) for v in csvLines[5].split(",")], data["attValues"][0].numpy())


@pytest.mark.parametrize("suffix", [".pt", ".csv"])
def testPhase2LoadsFrozenAfs(phase1, tinyData, tmp_path, suffix):
    results, _ = phase1
    afFile = str(results / f"ptAf-p1-step0009{suffix}")
    argv = tinyFlags(tinyData, tmp_path, seed=0, afLayerSpecific=0, afType="spline;att-spline", afLr=0,
                     runName="p2", afFileToLoad=afFile, saveModelEvery=0)
    result = runTrainer(argv)
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "pt-p2-step0008.pt", weights_only=True)
    learned = torch.load(results / "ptAf-p1-step0009.pt", weights_only=True)
    for key, fileKey in (("afValuesMlp", "mlpValues"), ("afValuesAtt", "attValues")):
        for got, expected in zip(checkpoint[key], learned[fileKey]):
            assert torch.equal(got, expected)
    assert torch.equal(checkpoint["model"]["mlpAfs.0.values"], learned["mlpValues"][0])
    assert torch.equal(checkpoint["model"]["attAfs.0.values"], learned["attValues"][0])
    assert not glob.glob(str(tmp_path / "ptAf-*"))  # frozen AFs are not saved again


def testPhase2MlpOnlyAndLayerSpecificFromSharedFile(phase1, tinyData, tmp_path, capsys):
    results, _ = phase1
    argv = tinyFlags(tinyData, tmp_path, afLayerSpecific=1, afType="spline", afLr=0, runName="p2mlp", nSteps=3,
                     nStepsWarmup=1, nStepsCooldown=1, afFileToLoad=str(results / "ptAf-p1-step0009.pt"),
                     saveModelEvery=0)
    code, out, err = runMain(argv, capsys)
    assert code == 0, err
    assert "attention AFs are not used" in out
    checkpoint = torch.load(tmp_path / "pt-p2mlp-step0003.pt", weights_only=True)
    learned = torch.load(results / "ptAf-p1-step0009.pt", weights_only=True)
    assert torch.equal(checkpoint["afValuesMlp"][1], learned["mlpValues"][0]) and checkpoint["afValuesAtt"] == []


def testPhase2LoadsTheAuthorsCsv(tinyData, tmp_path, capsys):
    argv = tinyFlags(tinyData, tmp_path, nLayers=4, afLayerSpecific=0, afType="spline;att-spline", afLr=0,
                     runName="up", nSteps=2, nStepsWarmup=0, nStepsCooldown=1, afFileToLoad=UPSTREAM_CSV,
                     saveModelEvery=0)
    code, out, err = runMain(argv, capsys)
    assert code == 0, err
    rows = [np.array(line.split(","), dtype=np.float32) for line in open(UPSTREAM_CSV).read().splitlines()]
    checkpoint = torch.load(tmp_path / "pt-up-step0002.pt", weights_only=True)
    assert np.array_equal(checkpoint["knots"].numpy(), rows[0])
    assert np.array_equal(checkpoint["afValuesMlp"][0].numpy(), rows[1])
    assert np.array_equal(checkpoint["afValuesAtt"][3].numpy(), rows[15])  # attention values, not the MLP's


def testAlreadyComplete(phase1, tinyData, capsys):
    results, _ = phase1
    before = sorted(os.listdir(results))
    argv = tinyFlags(tinyData, results, seed=1234, nModels=3, staggeredStarts=1, afLayerSpecific=0,
                     afType="spline;att-spline", afLr=0.1, runName="p1", nSteps=9)
    code, out, err = runMain(argv, capsys)
    assert code == 0 and "already complete" in out
    assert sorted(os.listdir(results)) == before


def testHelpListsEveryFlag(capsys):
    helpText = buildParser().format_help()
    for flag in ("runName", "seed", "plotMinAcc", "plotMaxAcc", "plotMinLoss", "plotMaxLoss", "shuffleTrData",
                 "tokenDocSep", "nLayers", "nHeads", "dimEmb", "tieEmbeddings", "lr", "freezeEmbeddings", "batchSize",
                 "seqLength", "contextSize", "nSteps", "nStepsWarmup", "nStepsCooldown", "lrSchedule", "wtDecay",
                 "nModels", "staggeredStarts", "sameDataAcrossModels", "sameInitAcrossModels", "adamB1", "adamB2",
                 "gradientClipping", "afType", "afLayerSpecific", "afRange", "afNAnchors", "afInit", "afLr",
                 "afAdamB1", "afAdamB2", "afFileToLoad", "dirResults", "filesTokensTr", "filesTokensVa", "nTokensVa",
                 "valEvery", "saveModelEvery", "saveAfEvery", "plotEvery", "plottingLevel", "dtype",
                 "flexBlockSize"):
        assert f"--{flag} " in helpText


def testBooleanFlagsAndAfTypeWithoutAttentionPart(tinyData, tmp_path, capsys):
    for value in ("1", "0", "true", "false", "True", "False"):
        argv = tinyFlags(tinyData, tmp_path, tieEmbeddings=value, afType="spline", afLr=0.01, nSteps=2,
                         nStepsWarmup=0, nStepsCooldown=1, runName=f"b{value}", valEvery=-1)
        code, out, err = runMain(argv, capsys)
        assert code == 0, err
        assert "afType = ['spline', 'linear']" in out
        assert f"  tieEmbeddings = {value in ('1', 'true', 'True')}\n" in out
    assert "att-linear" not in out or "afAtt" not in out


def writeBadShard(path, header=None, tokens=np.arange(100)):
    header = header if header is not None else [MAGIC, 1, len(tokens)]
    full = np.zeros(HEADER_INTS, dtype=np.int32)
    full[:len(header)] = header
    with open(path, "wb") as f:
        f.write(full.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def boobyTrappedFile(path, marker):
    class Trap:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(path, "wb") as f:
        pickle.dump({"format": "lm-afs ptAf 1", "knots": Trap()}, f)


def badInputs(tinyData, tmp_path, phase1Dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    writeBadShard(bad / "magic_000001.bin", header=[123, 1, 100])
    writeBadShard(bad / "short_000001.bin", header=[MAGIC, 1, 1000])
    writeBadShard(bad / "version_000001.bin", header=[MAGIC, 7, 100])
    (bad / "empty_000001.bin").write_bytes(b"")
    (bad / "garbage.pt").write_bytes(b"this is not a torch file")
    boobyTrappedFile(bad / "trap.pt", tmp_path / "pwned")
    phase1Af = str(phase1Dir / "ptAf-p1-step0009.pt")
    return {
        "missing data": dict(filesTokensTr=str(bad / "nothing_*.bin")),
        "empty data file": dict(filesTokensTr=str(bad / "empty_*.bin")),
        "wrong magic": dict(filesTokensTr=str(bad / "magic_*.bin")),
        "wrong version": dict(filesTokensTr=str(bad / "version_*.bin")),
        "fewer tokens than header": dict(filesTokensVa=str(bad / "short_*.bin")),
        "unknown afType": dict(afType="wavelet;att-linear"),
        "unknown attention afType": dict(afType="gelu;att-bogus"),
        "contextSize > seqLength": dict(contextSize=64, seqLength=32),
        "warmup+cooldown >= nSteps": dict(nSteps=5, nStepsWarmup=3, nStepsCooldown=2),
        "freeze one tied embedding": dict(freezeEmbeddings=1),
        "afFile missing": dict(afType="spline;att-spline", afLr=0, afFileToLoad=str(bad / "none.pt")),
        "afFile unreadable": dict(afType="spline;att-spline", afLr=0, afFileToLoad=str(bad / "garbage.pt")),
        "afFile booby-trapped": dict(afType="spline;att-spline", afLr=0, afFileToLoad=str(bad / "trap.pt")),
        "afFile other depth": dict(afType="spline;att-spline", afLr=0, nLayers=4, afFileToLoad=phase1Af),
        "afFile other AF type": dict(afType="splinePerDim;att-spline", afLr=0, afFileToLoad=phase1Af),
        "afFile without attention AFs": dict(afType="spline;att-spline", afLr=0, afFileToLoad=UPSTREAM_CSV, nLayers=8),
        "afFile with a non-spline afType": dict(afType="gelu;att-linear", afFileToLoad=phase1Af),
        "bad boolean": dict(tieEmbeddings="yes"),
        "bad choice": dict(lrSchedule="linear"),
    }


def testBadInputs(phase1, tinyData, tmp_path, capsys):
    phase1Dir, _ = phase1
    for case, overrides in badInputs(tinyData, tmp_path, phase1Dir).items():
        results = tmp_path / "results"
        code, out, err = runMain(tinyFlags(tinyData, results, runName="bad", **overrides), capsys)
        assert code not in (0, None), case
        errLines = err.strip().splitlines()
        assert len(errLines) == 1 and errLines[0].startswith("error: "), f"{case}: {err!r}"
        assert not results.exists() or not os.listdir(results), f"{case} wrote files"
    assert not (tmp_path / "pwned").exists()


def testBadInputHasNoTraceback(tinyData, tmp_path):
    result = runTrainer(tinyFlags(tinyData, tmp_path, afType="nonsense"))
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def testPhase2LoadsAPtAfDictFromOtherCode(tinyData, tmp_path, capsys):
    """A plain dict as the original research code might save it: other key names, one shared spline each."""
    knots = torch.linspace(-15, 15, 64)
    mlp, att = torch.randn(64), torch.randn(64)
    path = tmp_path / "ptAf-other.pt"
    torch.save({"hyperparameters": {"nLayers": 2, "afRange": 15.0, "afNAnchors": 64}, "afKnots": knots,
                "afValuesMlp": [mlp], "afValuesAtt": [att]}, path)
    argv = tinyFlags(tinyData, tmp_path, afLayerSpecific=1, afType="spline;att-spline", afLr=0, runName="other",
                     nSteps=2, nStepsWarmup=0, nStepsCooldown=1, afFileToLoad=str(path), saveModelEvery=0)
    code, out, err = runMain(argv, capsys)
    assert code == 0, err
    checkpoint = torch.load(tmp_path / "pt-other-step0002.pt", weights_only=True)
    assert all(torch.equal(v, mlp) for v in checkpoint["afValuesMlp"])
    assert all(torch.equal(v, att) for v in checkpoint["afValuesAtt"])


def testParseArgsReadsOnlyTheArgvItIsGiven(monkeypatch):
    from trainLmAf import parseArgs
    monkeypatch.setattr("sys.argv", ["trainLmAf.py", "--lr", "0.1", "--seed=4"])
    hp, given = parseArgs([])
    assert given == set() and hp.lr == 0.0006 and hp.seed != 4
    assert parseArgs(["--lr", "0.1"])[1] == {"lr"} and parseArgs(["--lr=0.1"])[1] == {"lr"}
    assert parseArgs(["--lr=0.1"])[0].lr == 0.1
    hp, given = parseArgs()  # None: the command line
    assert given == {"lr", "seed"} and hp.lr == 0.1 and hp.seed == 4


def testBooleanFlagsMayBeGivenBare():
    from trainLmAf import parseArgs
    hp, given = parseArgs(["--preflight", "--plotShow", "--seed", "3"])
    assert hp.preflight is True and hp.plotShow is True and hp.seed == 3 and {"preflight", "plotShow"} <= given
    hp, _ = parseArgs(["--preflight", "0", "--tieEmbeddings", "false", "--sameDataAcrossModels"])
    assert hp.preflight is False and hp.tieEmbeddings is False and hp.sameDataAcrossModels is True
    assert parseArgs([])[0].preflight is False
