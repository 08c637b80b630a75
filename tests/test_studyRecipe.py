"""recipes/studyLearnedAfs.sh: a corpus in, its tokens and the study's 69 runs with their flags, controls and paired
comparisons included (phase I on seeds of its own), at the default size and with --preset medium (checked, not trained: compareAfs.py's variants
and paired statistics and the afInit/afSmoothness runs have their own tests)."""
import os
import shlex
import subprocess

import numpy as np
import pytest

import trainLmAf
from conftest import REPO

SCRIPT = os.path.join(REPO, "recipes", "studyLearnedAfs.sh")
PHASE_TWO = ("spline", "spline-1model", "spline-relu2", "spline-relu2-1model", "spline-relu2-smooth",
             "spline-relu2-smooth1e-5", "spline-relu2-knot0", "spline-mlp")
FROZEN = ("spline-frozen", "spline-relu2-frozen", "spline-relu2-knot0-frozen", "spline-mlp-frozen")


def planStudy(tmp_path, *flags):
    """{run name: its trainLmAf.py Hyperparameters} from the recipe's --dryRun, and the output folder."""
    rng = np.random.default_rng(0)
    words = np.array("the king and queen of a far land spoke with their people about bread war peace".split())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph{i}x " + " ".join(rng.choice(words, 60)) + "." for i in range(1100)))
    out = tmp_path / "study"
    proc = subprocess.run(["bash", SCRIPT, str(corpus), str(out), *flags, "--dryRun", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"fineweb_train_000001.bin", "fineweb_val_000000.bin"} <= set(os.listdir(out / "data"))
    runs = {line.split(": ")[0].split("] ")[1]: shlex.split(line.split(": trainLmAf.py ")[1])
            for line in proc.stdout.splitlines() if line.startswith("[")}
    return {name: trainLmAf.parseArgs(argv)[0] for name, argv in runs.items()}, out


def testStudyRecipePlansEveryRunAndControl(tmp_path):
    hps, out = planStudy(tmp_path)
    expected = [f"study-{af}-s{seed}" for af in ("relu2", "gelu", "swiglu") + FROZEN for seed in range(3)]
    expected += [f"study-{variant}-s{seed}{phase}" for variant in PHASE_TWO for seed in range(3)
                 for phase in ("-phase1", "")]
    assert sorted(hps) == sorted(expected) and len(hps) == 69
    for name, hp in hps.items():
        assert (hp.nLayers, hp.dimEmb, hp.seqLength, hp.nSteps, hp.dirResults) == (2, 64, 256, 600, str(out)), name
    phase1 = {name: hp for name, hp in hps.items() if name.endswith("-phase1")}
    assert {(hp.afType, hp.afLayerSpecific) for hp in phase1.values()} == {("spline;att-spline", 0),
                                                                           ("spline;att-linear", 0)}
    for name, hp in phase1.items():
        assert hp.afLr > 0 and hp.nModels == (1 if "-1model-" in name else 8), name
    # phase I of seed s trains on seed 1234 + s: no phase-I model shares its initial weights or data stream (both
    # from its seed) with a reported run
    reported = {hp.seed for name, hp in hps.items() if not name.endswith("-phase1")}
    assert reported == {0, 1, 2}
    for name, hp in phase1.items():
        assert hp.seed == 1234 + int(name.split("-s")[-1].split("-")[0]) and hp.seed not in reported, name
    assert hps["study-spline-s1-phase1"].afInit == 0.01 and hps["study-spline-s1-phase1"].afSmoothness == 0
    assert (hps["study-spline-relu2-s2-phase1"].afInit, hps["study-spline-relu2-s2-phase1"].afSmoothness) == (
        "relu2;att-linear", 0)
    assert hps["study-spline-relu2-smooth-s0-phase1"].afSmoothness == 0.001
    assert hps["study-spline-relu2-smooth1e-5-s1-phase1"].afSmoothness == 0.00001
    for variant in PHASE_TWO:  # phase II: one model, frozen at the AFs of its own phase I, same seed
        for seed in range(3):
            hp = hps[f"study-{variant}-s{seed}"]
            assert (hp.afLr, hp.nModels, hp.seed) == (0, 1, seed)
            assert hp.afFileToLoad == os.path.join(str(out), f"ptAf-study-{variant}-s{seed}-phase1-step0600.pt")
    # frozen-init controls: the recipe's start, no phase I, nothing learned, nothing loaded
    for variant, init, anchors, afType in zip(FROZEN, (0.01, "relu2;att-linear", "relu2;att-linear", 0.01),
                                              (64, 64, 65, 64), ("spline;att-spline",) * 3 + ("spline;att-linear",)):
        for seed in range(3):
            hp = hps[f"study-{variant}-s{seed}"]
            assert (hp.afType, hp.afInit, hp.afNAnchors, hp.afLr, hp.afFileToLoad, hp.nModels, hp.seed) == (
                afType, init, anchors, 0, "", 1, seed)
    # the MLP-only row: a spline in the MLP, the attention site as the fixed rows' (att-linear)
    assert hps["study-spline-mlp-s0-phase1"].afType == hps["study-spline-mlp-s0"].afType == "spline;att-linear"
    # the knot at 0: 65 knots on ±15 in phase I and phase II (a knot every 30/64, the middle one at 0)
    for name in ("study-spline-relu2-knot0-s0-phase1", "study-spline-relu2-knot0-s0"):
        assert (hps[name].afNAnchors, hps[name].afRange, hps[name].afInit) == (65, 15.0, "relu2;att-linear")
    assert np.linspace(-15, 15, 65)[32] == 0
    assert all(hp.afNAnchors == 64 for name, hp in hps.items() if "knot0" not in name)
    assert hps["study-swiglu-s2"].afType == "swiglu" and hps["study-swiglu-s2"].nModels == 1
    assert subprocess.run(["bash", SCRIPT], capture_output=True, text=True).returncode == 2


def testStudyRecipeAsksForThePairedComparisons():
    with open(SCRIPT) as f:
        script = f.read()
    pairs = {tuple(p.split(":")) for p in script.split("--pairs ")[1:] for p in [p.split()[0].rstrip(")")]}
    assert pairs == {("spline", "spline-frozen"), ("spline", "spline-1model"),
                     ("spline-relu2", "spline-relu2-frozen"), ("spline-relu2", "spline-relu2-1model"),
                     ("spline-relu2-smooth", "spline-relu2-frozen"), ("spline-relu2-smooth1e-5", "spline-relu2-frozen"),
                     ("spline-relu2-knot0", "spline-relu2-knot0-frozen"), ("spline-relu2-knot0", "spline-relu2"),
                     ("spline-relu2-knot0-frozen", "spline-relu2-frozen"), ("spline-relu2-frozen", "relu2"),
                     ("spline-relu2-knot0-frozen", "relu2"), ("spline-mlp", "spline-mlp-frozen"),
                     ("spline", "spline-mlp")}
    assert "--baseline best-fixed" in script


def testMediumPreset(tmp_path):
    hps, out = planStudy(tmp_path, "--preset", "medium", "--seeds", "0")
    assert len(hps) == 23
    for name, hp in hps.items():
        assert (hp.nLayers, hp.dimEmb, hp.nHeads, hp.seqLength, hp.contextSize, hp.nSteps, hp.nStepsWarmup,
                hp.nStepsCooldown) == (4, 128, 4, 512, 512, 1000, 100, 500), name
    assert hps["study-spline-relu2-s0"].afFileToLoad.endswith("ptAf-study-spline-relu2-s0-phase1-step1000.pt")
    assert hps["study-spline-relu2-s0-phase1"].nModels == 8
    # flags after the preset still win
    (tmp_path / "later").mkdir()
    hps, _ = planStudy(tmp_path / "later", "--preset=medium", "--seeds", "0", "--nSteps", "2000")
    assert {hp.nSteps for hp in hps.values()} == {2000} and {hp.dimEmb for hp in hps.values()} == {128}


def testFixedRowsAndRowsOfItsOwn(tmp_path):
    """--rows fixed: the fixed rows, and the rows given after OUTDIR (here the default spline)."""
    hps, _ = planStudy(tmp_path, "--rows", "fixed", "--seeds", "0", "--variant", "spline=spline;att-spline")
    assert sorted(hps) == ["study-gelu-s0", "study-relu2-s0", "study-spline-s0", "study-spline-s0-phase1",
                           "study-swiglu-s0"]
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "c.txt"), str(tmp_path / "o"), "--rows", "some"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == "error: --rows must be all or fixed, got 'some'\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("preset", ["large", ""])
def testUnknownPresetIsOneErrorLine(preset, tmp_path):
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "none.txt"), str(tmp_path / "out"), "--preset", preset],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == f"error: --preset must be small or medium, got '{preset}'\n"
    assert not (tmp_path / "out").exists()


