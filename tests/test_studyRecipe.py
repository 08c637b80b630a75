"""recipes/studyLearnedAfs.sh: a corpus in, its tokens and the study's 33 runs with their flags (checked, not trained:
compareAfs.py's variants and the afInit/afSmoothness runs have their own tests)."""
import os
import shlex
import subprocess

import numpy as np

import trainLmAf
from conftest import REPO

SCRIPT = os.path.join(REPO, "recipes", "studyLearnedAfs.sh")


def testStudyRecipePlansEveryRun(tmp_path):
    rng = np.random.default_rng(0)
    words = np.array("the king and queen of a far land spoke with their people about bread war peace".split())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 60)) + "." for _ in range(1100)))
    out = tmp_path / "study"
    proc = subprocess.run(["bash", SCRIPT, str(corpus), str(out), "--dryRun", "--device", "cpu"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out / "data"))[:2] == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    runs = {line.split(": ")[0].split("] ")[1]: shlex.split(line.split(": trainLmAf.py ")[1])
            for line in proc.stdout.splitlines() if line.startswith("[")}
    expected = [f"study-{af}-s{seed}" for af in ("relu2", "gelu", "swiglu") for seed in range(3)]
    expected += [f"study-{variant}-s{seed}{phase}"
                 for variant in ("spline", "spline-relu2", "spline-relu2-smooth", "spline-relu2-smooth1e-5")
                 for seed in range(3) for phase in ("-phase1", "")]
    assert sorted(runs) == sorted(expected)
    hps = {name: trainLmAf.parseArgs(argv)[0] for name, argv in runs.items()}
    for name, hp in hps.items():
        assert (hp.nLayers, hp.dimEmb, hp.seqLength, hp.nSteps, hp.dirResults) == (2, 64, 256, 600, str(out)), name
    phase1 = {name: hp for name, hp in hps.items() if name.endswith("-phase1")}
    assert {(hp.nModels, hp.afType, hp.afLayerSpecific) for hp in phase1.values()} == {(8, "spline;att-spline", 0)}
    assert hps["study-spline-s1-phase1"].afInit == 0.01 and hps["study-spline-s1-phase1"].afSmoothness == 0
    assert (hps["study-spline-relu2-s2-phase1"].afInit, hps["study-spline-relu2-s2-phase1"].afSmoothness) == (
        "relu2;att-linear", 0)
    assert hps["study-spline-relu2-smooth-s0-phase1"].afSmoothness == 0.001
    assert hps["study-spline-relu2-smooth1e-5-s1-phase1"].afSmoothness == 0.00001
    assert hps["study-spline-relu2-smooth-s0"].afLr == 0 and hps["study-spline-relu2-smooth-s0"].afFileToLoad.endswith(
        "ptAf-study-spline-relu2-smooth-s0-phase1-step0600.pt")
    assert hps["study-swiglu-s2"].afType == "swiglu" and hps["study-swiglu-s2"].nModels == 1
    assert subprocess.run(["bash", SCRIPT], capture_output=True, text=True).returncode == 2
