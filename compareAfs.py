"""Compare activation functions under identical conditions: a trainLmAf.py run per (AF, seed), a table and a plot.

    python compareAfs.py --afTypes gelu,relu,prelu,swiglu,spline --seeds 0,1,2 [any trainLmAf.py flags]
    python compareAfs.py --afTypes relu2 --variant "spline-relu2=spline;att-spline --afInit relu2;att-linear" ...

Every run gets the same trainLmAf.py flags except --afType, --seed and --runName (NAME-AF-sSEED), so data order,
steps and seeds are identical across AFs. A --variant LABEL=AFTYPE FLAGS... is one more row: that afType with its own
extra flags (e.g. the spline's --afInit or --afSmoothness), its runs named NAME-LABEL-sSEED.
Each run is a trainLmAf.py subprocess (the training code itself, no second
loop), so one AF that crashes does not stop the others. The results are read back from the runs' metrics-RUN.csv
files (and the parameter count from their logs) and written to dirResults as compare-NAME.md (parameters, final
validation loss, bits per byte and accuracy as mean ± std over seeds, tokens/s) and compare-NAME.png (validation
curves). The exit status is 1 when any run failed (they are named), 2 for bad flags.

A run whose log already holds its final step is not trained again (trainLmAf.py's "already complete"), so a
comparison that was stopped continues where it stopped; use another --name for new settings (a finished run whose
log names another seed or training data than the plan is refused).

--jobs N trains N runs side by side on the CPU (a phase II waits for its phase I); each then gets CPU cores / N threads
unless OMP_NUM_THREADS is set, and its progress lines go only to its log, its errors to stderr-RUN.txt. --gpus 0,1,2,3
(or all) trains one run per GPU at a time, each with CUDA_VISIBLE_DEVICES of its own (scheduler.py). --launcher slurm
submits every run as a Slurm job through submitit instead (slurmJobs.py): it returns once they are submitted, and the
same command writes the table when they are done (--wait: it waits); --status says where each run stands. Ctrl-C (or
SIGTERM) reaches every running trainLmAf.py once: it finishes its step, saves a resumable checkpoint and stops, and
no new run starts; a second Ctrl-C stops them at once. A run stopped so (or by a time limit) resumes from its newest
checkpoint when the study runs again.

--splinePhases 2: an AF with a spline is first trained in phase I (--splineModels models sharing it, the given
--afLr), then in phase II from phase I's ptAf file with --afLr 0; the table reports phase II. Phase I of seed s
trains with --seed (--phase1SeedOffset + s), 1234 + s by default as the original's phase I, so that no phase-I model
starts from the weights or reads the data stream of a reported run. --phase1FilesTokensTr/--phase1FilesTokensVa
(together, for every phase I, or in a variant's flags for its own) train phase I on another corpus, which may have
another vocabulary: AFs do not depend on it. A variant's own --nModels sets its phase I's model count (--nModels 1:
the single-model control; its phase II trains the common --nModels). A spline variant whose own flags say --afLr 0
is a frozen-init control: one run, the spline frozen at its --afInit shape, no phase I. A variant with
--afFileToLoad FILE (FILE may hold {seed}, replaced by each seed) is a loaded row: the file's AFs, frozen unless the
variant gives --afLr, no phase I; e.g. the original authors' published AFs, or AFs from another study.

--metric loss|bpb: what the paired statistics, the best fixed AF and the plot compare (bpb, bits per UTF-8 byte of
the validation text, compares runs of different vocabularies). --baseline LABEL adds a table of paired differences:
every other row's final validation value minus the baseline's on the same seed (same data order and
initialisation), their mean ± standard error (sample std / sqrt(n)), the paired t test's 95% interval and p value,
whether it stays below 0.05 after Holm's adjustment over every comparison of the study, the seeds won, and the
seeds a paired t test (two-sided, 5%) would need for 80% power at the observed mean and spread;
--baseline best-fixed takes the row without learned AFs that has the lowest mean. --pairs LEARNED:CONTROL
(repeatable) adds the same for chosen pairs, e.g. a phase-II row against its frozen-init control. Both go into the
table and into a lower row of the plot.

Every learnable AF gets the same --afLr. The spline's default 0.1 bends `rational` into spikes within a few hundred
steps (its coefficients multiply x^5); about 0.01 keeps it smooth."""
import argparse
import os
import re
import shlex
import sys