def validationParagraphs(out):
    """Numbers of the corpus paragraphs whose marker the validation shard holds (decoded with its tokenizer)."""
    import re

    from tokenizers import Tokenizer

    from lmafs.data.tokenShards import loadShard

    tokenizer = Tokenizer.from_file(str(out / "data" / "tokenizer.json"))
    text = tokenizer.decode(np.asarray(loadShard(str(out / "data" / "fineweb_val_000000.bin"))).tolist())
    return {int(n) for n in re.findall(r"paragraph(\d+)x", text)}


@pytest.mark.parametrize("layout", ["spread", "contiguous"])
def testStudyDataSamplesTheWholeCorpusWithItsOwnVocabulary(tmp_path, layout):
    """The validation shard holds paragraphs from across the corpus (the first study's data: one stretch at its
    start, kept with --contiguousData); --vocabSize reaches the preprocessing."""
    flags = ["--vocabSize", "300", "--seeds", "0"] + (["--contiguousData"] if layout == "contiguous" else [])
    hps, out = planStudy(tmp_path, *flags)
    assert len(hps) == 23
    paragraphs = validationParagraphs(out)
    assert paragraphs
    if layout == "spread":
        assert min(paragraphs) < 100 and max(paragraphs) > 1000  # of 1100 paragraphs
    else:
        assert paragraphs == set(range(len(paragraphs)))  # the corpus's first paragraphs, in order


