"""compareAfs.py: a 2-AF x 1-seed comparison on tiny data writes the table and the plot; failed runs are named and
give a non-zero exit; bad flags stop before any training; spline phases I -> II; logs are read back correctly;
--jobs trains side by side with the same numbers, and Ctrl-C lets every running run save."""
import os
import signal
import subprocess
import sys
import time

import pytest

import compareAfs
from lmafs.study import slurmJobs, studyPlan, studyReport, studyRuns, studyStatistics
from conftest import tinyFlags

pngSignature = b"\x89PNG\r\n\x1a\n"


def trainerFlags(dataDir, resultsDir, **overrides):
    return tinyFlags(dataDir, resultsDir, **{"nSteps": 6, "nStepsWarmup": 1, "nStepsCooldown": 2, "valEvery": 3,
                                             **overrides})


def tableRows(path):
    with open(path) as f:
        return [line for line in f.read().splitlines() if line.startswith("| ") and not line.startswith("| AF")]


def checkPng(path):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == pngSignature
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.01


def testTwoAfsOneSeed(tinyData, tmp_path, capfd):
    argv = ["--afTypes", "gelu,swiglu", "--seeds", "0", "--name", "t"] + trainerFlags(tinyData, tmp_path)
    assert compareAfs.main(argv) == 0, capfd.readouterr().err
    rows = tableRows(tmp_path / "compare-t.md")
    assert [row.split("|")[1].strip() for row in rows] == ["gelu", "swiglu"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        params, loss, bpb, acc, seeds = int(cells[1].replace(",", "")), float(cells[2].strip("*")), float(cells[3]), \
            float(cells[5]), cells[7]
        assert params > 0 and 0 < loss < 20 and 0 < bpb < loss and 0 <= acc <= 100 and seeds == "1/1"
        assert float(cells[6].replace(",", "")) > 0  # tokens/s
    # gated MLP: 3*D*64 = 6,144 per layer instead of 8*D^2 = 8,192 at dimEmb 32, 2 layers
    gelu, swiglu = (int(row.split("|")[2].strip().replace(",", "")) for row in rows)
    assert gelu - swiglu == 2 * (8192 - 6144)
    checkPng(tmp_path / "compare-t.png")
    for af in ("gelu", "swiglu"):
        assert os.path.isfile(tmp_path / f"log-t-{af}-s0.txt")
    # Run again: the finished runs are reused, not trained again.
    assert compareAfs.main(argv) == 0
    assert capfd.readouterr().out.count("already complete") == 2  # printed by the trainLmAf.py subprocesses


def testFailedRunsAreNamedAndExitNonZero(tinyData, tmp_path, capsys, monkeypatch):
    # A stand-in trainer that fails for relu and runs the real one otherwise.
    fake = tmp_path / "fakeTrainer.py"
    fake.write_text("import runpy, sys\n"
                    "if 'relu' in sys.argv or 'f-spline-s0-phase1' in sys.argv:\n"
                    "    sys.exit('error: boom in relu')\n"
                    f"sys.argv[0] = {slurmJobs.TRAINER!r}\n"
                    f"sys.path.insert(0, {os.path.dirname(slurmJobs.TRAINER)!r})\n"
                    f"runpy.run_path({slurmJobs.TRAINER!r}, run_name='__main__')\n")
    monkeypatch.setattr(slurmJobs, "TRAINER", str(fake))
    argv = ["--afTypes", "gelu,relu,spline", "--splinePhases", "2", "--name", "f"] + trainerFlags(tinyData, tmp_path)
    assert compareAfs.main(argv) == 1
    out, err = capsys.readouterr()
    assert "3 of 4 runs failed: f-relu-s0, f-spline-s0-phase1, f-spline-s0" in err
    assert "f-spline-s0: skipped, its phase I f-spline-s0-phase1 failed" in out
    with open(tmp_path / "compare-f.md") as f:
        table = f.read()
    assert "| relu | – | failed |" in table and "`f-relu-s0`: exit code 1: error: boom in relu" in table
    assert "| spline (phase II) | – | failed |" in table
    assert tableRows(tmp_path / "compare-f.md")[0].startswith("| gelu |")
    checkPng(tmp_path / "compare-f.png")


@pytest.mark.parametrize("extra, message", [
    (["--seed", "3"], "--seed is set per run"),
    (["--afType", "gelu"], "--afType is set per run"),
    (["--filesTokensVa", ""], "reports validation loss"),
])
def testFlagsClashingWithTheComparison(extra, message, tinyData, tmp_path, capsys):
    argv = ["--afTypes", "gelu"] + trainerFlags(tinyData, tmp_path) + extra
    assert compareAfs.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def testEveryRunIsValidatedBeforeTraining(tinyData, tmp_path, capsys):
    argv = ["--afTypes", "gelu,gelu;att-geglu"] + trainerFlags(tinyData, tmp_path)
    assert compareAfs.main(argv) == 2
    err = capsys.readouterr().err
    assert "cmp-gelu_att-geglu-s0: --afType: 'att-geglu' exists only in the MLP" in err
    assert not os.listdir(tmp_path)
    assert compareAfs.main(["--afTypes", "gelu,gelu"] + trainerFlags(tinyData, tmp_path)) == 2


def testSplinePhasesRunPhaseOneThenTwo(tinyData, tmp_path, capsys):
    argv = ["--afTypes", "spline", "--splinePhases", "2", "--splineModels", "2", "--name", "s"] \
        + trainerFlags(tinyData, tmp_path)
    args, trainerArgv, hp = compareAfs.parseArgs(argv)
    phase1, phase2 = studyPlan.planRuns(args, trainerArgv, hp)
    assert phase1["runName"] == "s-spline-s0-phase1" and phase1["argv"][-6:] == [
        "--runName", "s-spline-s0-phase1", "--nModels", "2", "--saveAfEvery", "0"]
    assert phase2["argv"][-4:] == ["--afLr", "0", "--afFileToLoad",
                                   os.path.join(str(tmp_path), "ptAf-s-spline-s0-phase1-step0006.pt")]
    assert compareAfs.main(argv) == 0, capsys.readouterr().err
    rows = tableRows(tmp_path / "compare-s.md")
    assert len(rows) == 1 and rows[0].startswith("| spline (phase II) |")
    with open(tmp_path / "log-s-spline-s0.txt") as f:
        assert "frozen" in f.read()
    assert compareAfs.main(argv + ["--afLr", "0"]) == 2
    assert "--afLr must not be 0" in capsys.readouterr().err


def testReadRunTakesTheMetricsCsvAndTheLogsLastParameterCount(tmp_path):
    (tmp_path / "log-x.txt").write_text("==== trainLmAf.py  2024-01-01 00:00:00  run 'x'\n"
                                        "Parameters per model: 10 trainable, 0 frozen, 10 total\n"
                                        "==== trainLmAf.py  2024-01-01 00:01:00  run 'x'\n"
                                        "Parameters per model: 1,234 trainable, 5 frozen, 1,239 total\n")
    (tmp_path / "metrics-x.csv").write_text("step,model,split,loss,accuracy,lr,trainSeconds,tokens\n"
                                            "1,0,val,8.500000,0.015000,0.0003,0.000,0\n"
                                            "1,0,train,8.600000,0.010000,0.0003,1.250,32\n"
                                            "1,1,train,8.700000,0.010000,0.0003,1.250,32\n"
                                            "4,0,val,7.250000,0.040000,0.0001,4.500,128\n")
    assert studyPlan.readRun(str(tmp_path), "x", 4) == {"params": 1239, "val": [(1, 8.5, 0.015, None),
                                                                                 (4, 7.25, 0.04, None)],
                                                        "trainSeconds": 4.5, "complete": True}
    # the bits-per-byte column of newer runs
    (tmp_path / "metrics-y.csv").write_text("step,model,split,loss,accuracy,lr,trainSeconds,tokens,bpb\n"
                                            "4,0,val,7.250000,0.040000,0.0001,4.500,128,2.500000\n"
                                            "4,0,train,7.300000,0.040000,0.0001,4.500,128,\n")
    assert studyPlan.readRun(str(tmp_path), "y", 4)["val"] == [(4, 7.25, 0.04, 2.5)]
    assert studyPlan.readRun(str(tmp_path), "x", 5)["complete"] is False
    assert studyPlan.readRun(str(tmp_path), "missing", 4) is None


def testAfTypeSlug():
    assert studyPlan.afTypeSlug("spline;att-spline") == "spline_att-spline"
    assert studyPlan.afTypeSlug("gelu") == "gelu"
    assert studyPlan.isSplineAf("gelu;att-splinePerDim") and not studyPlan.isSplineAf("prelu")


def testScoreAfTypes(tinyData, tmp_path):
    assert studyPlan.afTypeSlug("gelu;att-linear;score-sigmoid") == "gelu_att-linear_score-sigmoid"
    assert studyPlan.isSplineAf("gelu;att-linear;score-spline")
    assert not studyPlan.isSplineAf("gelu;att-linear;score-softplus")
    argv = ["--afTypes", "gelu;att-linear;score-sigmoid,gelu;att-linear;score-spline", "--splinePhases", "2",
            "--name", "s"] + trainerFlags(tinyData, tmp_path)
    args, trainerArgv, hp = compareAfs.parseArgs(argv)
    runs = studyPlan.planRuns(args, trainerArgv, hp)
    studyPlan.checkRuns(runs, args)
    assert [(r["runName"], r["phase"]) for r in runs] == [
        ("s-gelu_att-linear_score-sigmoid-s0", None), ("s-gelu_att-linear_score-spline-s0-phase1", 1),
        ("s-gelu_att-linear_score-spline-s0", 2)]


def testVariantsCarryTheirOwnFlags(tinyData, tmp_path, capsys):
    argv = ["--afTypes", "relu2", "--variant", "sp-relu2=spline;att-spline --afInit relu2;att-linear --afSmoothness 0.01",
            "--splinePhases", "2", "--splineModels", "2", "--name", "v"] + trainerFlags(tinyData, tmp_path, afInit=0.5)
    args, trainerArgv, hp = compareAfs.parseArgs(argv)
    fixed, phase1, phase2 = studyPlan.planRuns(args, trainerArgv, hp)
    assert fixed["runName"] == "v-relu2-s0" and "--afSmoothness" not in fixed["argv"]
    assert phase1["runName"] == "v-sp-relu2-s0-phase1" and phase2["runName"] == "v-sp-relu2-s0"
    for run in (phase1, phase2):  # the variant's flags come after the common ones, so they win
        hpRun, _ = studyPlan.trainLmAf.parseArgs(run["argv"])
        assert (hpRun.afType, hpRun.afInit, hpRun.afSmoothness) == ("spline;att-spline", "relu2;att-linear", 0.01)
    assert compareAfs.main(argv) == 0, capsys.readouterr().err
    rows = tableRows(tmp_path / "compare-v.md")
    assert [row.split(" | ")[0] for row in rows] == ["| relu2", "| sp-relu2 (phase II)"]
    with open(tmp_path / "compare-v.md") as f:
        assert "`sp-relu2` = `--afType 'spline;att-spline' --afInit 'relu2;att-linear' --afSmoothness 0.01`" in f.read()
    with open(tmp_path / "log-v-sp-relu2-s0-phase1.txt") as f:
        assert "AF smoothness S " in f.read()
    with open(tmp_path / "log-v-sp-relu2-s0.txt") as f:  # phase II learns nothing: the prior is switched off
        assert "afSmoothness=0 (no spline is learned)" in f.read()


@pytest.mark.parametrize("variant, message", [
    ("no label", "must look like LABEL=AFTYPE"),
    ("x=spline --seed 1", "--variant x: --seed is set per run"),
    ("gelu=spline", "need distinct entries"),
    ("y=spline --afInit relu3", "y-s0: --afInit: 'relu3' is neither"),
])
def testBadVariantsStopBeforeTraining(variant, message, tinyData, tmp_path, capsys):
    assert compareAfs.main(["--afTypes", "gelu", "--variant", variant] + trainerFlags(tinyData, tmp_path)) == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def writeLossTrainer(folder, losses):
    """A stand-in trainLmAf.py that writes the final validation loss `losses` gives its run (phase I: 7.0; a run
    without one fails), so paired statistics can be checked against numbers worked out by hand."""
    fake = folder / "fakeTrainer.py"
    fake.write_text("import os, sys\n"
                    "argv = sys.argv[1:]\n"
                    "flag = lambda name: argv[len(argv) - 1 - argv[::-1].index('--' + name) + 1]\n"
                    "run, out, steps = flag('runName'), flag('dirResults'), int(flag('nSteps'))\n"
                    f"loss = {losses!r}.get(run, 7.0 if run.endswith('phase1') else None)\n"
                    "if loss is None:\n"
                    "    sys.exit('error: no loss for ' + run)\n"
                    "os.makedirs(out, exist_ok=True)\n"
                    "with open(os.path.join(out, f'metrics-{run}.csv'), 'w') as f:\n"
                    "    f.write('step,model,split,loss,accuracy,lr,trainSeconds,tokens\\n')\n"
                    "    f.write(f'{steps},0,val,{loss},0.2,0.001,2.0,100\\n')\n"
                    "with open(os.path.join(out, f'log-{run}.txt'), 'w') as f:\n"
                    "    f.write('Parameters per model: 10 trainable, 0 frozen, 10 total\\n')\n")
    return fake


def testPairedStatisticsMatchAHandComputation(tmp_path, capsys, monkeypatch):
    # seed 2 of the frozen control fails
    losses = {"p-relu2-s0": 6.0, "p-relu2-s1": 6.2, "p-relu2-s2": 5.9,
              "p-gelu-s0": 5.9, "p-gelu-s1": 6.3, "p-gelu-s2": 5.8,
              "p-sp-s0": 5.7, "p-sp-s1": 6.0, "p-sp-s2": 5.85,
              "p-sp-frozen-s0": 5.8, "p-sp-frozen-s1": 5.95}
    monkeypatch.setattr(slurmJobs, "TRAINER", str(writeLossTrainer(tmp_path, losses)))
    argv = ["--afTypes", "relu2,gelu", "--variant", "sp=spline;att-spline", "--variant",
            "sp-frozen=spline;att-spline --afLr 0", "--splinePhases", "2", "--seeds", "0,1,2", "--name", "p",
            "--baseline", "relu2", "--pairs", "sp:sp-frozen", "--pairs", "gelu:sp-frozen"] \
        + trainerFlags(str(tmp_path), tmp_path)
    assert compareAfs.main(argv) == 1
    assert "1 of 15 runs failed: p-sp-frozen-s2" in capsys.readouterr().err
    with open(tmp_path / "compare-p.md") as f:
        table = f.read()
    # gelu - relu2: -0.1, +0.1, -0.1: mean -1/30, sample std 0.11547, s.e. 0.11547 / sqrt(3) = 0.066667
    # sp - relu2: -0.3, -0.2, -0.05: mean -0.18333, std 0.125831, s.e. 0.072648
    # sp-frozen - relu2 (seeds 0, 1): -0.2, -0.25: mean -0.225, std 0.035355, s.e. 0.025
    # sp - sp-frozen (seeds 0, 1): -0.1, +0.05: mean -0.025, std 0.106066, s.e. 0.075
    # gelu - sp-frozen (seeds 0, 1): +0.1, +0.35: mean +0.225, std 0.176777, s.e. 0.125
    # 95% CI: mean ± t(0.975, n-1) s.e., t = 4.3027 for 3 seeds, 12.7062 for 2: gelu - relu2 -0.0333 ± 0.2868;
    # sp - relu2 -0.1833 ± 0.3126; sp-frozen - relu2 -0.225 ± 0.3177; sp - sp-frozen -0.025 ± 0.9530;
    # gelu - sp-frozen +0.225 ± 1.5883
    from scipy import stats

    def p(deltas):  # scipy's own one-sample t test of the per-seed differences
        return stats.ttest_1samp(deltas, 0.0).pvalue

    # Holm over the 5 distinct comparisons: p values sorted, the k-th smallest times (5 - k + 1), running maximum
    pValues = {"gelu − relu2": p([-0.1, 0.1, -0.1]), "sp (phase II) − relu2": p([-0.3, -0.2, -0.05]),
               "sp-frozen (frozen init) − relu2": p([-0.2, -0.25]),
               "sp (phase II) − sp-frozen (frozen init)": p([-0.1, 0.05]),
               "gelu − sp-frozen (frozen init)": p([0.1, 0.35])}
    ordered = sorted(pValues, key=pValues.get)
    holm, running = {}, 0.0
    for k, label in enumerate(ordered):
        running = max(running, min(1.0, (5 - k) * pValues[label]))
        holm[label] = running
    assert min(holm.values()) > 0.05  # nothing survives here: the verdicts read "not resolved"
    cells = {line.split(" | ")[0][2:]: [c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
             if " − " in line and line.startswith("| ")}
    for label, perSeed, meanSe, ci, won in (
            ("gelu − relu2", ["-0.1000", "+0.1000", "-0.1000"], "-0.0333 ± 0.0667", "[-0.3202, +0.2535]", "2/3"),
            ("sp (phase II) − relu2", ["-0.3000", "-0.2000", "-0.0500"], "-0.1833 ± 0.0726", "[-0.4959, +0.1292]",
             "3/3"),
            ("sp-frozen (frozen init) − relu2", ["-0.2000", "-0.2500", "–"], "-0.2250 ± 0.0250", "[-0.5427, +0.0927]",
             "2/2"),
            ("sp (phase II) − sp-frozen (frozen init)", ["-0.1000", "+0.0500", "–"], "-0.0250 ± 0.0750",
             "[-0.9780, +0.9280]", "1/2"),
            ("gelu − sp-frozen (frozen init)", ["+0.1000", "+0.3500", "–"], "+0.2250 ± 0.1250", "[-1.3633, +1.8133]",
             "0/2")):
        row = cells[label]
        assert row[1:4] == perSeed and row[4:6] == [meanSe, ci] and row[8] == won, row
        assert float(row[6]) == pytest.approx(pValues[label], abs=0.006), row  # printed with 2 significant digits
        assert row[7] == "not resolved"
    assert table.index("Paired against relu2") < table.index("| gelu − relu2 |") < table.index("Chosen pairs") \
        < table.index("| sp (phase II) − sp-frozen (frozen init) |")
    assert "Frozen-init rows" in table and "| relu2 | 10 | 6.0333 ± 0.1528 | – | +0.0000 |" in table
    assert not (tmp_path / "metrics-p-sp-frozen-s0-phase1.csv").exists()  # a frozen-init control has no phase I
    checkPng(tmp_path / "compare-p.png")
    args, _, _ = compareAfs.parseArgs(argv)
    rows = studyReport.summarize([], args.entries, 2)
    assert studyStatistics.pairedDifference(rows[0], rows[1]) is None  # no finished seed in common


def testBestFixedBaselineIsTheFixedAfWithTheLowestMeanLoss(tmp_path, capsys, monkeypatch):
    # gelu (mean 6.0) beats relu2 (6.0333) and swiglu (6.1); prelu is lower still but learns, so it is no baseline
    losses = {"b-relu2-s0": 6.0, "b-relu2-s1": 6.2, "b-relu2-s2": 5.9, "b-gelu-s0": 5.9, "b-gelu-s1": 6.3,
              "b-gelu-s2": 5.8, "b-swiglu-s0": 6.1, "b-swiglu-s1": 6.1, "b-swiglu-s2": 6.1,
              "b-prelu-s0": 5.0, "b-prelu-s1": 5.0, "b-prelu-s2": 5.0, "b-sp-s0": 5.7, "b-sp-s1": 6.0, "b-sp-s2": 5.85}
    monkeypatch.setattr(slurmJobs, "TRAINER", str(writeLossTrainer(tmp_path, losses)))
    argv = ["--afTypes", "relu2,gelu,swiglu,prelu", "--variant", "sp=spline;att-spline", "--splinePhases", "2",
            "--seeds", "0,1,2", "--name", "b", "--baseline", "best-fixed"] + trainerFlags(str(tmp_path), tmp_path)
    assert compareAfs.main(argv) == 0, capsys.readouterr().err
    with open(tmp_path / "compare-b.md") as f:
        table = f.read()
    assert "Δ val loss against gelu (the best fixed AF, --baseline best-fixed)" in table
    assert "Paired against gelu, the best fixed AF (per seed)" in table
    # sp - gelu: -0.2, -0.3, +0.05: mean -0.15, sample std 0.180278, s.e. 0.104083, ± 4.3027 s.e. = ± 0.447833
    assert "| sp (phase II) − gelu | -0.2000 | -0.3000 | +0.0500 | -0.1500 ± 0.1041 | [-0.5978, +0.2978] | 0.29 " \
           "| not resolved | 2/3 |" in table
    assert "| prelu − gelu | -0.9000 | -1.3000 | -0.8000 |" in table and "| gelu | 10 | 6.0000 ± 0.2646 | – | +0.0000 |" \
        in table
    assert compareAfs.main(["--afTypes", "prelu", "--variant", "sp=spline", "--baseline", "best-fixed"]
                           + trainerFlags(str(tmp_path), tmp_path / "none")) == 2
    assert "--baseline best-fixed needs a row whose AFs learn nothing" in capsys.readouterr().err


def testPairedDifferenceOfOneSeedHasNoStandardError():
    one = studyStatistics.pairedDifference({"seedValue": {3: 5.0, 4: 6.0}}, {"seedValue": {3: 5.5}})
    assert one == {"seeds": [3], "deltas": [-0.5], "mean": -0.5, "sd": None, "se": None, "ci": None, "p": None,
                   "seedsFor80": None, "won": 1}
    assert studyReport.formatPaired(one) == "-0.5000" and studyReport.verdict(one) == "–"
    tie = studyStatistics.pairedDifference({"seedValue": {0: 5.0, 1: 6.0}}, {"seedValue": {0: 5.0, 1: 6.5}})
    assert tie["won"] == 1 and tie["se"] == pytest.approx(0.25)
    assert tie["ci"] == pytest.approx((-0.25 - 12.706 * 0.25, -0.25 + 12.706 * 0.25), abs=1e-3)
    assert tie["p"] == pytest.approx(0.5, abs=1e-9)  # t = -1 with 1 degree of freedom: a Cauchy, P(|T| > 1) = 1/2


def testSeedsForPowerAreThoseOfThePairedTTestTables():
    """The fewest seeds for 80% power of a two-sided paired t test at 5%, as G*Power and Cohen's tables give them
    for standardized differences d = mean / sd: 0.5 -> 34, 0.8 -> 15, 1.0 -> 10, 0.2 -> 199."""
    for d, n in ((0.5, 34), (0.8, 15), (1.0, 10), (0.2, 199)):
        assert studyStatistics.seedsForPower(d * 0.02, 0.02) == n, d
        assert studyStatistics.tTestPower(n, d) >= 0.8 > studyStatistics.tTestPower(n - 1, d)
    assert studyStatistics.seedsForPower(0.0, 0.02) is None and studyStatistics.seedsForPower(1e-6, 1.0) is None  # > 100,000
    # the README's old "~46 seeds" for the default start's -0.006 at a std of 0.021 was the count at which the
    # expected interval just touches 0 (power about one half); 80% power needs about twice as many
    assert studyStatistics.seedsForPower(-0.006, 0.021) == 99


def testHolmAdjustment():
    # Holm (1979): 0.01, 0.02, 0.03, 0.04 of four become 4 x 0.01, 3 x 0.02, max(0.06, 2 x 0.03), max(0.06, 0.04)
    adjusted = studyStatistics.holmAdjusted([0.03, 0.01, None, 0.04, 0.02])
    assert adjusted[2] is None and [adjusted[i] for i in (1, 4, 0, 3)] == pytest.approx([0.04, 0.06, 0.06, 0.06])
    assert studyStatistics.holmAdjusted([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def testFrozenAndSingleModelVariantsAreControls(tinyData, tmp_path):
    argv = ["--variant", "sp=spline;att-spline", "--variant", "sp-frozen=spline;att-spline --afLr 0",
            "--variant", "sp-1=spline;att-spline --nModels 1", "--splinePhases", "2", "--splineModels", "3",
            "--name", "c"] + trainerFlags(tinyData, tmp_path)
    args, trainerArgv, hp = compareAfs.parseArgs(argv)
    runs = studyPlan.planRuns(args, trainerArgv, hp)
    studyPlan.checkRuns(runs, args)
    assert [(r["runName"], r["phase"]) for r in runs] == [("c-sp-s0-phase1", 1), ("c-sp-s0", 2),
                                                          ("c-sp-frozen-s0", None), ("c-sp-1-s0-phase1", 1),
                                                          ("c-sp-1-s0", 2)]
    parsed = {r["runName"]: studyPlan.trainLmAf.parseArgs(r["argv"])[0] for r in runs}
    assert parsed["c-sp-s0-phase1"].nModels == 3 and parsed["c-sp-1-s0-phase1"].nModels == 1
    assert parsed["c-sp-1-s0"].nModels == 1
    assert all(r["argv"].count("--nModels") == (r["phase"] == 1) for r in runs)  # each phase I names it once
    assert studyPlan.withoutFlag(["--a", "1", "--nModels", "4", "--nModels=2", "--b"], "--nModels") == ["--a", "1",
                                                                                                         "--b"]
    assert parsed["c-sp-1-s0"].afFileToLoad.endswith("ptAf-c-sp-1-s0-phase1-step0006.pt")
    assert (parsed["c-sp-frozen-s0"].afLr, parsed["c-sp-frozen-s0"].afFileToLoad) == (0, "")


@pytest.mark.parametrize("extra, message", [
    (["--baseline", "nope"], "--baseline 'nope' is none of the rows"),
    (["--pairs", "gelu"], "--pairs 'gelu' must be LEARNED:CONTROL"),
    (["--pairs", "gelu:gelu"], "two different rows"),
    (["--pairs", "gelu:x"], "two different rows of gelu, relu"),
])
def testBadPairedFlags(extra, message, tinyData, tmp_path, capsys):
    assert compareAfs.main(["--afTypes", "gelu,relu"] + trainerFlags(tinyData, tmp_path) + extra) == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def testJobsGiveTheNumbersOfOneRunAtATime(tinyData, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads in both, so the same float arithmetic
    metrics, progressLines = {}, {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        argv = ["--afTypes", "gelu,spline", "--splinePhases", "2", "--splineModels", "2", "--name", "j",
                "--jobs", str(jobs)] + trainerFlags(tinyData, out)
        assert compareAfs.main(argv) == 0, capfd.readouterr().err
        progressLines[jobs] = capfd.readouterr().out.count("Step 6/6")
        # step, model, split, loss, accuracy of every row (the timing columns differ)
        metrics[jobs] = {run: [row.split(",")[:5] for row in open(out / f"metrics-{run}.csv").read().splitlines()]
                         for run in ("j-gelu-s0", "j-spline-s0-phase1", "j-spline-s0")}
        with open(out / "compare-j.md") as f:
            assert ("runs side by side (--jobs)" in f.read()) == (jobs == 2)
    assert metrics[1] == metrics[2] and all(len(rows) > 4 for rows in metrics[1].values())
    assert progressLines[1] >= 3 and progressLines[2] == 0  # they reach the terminal for one job at a time only


def writeWaitingTrainer(path, events):
    """A stand-in trainLmAf.py that notes its start, waits until two runs have started (so it fails when the runs
    do not overlap), notes SIGINTs (the first: 'saving', exit 130), and writes a finished run's metrics."""
    path.write_text(
        "import os, signal, sys, time\n"
        "argv = sys.argv[1:]\n"
        "flag = lambda name: argv[len(argv) - 1 - argv[::-1].index('--' + name) + 1]\n"
        "run, out, steps = flag('runName'), flag('dirResults'), int(flag('nSteps'))\n"
        f"events = {str(events)!r}\n"
        "def note(text):\n"
        "    with open(events, 'a') as f:\n"
        "        f.write(text + '\\n')\n"
        "def onSigint(signum, frame):\n"
        "    note(f'saving {run}')\n"
        "    sys.exit(130)\n"
        "signal.signal(signal.SIGINT, onSigint)\n"
        "gpu = os.environ.get('CUDA_VISIBLE_DEVICES')\n"
        "note(f'start {run} threads {os.environ.get(\"OMP_NUM_THREADS\")}' + (f' gpu {gpu}' if gpu else ''))\n"
        "deadline = time.time() + 60\n"
        "while sum(line.startswith('start') for line in open(events)) < 2 or 'hold' in run:\n"
        "    if time.time() > deadline:\n"
        "        sys.exit('error: no other run started')\n"
        "    time.sleep(0.05)\n"
        "os.makedirs(out, exist_ok=True)\n"
        "with open(os.path.join(out, f'metrics-{run}.csv'), 'w') as f:\n"
        "    f.write('step,model,split,loss,accuracy,lr,trainSeconds,tokens\\n')\n"
        "    f.write(f'{steps},0,val,5.0,0.2,0.001,2.0,100\\n')\n"
        "with open(os.path.join(out, f'log-{run}.txt'), 'w') as f:\n"
        "    f.write('Parameters per model: 10 trainable, 0 frozen, 10 total\\n')\n"
        "note(f'end {run}')\n")


def testJobsRunSideBySideAndPhaseTwoWaitsForItsPhaseOne(tinyData, tmp_path, monkeypatch, capsys):
    fake, events = tmp_path / "fakeTrainer.py", tmp_path / "events.txt"
    writeWaitingTrainer(fake, events)
    monkeypatch.setattr(slurmJobs, "TRAINER", str(fake))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = ["--afTypes", "spline,gelu,relu", "--splinePhases", "2", "--name", "w", "--jobs", "2"] \
        + trainerFlags(tinyData, tmp_path)
    assert compareAfs.main(argv) == 0, capsys.readouterr().err
    lines = open(events).read().splitlines()
    threads = str(max(1, os.cpu_count() // 2))
    assert sorted(lines[:2]) == [f"start w-gelu-s0 threads {threads}", f"start w-spline-s0-phase1 threads {threads}"]
    assert lines.index("end w-spline-s0-phase1") < lines.index(f"start w-spline-s0 threads {threads}")
    assert len(lines) == 8  # 4 runs, each started and ended once


def testGpusTrainOneRunPerGpuEachWithItsOwnDevice(tinyData, tmp_path, monkeypatch, capsys):
    fake, events = tmp_path / "fakeTrainer.py", tmp_path / "events.txt"
    writeWaitingTrainer(fake, events)
    monkeypatch.setattr(slurmJobs, "TRAINER", str(fake))
    monkeypatch.setattr(studyRuns.torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--afTypes", "spline,gelu,relu", "--splinePhases", "2", "--name", "g", "--gpus", "1,2"] \
        + trainerFlags(tinyData, tmp_path)
    assert compareAfs.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    starts = [line.split() for line in open(events).read().splitlines() if line.startswith("start")]
    assert sorted(words[1] for words in starts) == ["g-gelu-s0", "g-relu-s0", "g-spline-s0", "g-spline-s0-phase1"]
    assert all(words[-2:][0] == "gpu" and words[-1] in ("1", "2") for words in starts), starts
    assert {words[-1] for words in starts[:2]} == {"1", "2"}  # the first two side by side, on the two GPUs
    for words in starts:  # the device each run was given is named when it starts
        assert f"{words[1]}: trainLmAf.py" in out and f"(on GPU {words[-1]})" in out.split(f"{words[1]}: trainLmAf.py")[1].splitlines()[0]
    assert "Tokens/s with one run per GPU (--gpus)." in open(tmp_path / "compare-g.md").read()


@pytest.mark.parametrize("extra, message", [
    (["--gpus", "2"], "--gpus 2 names GPU 2, but this machine has GPUs 0-1"),
    (["--gpus", "0", "--jobs", "2"], "--jobs counts runs side by side on a CPU; with --gpus each GPU"),
    (["--slurmPartition", "x"], "--slurmPartition is for --launcher slurm"),
    (["--launcher", "slurm", "--gpus", "0"], "--gpus is for --launcher local"),
    (["--launcher", "slurm", "--slurmTime", "soon"], "--slurmTime 'soon' is not a Slurm time"),
    (["--launcher", "slurm", "--slurmExtra", "qos"], "--slurmExtra 'qos' must be KEY=VALUE"),
])
def testBadLauncherFlagsStopWithOneLine(extra, message, tinyData, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(studyRuns.torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert compareAfs.main(["--afTypes", "gelu"] + trainerFlags(tinyData, tmp_path / "out") + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def testSlurmWithoutSubmititOrSlurmctldIsOneLine(tinyData, tmp_path, capsys, monkeypatch):
    argv = ["--afTypes", "gelu", "--launcher", "slurm"] + trainerFlags(tinyData, tmp_path / "out")
    monkeypatch.setattr(slurmJobs.importlib.util, "find_spec", lambda name: None)
    assert compareAfs.main(argv) == 2
    assert capsys.readouterr().err == ("error: --launcher slurm submits through submitit, which is not installed: "
                                       "pip install submitit\n")
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm client commands
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'Slurmctld(primary) at nowhere is DOWN'\n")
    (tmp_path / "scontrol").chmod(0o755)
    assert compareAfs.main(argv) == 2
    assert capsys.readouterr().err == "error: no reachable slurmctld: scontrol ping says Slurmctld(primary) at " \
                                      "nowhere is DOWN\n"
    assert not (tmp_path / "out").exists()


def testStatusOfALocalStudy(tinyData, tmp_path, capsys):
    """--status: done, stopped (a checkpoint to resume from), failed (its stderr's last lines), not started."""
    argv = ["--afTypes", "gelu,relu,swiglu,prelu", "--name", "st", "--status"] + trainerFlags(tinyData, tmp_path)
    (tmp_path / "log-st-gelu-s0.txt").write_text("Step 6/6   lossVa 5.0000   accVa 20.0\n")
    (tmp_path / "pt-st-relu-s0-step0003.pt").write_text("")
    (tmp_path / "stderr-st-swiglu-s0.txt").write_text("warning: something\nerror: boom in swiglu\n")
    assert compareAfs.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "st-gelu-s0: done"
    assert out[1] == "st-relu-s0: stopped" and out[2] == f"    resumes from {tmp_path}/pt-st-relu-s0-step0003.pt"
    assert out[3:6] == ["st-swiglu-s0: failed", "    warning: something", "    error: boom in swiglu"]
    assert out[6:] == ["st-prelu-s0: not started", "1 done, 1 failed, 1 not started, 1 stopped"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def testInterruptReachesEachRunningRunOnceAndStartsNoOther(signum, tinyData, tmp_path):
    fake, events = tmp_path / "fakeTrainer.py", tmp_path / "events.txt"
    writeWaitingTrainer(fake, events)
    events.write_text("")
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(compareAfs.__file__)!r}); import compareAfs; "
              f"from lmafs.study import slurmJobs; slurmJobs.TRAINER = {str(fake)!r}; "
              "sys.exit(compareAfs.main(sys.argv[1:]))")
    # The first two runs wait for each other and finish; the two 'hold' runs wait until interrupted, and swiglu
    # must never start.
    argv = ["--afTypes", "gelu,relu", "--variant", "hold=gelu", "--variant", "hold2=relu",
            "--variant", "last=swiglu", "--name", "i", "--jobs", "2"] + trainerFlags(tinyData, tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", script] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while sum("start i-hold" in line for line in open(events)) < 2:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = open(events).read().splitlines()
    assert sorted(line for line in lines if line.startswith("saving")) == ["saving i-hold-s0", "saving i-hold2-s0"]
    assert sum(line.startswith("start") for line in lines) == 4
    assert "interrupted: the running runs finish their step and save" in err
    assert "run the same command again to continue" in err


def testTimeLeftFromTheRunsTrainedSoFarByKind():
    workers = studyRuns.StudyProgress([], studyRuns.scheduler.cpuSlots(2))
    phase1, other = {"phase": 1}, {"phase": 2}
    workers.left = {"phase-I": 3, "other": 4}
    assert workers.timeLeft(phase1, 600.0, trained=True) is None  # no other run has a time yet
    assert workers.timeLeft(other, 1.0, trained=False) is None  # a run kept from before: not timed
    assert workers.timeLeft(other, 60.0, trained=True) == (
        "estimated time left: 11 min (2 phase-I run(s) at 600 s, 2 other run(s) at 60 s, 2 at a time)")
    assert workers.timeLeft(phase1, 800.0, trained=True) == (
        "estimated time left: 7 min (1 phase-I run(s) at 700 s, 2 other run(s) at 60 s, 2 at a time)")
    workers.left = {"phase-I": 1, "other": 1}
    # the last run of its kind alone: one at a time, whatever --jobs says
    assert workers.timeLeft(other, 60.0, trained=True) == (
        "estimated time left: 12 min (1 phase-I run(s) at 700 s, 2 at a time)")
    assert workers.timeLeft(phase1, 700.0, trained=True) is None  # nothing left
    assert studyRuns.formatDuration(3720) == "1 h 02 min" and studyRuns.formatDuration(20) == "1 min"
    # on 4 GPUs the runs left go 4 at a time
    gpus = studyRuns.StudyProgress([], [studyRuns.scheduler.Slot(f"GPU {i}", {}) for i in range(4)])
    gpus.left = {"phase-I": 1, "other": 9}
    gpus.seconds = {"phase-I": [400.0], "other": []}
    assert gpus.timeLeft(other, 40.0, trained=True) == (
        "estimated time left: 3 min (1 phase-I run(s) at 400 s, 8 other run(s) at 40 s, 4 GPUs)")