import trainLmAf
from lmafs.atomicFiles import atomicWriteText
from lmafs.study.studyPlan import (BEST_FIXED, PER_RUN_FLAGS, CompareError, afTypeSlug, checkRuns, isFixedAf,
                                   parsePair, parseVariant, phase1Data, planRuns)
from lmafs.study.studyReport import (METRICS, bestFixedRow, markdownTable, pairedComparisons, plotAfStudy,
                                     resolveBaseline, summarize)
from lmafs.study import slurmJobs
from lmafs.study.studyRuns import localSlots, printStatus, runLocally, runOnSlurm


def parseArgs(argv):
    """(comparison options, the trainLmAf.py flags given, their Hyperparameters)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Every other flag goes to each trainLmAf.py run unchanged "
                                            "(python trainLmAf.py --help lists them).")
    parser.add_argument("--afTypes", default="",
                        help="comma-separated afType values, e.g. gelu,relu,prelu,swiglu,'spline;att-spline'")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=AFTYPE [FLAGS]",
                        help="one more row: AFTYPE with extra trainLmAf.py flags, labelled LABEL (repeatable), e.g. "
                             "'spline-relu2=spline;att-spline --afInit relu2;att-linear'; with --afFileToLoad FILE "
                             "(FILE may hold {seed}) the row loads that file's AFs, frozen")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every AF is trained once per seed")
    parser.add_argument("--name", default="cmp", help="comparison name: runs NAME-AF-sSEED, outputs compare-NAME.*")
    parser.add_argument("--table", default="", metavar="TABLE",
                        help="write the table and plot as compare-TABLE.md/.png instead of compare-NAME.*: another "
                             "table over rows of the same runs (finished ones are reused), e.g. a follow-up with rows "
                             "of its own")
    parser.add_argument("--splinePhases", type=int, choices=(1, 2), default=1,
                        help="2: spline AFs are learned in phase I, then frozen in phase II (reported)")
    parser.add_argument("--splineModels", type=int, default=4, help="--splinePhases 2: models in phase I")
    parser.add_argument("--phase1SeedOffset", type=int, default=1234,
                        help="--splinePhases 2: phase I of seed s trains with --seed OFFSET+s (the original's phase I: "
                             "1234), so it shares no initial weights or data stream with a reported run")
    parser.add_argument("--phase1FilesTokensTr", default="", metavar="GLOB",
                        help="--splinePhases 2: phase I's training shards, another corpus than the reported runs' "
                             "(with --phase1FilesTokensVa); a variant may give its own")
    parser.add_argument("--phase1FilesTokensVa", default="", metavar="GLOB",
                        help="phase I's validation shards, of the same corpus as --phase1FilesTokensTr")
    parser.add_argument("--metric", choices=tuple(METRICS), default="loss",
                        help="what the paired statistics, the best fixed AF and the plot compare: the final "
                             "validation loss per token, or bits per byte of the validation text (bpb, comparable "
                             "across vocabularies)")
    parser.add_argument("--baseline", default="", metavar="LABEL",
                        help="paired per-seed differences of every other row from this row (an AF or variant label; "
                             f"{BEST_FIXED}: the fixed-AF row with the lowest mean --metric)")
    parser.add_argument("--pairs", action="append", default=[], metavar="LEARNED:CONTROL",
                        help="paired per-seed differences LEARNED - CONTROL of two rows (repeatable)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained side by side, each with CPU cores / JOBS threads unless OMP_NUM_THREADS "
                             "is set; their progress goes to their logs only")
    parser.add_argument("--gpus", default="", metavar="IDS",
                        help="train one run per GPU at a time on these GPUs of this machine ('all' or indices, e.g. "
                             "0,1,2,3), each run with CUDA_VISIBLE_DEVICES of its own")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: this machine (--jobs, --gpus); slurm: every run a Slurm job, submitted through "
                             "submitit (--slurm* flags), its output in DIRRESULTS/submitit/")
    parser.add_argument("--slurmPartition", default="", help="--launcher slurm: the partition (default: Slurm's)")
    parser.add_argument("--slurmTime", default="60", metavar="TIME",
                        help="--launcher slurm: each job's time limit (MINUTES, HH:MM:SS or D-HH:MM); a run that "
                             "needs longer saves before the limit, is requeued and resumes from its checkpoint")
    parser.add_argument("--slurmGpusPerRun", type=int, default=0, help="--launcher slurm: GPUs per run")
    parser.add_argument("--slurmCpusPerRun", type=int, default=1,
                        help="--launcher slurm: CPU cores per run (also its OMP_NUM_THREADS)")
    parser.add_argument("--slurmAccount", default="", help="--launcher slurm: the account to charge")
    parser.add_argument("--slurmExtra", action="append", default=[], metavar="KEY=VALUE",
                        help="--launcher slurm: any other sbatch option (repeatable), e.g. qos=high, constraint=a100")
    parser.add_argument("--wait", action="store_true",
                        help="--launcher slurm: wait for the jobs, then write the table (else: submit and return; the "
                             "same command writes the table once they are done)")
    parser.add_argument("--status", action="store_true",
                        help="say which runs of the study are done, queued, running, stopped or failed (with the "
                             "last lines of their output), without training or submitting")
    parser.add_argument("--dryRun", action="store_true",
                        help="check every run's flags and print the trainLmAf.py commands, without training")
    args, trainerArgv = parser.parse_known_args(argv)
    hp, given = trainLmAf.parseArgs(trainerArgv)
    clash = [name for name in PER_RUN_FLAGS if name in given]
    if clash:
        raise CompareError(f"--{clash[0]} is set per run by compareAfs.py; use --afTypes, --seeds or --name instead")
    if "afFileToLoad" in given:
        raise CompareError("--afFileToLoad is set per row: give it in a --variant, e.g. --variant "
                           "'loaded=spline;att-spline --afFileToLoad FILE'")
    args.afTypes = [af.strip() for af in args.afTypes.split(",") if af.strip()]
    args.entries = [{"label": af, "af": af, "slug": afTypeSlug(af), "flags": [], "frozen": False, "phase1Models": None,
                     "loaded": None, "phase1Data": None} for af in args.afTypes]
    args.entries += [parseVariant(text) for text in args.variant]
    labels = [entry["label"] for entry in args.entries]
    if not args.entries or len(set(labels)) != len(labels) or len({e["slug"] for e in args.entries}) != len(labels):
        raise CompareError(f"--afTypes and --variant need distinct entries (at least one), got {', '.join(labels)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise CompareError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
    if len(set(args.seeds)) != len(args.seeds):
        raise CompareError(f"--seeds must be distinct, got {args.seeds}")
    for flag in ("name", "table"):
        if getattr(args, flag) and not re.fullmatch(r"[A-Za-z0-9_.-]+", getattr(args, flag)):
            raise CompareError(f"--{flag} {getattr(args, flag)!r} may hold only letters, digits and _ . -")
    if args.splineModels < 1:
        raise CompareError(f"--splineModels must be >= 1, got {args.splineModels}")
    if args.jobs < 1:
        raise CompareError(f"--jobs must be >= 1, got {args.jobs}")
    args.slurm = launcherSettings(args, argv)
    if not hp.filesTokensVa or hp.valEvery < 0:
        raise CompareError("the comparison reports validation loss: give --filesTokensVa and --valEvery >= 0")
    args.phase1Data = phase1Data(args.phase1FilesTokensTr, args.phase1FilesTokensVa, "")
    args.bestFixed = args.baseline == BEST_FIXED
    if args.bestFixed:
        if not any(isFixedAf(entry["af"]) for entry in args.entries):
            raise CompareError(f"--baseline {BEST_FIXED} needs a row whose AFs learn nothing, e.g. --afTypes gelu")
    elif args.baseline and args.baseline not in labels:
        raise CompareError(f"--baseline {args.baseline!r} is none of the rows ({', '.join(labels)}) nor "
                           f"{BEST_FIXED}")
    args.pairs = [parsePair(text, labels) for text in args.pairs]
    return args, trainerArgv, hp


def launcherSettings(args, argv):
    """The slurmJobs.SlurmSettings of --launcher slurm, None for a local study; checks that --jobs is for a CPU,
    --gpus for this machine's GPUs, the --slurm* flags for --launcher slurm."""
    given = {word.split("=")[0][2:] for word in argv if word.startswith("--")}
    if args.gpus and args.jobs > 1:
        raise CompareError("--jobs counts runs side by side on a CPU; with --gpus each GPU trains one run at a time: "
                           "drop one of them")
    slurmFlags = sorted(name for name in given if name.startswith("slurm") or name == "wait")
    if args.launcher == "local":
        if slurmFlags:
            raise CompareError(f"--{slurmFlags[0]} is for --launcher slurm")
        return None
    if args.gpus or "jobs" in given:
        raise CompareError(f"--{'gpus' if args.gpus else 'jobs'} is for --launcher local; on Slurm each run is a job "
                           "of its own (--slurmGpusPerRun, --slurmCpusPerRun)")
    if args.slurmGpusPerRun < 0 or args.slurmCpusPerRun < 1:
        raise CompareError(f"--slurmGpusPerRun must be >= 0 and --slurmCpusPerRun >= 1, got {args.slurmGpusPerRun} "
                           f"and {args.slurmCpusPerRun}")
    try:
        return slurmJobs.SlurmSettings(args.slurmPartition, slurmJobs.parseTime(args.slurmTime), args.slurmGpusPerRun,
                                       args.slurmCpusPerRun, args.slurmAccount, slurmJobs.parseExtra(args.slurmExtra))
    except slurmJobs.SlurmError as err:
        raise CompareError(str(err)) from None


