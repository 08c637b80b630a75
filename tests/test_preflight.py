"""--preflight: the default phase I checked for GPUs that are not here, memory estimated on fake tensors."""
import importlib

import numpy as np
import pytest

from conftest import randomDocuments, tinyFlags
from lmafs.run.preflight import USABLE_SHARE, estimatePeakMemory, fittingModelsPerPass, parseGpu, PreflightError
from lmafs.data.tokenShards import writeShard
from trainLmAf import main, parseArgs

PHASE1 = ["--seed", "1234", "--nModels", "20", "--staggeredStarts", "1", "--afLayerSpecific", "0",
          "--afType", "spline;att-spline", "--afLr", "0.1", "--runName", "optimizedMlpAtt-layerShared-phase1"]


@pytest.fixture(scope="module")
def gpt2Data(tmp_path_factory):
    """Shards whose token ids span GPT-2's, so the vocabulary is the default model's 50,304."""
    folder = tmp_path_factory.mktemp("gpt2Data")
    rng = np.random.default_rng(0)
    writeShard(str(folder / "fineweb_val_000000.bin"), randomDocuments(rng, 20000, vocab=50257))
    writeShard(str(folder / "fineweb_train_000001.bin"), randomDocuments(rng, 40000, vocab=50257))
    return ["--filesTokensTr", f"{folder}/fineweb_train_*.bin", "--filesTokensVa", f"{folder}/fineweb_val_*.bin"]


def runMain(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def testDefaultPhaseOneFitsALaptopGpuInSeveralPasses(gpt2Data, capsys):
    code, out, err = runMain(PHASE1 + gpt2Data + ["--preflight", "1", "--preflightGpu", "4090-laptop:8.9:16"], capsys)
    assert code == 0, err
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "(compute capability 8.9, 15.5 GiB free" in out
    assert "ok" in rows["peak memory per pass"] and "of 13.95 usable" in rows["peak memory per pass"]
    perPass = int(rows["modelsPerPass"].split()[2])
    assert 1 < perPass < 20 and "2 pass(es)" in rows["modelsPerPass"]
    assert "inductor" in rows["compiled graphs"]
    assert "ok" in rows["FlexAttention"] and rows["FlexAttention"].endswith("compiles")
    from lmafs.network import splineKernel
    backward = next(b for b in splineKernel.BACKWARD_KERNELS if not splineKernel.MISSING_FEATURES[b])
    assert f"forward triton-tl, backward {backward}, compiled here for sm_89" in rows["spline kernels"]
    assert "capability 8.9, float32, head size 64, flexBlockSize 32: mask block 128" in out
    assert out.rstrip().endswith("preflight: the run will fit and compile")


def testAGpuTooSmallFailsWithOneLine(gpt2Data, capsys):
    code, out, err = runMain(PHASE1 + gpt2Data + ["--preflight", "1", "--preflightGpu", "small:8.6:4"], capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("preflight: peak memory per pass will not work")
    assert "FAIL" in out


@pytest.mark.parametrize("spec", ["h100", "h100:nine:80", "h100:9.0:-1", ":9.0:80"])
def testBadGpuSpecs(spec):
    with pytest.raises(PreflightError, match="preflightGpu"):
        parseGpu(spec)


def testWithoutAGpuThePreflightNeedsOne(tinyData, tmp_path, capsys):
    code, out, err = runMain(tinyFlags(tinyData, tmp_path) + ["--preflight", "1"], capsys)
    assert code == 2 and "--preflightGpu NAME:CAPABILITY:GB" in err and "Traceback" not in err


def testEstimateCountsWeightsGradientsAndAdamExactlyAndGrowsWithThePass(tinyData, tmp_path):
    hp, _ = parseArgs(tinyFlags(tinyData, tmp_path, nModels=6, afType="spline;att-spline", dimEmb=64, seqLength=256,
                                contextSize=256))
    peaks = []
    for perPass in (1, 3, 6):
        peak, parts = estimatePeakMemory(hp, 50304, 6, perPass)
        peaks.append(peak)
    nWeights = sum(p.numel() for p in importlib.import_module("lmafs.run.runSetup").buildModel(hp, 50304, "cpu").parameters())
    assert parts["weights"] == 4 * nWeights and parts["optimizer"] == 2 * parts["gradients"] == 2 * parts["weights"]
    assert peaks[0] < peaks[1] < peaks[2]
    perPass, peak = fittingModelsPerPass(hp, 50304, 6, peaks[1] / USABLE_SHARE)
    assert perPass == 3 and peak == peaks[1]


def testATileThatCannotFitIsNamed(gpt2Data, capsys):
    # one-stage backward of 64-wide float32 tiles at head size 128 needs more than an RTX 40xx's 99 KB per block
    code, out, err = runMain(PHASE1 + gpt2Data + ["--preflight", "1", "--preflightGpu", "4090:8.9:24", "--nHeads", "2",
                                                  "--flexBlockSize", "64"], capsys)
    assert code == 1 and err.startswith("preflight: FlexAttention will not work") and "smaller --flexBlockSize" in err


def testDeviceCpuNeedsAGpuNameAlsoWhereCudaIsPresent(tinyData, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # --device cpu: the local GPU is not the run's
    code, out, err = runMain(tinyFlags(tinyData, tmp_path) + ["--preflight"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device cpu names none" in err
    assert "--preflightGpu NAME:CAPABILITY:GB" in err and "Traceback" not in err