def testPlotAfFilesDrawsEachFilesSplinesWithTheirRoughness(tmp_path):
    """recipes/plotAfFiles.py: S of ReLU² on the default 64 knots on ±15 is ∫ f''² ≈ 59 (the docs' scale); a .csv in
    the original's layout (MLP rows, then attention rows) gives its first row of each half; a PNG is written."""
    import sys

    import torch

    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import plotAfFiles

    knots = torch.linspace(-15, 15, 64, device="cpu")
    relu2 = torch.relu(knots) ** 2
    assert plotAfFiles.roughness(knots, relu2) == pytest.approx(59.0, abs=1.0)
    assert plotAfFiles.roughness(knots, 0.5 * knots) == pytest.approx(0.0, abs=1e-6)  # a line: float32 knots only
    rows = [knots, relu2, knots, relu2 + 1, knots, knots, knots, 2 * knots]  # 2 layers: MLP, MLP, att, att
    csvPath = tmp_path / "afs.csv"
    csvPath.write_text("".join(",".join(f"{v:.6f}" for v in row.tolist()) + "\n" for row in rows))
    fileKnots, mlp, attention = plotAfFiles.firstSplines(str(csvPath))
    assert torch.allclose(mlp, relu2, atol=1e-4) and torch.allclose(attention, knots, atol=1e-4)
    out = tmp_path / "afs.png"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "recipes", "plotAfFiles.py"), str(out),
                           f"learned={csvPath}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "recipes", "plotAfFiles.py"), str(tmp_path / "x.png"),
                           str(tmp_path / "missing.csv")], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "does not exist" in proc.stderr
    assert not (tmp_path / "x.png").exists()