def main(argv=None):
    try:
        args, trainerArgv, hp = parseArgs(sys.argv[1:] if argv is None else argv)
        runs = planRuns(args, trainerArgv, hp)
        checkRuns(runs, args)
        if args.status:
            printStatus(runs, args, hp)
            return 0
        slots = localSlots(args) if args.launcher == "local" else None
        if args.slurm and not args.dryRun:
            try:
                slurmJobs.checkCluster(args.slurm)
            except slurmJobs.SlurmError as err:
                raise CompareError(str(err)) from None
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dryRun:
        for index, run in enumerate(runs, 1):
            print(f"[{index}/{len(runs)}] {run['runName']}: trainLmAf.py {shlex.join(run['argv'])}")
        return 0
    os.makedirs(hp.dirResults, exist_ok=True)
    if args.slurm:
        if not runOnSlurm(runs, args, hp, args.slurm):
            return 0
    elif not runLocally(runs, slots):
        print("interrupted: run the same command again to continue (finished runs are kept, stopped ones resume "
              "from their checkpoints)", file=sys.stderr)
        return 130
    failures = [(run["runName"], run["failure"]) for run in runs if "failure" in run]
    rows = summarize(runs, args.entries, args.splinePhases, args.metric)
    args.baseline = resolveBaseline(rows, args)
    stem = os.path.join(hp.dirResults, f"compare-{args.table or args.name}")
    table = markdownTable(rows, args, trainerArgv, hp, failures)
    atomicWriteText(stem + ".md", table)
    againstBaseline, pairs = pairedComparisons(rows, args)
    baselineTitle = f"paired against {args.baseline}" + (", the best fixed AF" if args.bestFixed else "")
    plotAfStudy(stem + ".png", rows, f"{args.table or args.name}: {len(args.entries)} AFs x {len(args.seeds)} seeds",
                [(againstBaseline, baselineTitle), (pairs, "chosen pairs (--pairs)")], args.metric,
                bestFixedRow(rows, args))
    print(table)
    print(f"wrote {stem}.md and {stem}.png")
    if failures:
        print(f"error: {len(failures)} of {len(runs)} runs failed: {', '.join(name for name, _ in failures)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
