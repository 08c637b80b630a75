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
steps (its coefficients multiply x^5); about 0.01 keeps it smooth.
"""
import argparse
import csv
import dataclasses
import fcntl
import math
import os
import re
import shlex
import signal
import sys
import time

import numpy as np
import torch

import flagChecks
import runPlan
import runSetup
import scheduler
import trainLmAf
import vocabulary
from activationFunctions import LEARNABLE_TYPES, MLP_INPUT_TYPES, SPLINE_TYPES, AfFileError
from afFiles import loadAfsIntoModel
from atomicFiles import atomicWrite, atomicWriteText
from plotting import parseLog
from runFiles import RunFiles
from runOutputs import originalValueText
from tokenShards import ShardError, listShards

TRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainLmAf.py")
# Flags the comparison sets per run; given by the user they would make the runs differ or collide.
PER_RUN_FLAGS = ("afType", "seed", "runName", "resumeFrom")
# Flags of compareAfs.py that a variant may give too (for its own phase I); the trainer never sees them.
PHASE1_DATA_FLAGS = ("phase1FilesTokensTr", "phase1FilesTokensVa")
# --baseline's word for the fixed-AF row (nothing learned in its AFs) with the lowest mean final validation value.
BEST_FIXED = "best-fixed"
METRICS = {"loss": "val loss", "bpb": "val bpb"}
SEED_FIELD = "{seed}"  # in a loaded row's --afFileToLoad: replaced by each seed


class CompareError(Exception):
    """Bad comparison flags; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# Flags and the list of runs


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
    import slurmJobs

    if args.slurmGpusPerRun < 0 or args.slurmCpusPerRun < 1:
        raise CompareError(f"--slurmGpusPerRun must be >= 0 and --slurmCpusPerRun >= 1, got {args.slurmGpusPerRun} "
                           f"and {args.slurmCpusPerRun}")
    try:
        return slurmJobs.SlurmSettings(args.slurmPartition, slurmJobs.parseTime(args.slurmTime), args.slurmGpusPerRun,
                                       args.slurmCpusPerRun, args.slurmAccount, slurmJobs.parseExtra(args.slurmExtra))
    except slurmJobs.SlurmError as err:
        raise CompareError(str(err)) from None


def localSlots(args):
    """The scheduler's slots: one per GPU of --gpus, else --jobs on the CPU; CompareError for a GPU not there."""
    if not args.gpus:
        return scheduler.cpuSlots(args.jobs)
    try:
        return scheduler.gpuSlots(args.gpus, torch.cuda.device_count())
    except scheduler.SlotError as err:
        raise CompareError(str(err)) from None


def phase1Data(trainGlob, validationGlob, where):
    """(training glob, validation glob) of phase I's own corpus, or None when neither is given."""
    if not trainGlob and not validationGlob:
        return None
    if not (trainGlob and validationGlob):
        raise CompareError(f"{where}--phase1FilesTokensTr and --phase1FilesTokensVa go together (phase I's training "
                           "and validation shards of one corpus)")
    return trainGlob, validationGlob


def parsePair(text, labels):
    """'LEARNED:CONTROL' -> (LEARNED, CONTROL), both row labels."""
    learned, sep, control = (part.strip() for part in text.partition(":"))
    if not sep or learned not in labels or control not in labels or learned == control:
        raise CompareError(f"--pairs {text!r} must be LEARNED:CONTROL, two different rows of {', '.join(labels)}")
    return learned, control


def takeFlags(words, names):
    """(words without the flags `names` and their values, {name: value} of those given)."""
    kept, taken, index = [], {}, 0
    while index < len(words):
        name, equals, value = words[index].partition("=")
        if name.startswith("--") and name[2:] in names:
            if not equals:
                index += 1
                value = words[index] if index < len(words) else ""
            taken[name[2:]] = value
        else:
            kept.append(words[index])
        index += 1
    return kept, taken


def parseVariant(text):
    """'LABEL=AFTYPE --flag value ...' -> a comparison entry."""
    label, _, rest = text.partition("=")
    label, words = label.strip(), shlex.split(rest)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or not words:
        raise CompareError(f"--variant {text!r} must look like LABEL=AFTYPE [FLAGS], LABEL of letters, digits, _ . -")
    flags, ownData = takeFlags(words[1:], PHASE1_DATA_FLAGS)
    own, given = trainLmAf.parseArgs(flags)
    clash = [name for name in PER_RUN_FLAGS if name in given]
    if clash:
        raise CompareError(f"--variant {label}: --{clash[0]} is set per run by compareAfs.py")
    data = phase1Data(ownData.get("phase1FilesTokensTr"), ownData.get("phase1FilesTokensVa"), f"--variant {label}: ")
    loaded = None
    if "afFileToLoad" in given:
        if data:
            raise CompareError(f"--variant {label}: a row loading --afFileToLoad has no phase I, so no phase-I corpus")
        loaded = os.path.abspath(own.afFileToLoad)
        flags = withoutFlag(flags, "--afFileToLoad") + ([] if "afLr" in given else ["--afLr", "0"])
    return {"label": label, "af": words[0], "slug": label, "flags": flags,
            "frozen": not loaded and "afLr" in given and own.afLr == 0,
            "phase1Models": own.nModels if "nModels" in given else None, "loaded": loaded, "phase1Data": data}


def afParts(afType):
    """The MLP, attention and score AFs an afType names."""
    return flagChecks.splitAfType(afType) + (flagChecks.splitScoreType(afType)[1],)


def isSplineAf(afType):
    return any(part in SPLINE_TYPES for part in afParts(afType))


def isFixedAf(afType):
    """Whether nothing in the afType's AFs is trained (no spline, no learnable or gated-mixture AF)."""
    return not any(part in SPLINE_TYPES + LEARNABLE_TYPES + MLP_INPUT_TYPES for part in afParts(afType))


def bestFixedRow(rows, args):
    """The label of the finished fixed-AF row with the lowest mean final validation value of --metric ('' when
    none finished)."""
    fixed = {entry["label"] for entry in args.entries if isFixedAf(entry["af"])}
    finished = [row for row in rows if row["af"] in fixed and row["nDone"] and row[args.metric] is not None]
    return min(finished, key=lambda row: float(np.mean(row[args.metric])))["af"] if finished else ""


def resolveBaseline(rows, args):
    """The baseline row's label: --baseline's, or for best-fixed bestFixedRow's."""
    return bestFixedRow(rows, args) if args.baseline == BEST_FIXED else args.baseline


def afTypeSlug(afType):
    """afType as a piece of a file name: 'spline;att-spline' -> 'spline_att-spline',
    'gelu;att-linear;score-sigmoid' -> 'gelu_att-linear_score-sigmoid'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", afType.replace(";", "_"))


def hasPhaseOne(entry, splinePhases):
    """Whether the entry's reported runs load splines learned in a phase I (a frozen-init control and a loaded row
    have none)."""
    return splinePhases == 2 and isSplineAf(entry["af"]) and not entry["frozen"] and not entry["loaded"]


def withoutFlag(flags, name):
    """flags without `name VALUE` and `name=VALUE`."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == name:
            skip = True
        elif not flag.startswith(name + "="):
            kept.append(flag)
    return kept


def seededPath(template, seed):
    return template.replace(SEED_FIELD, str(seed))


def planRuns(args, trainerArgv, hp):
    """One dict per trainLmAf.py run, in order; a phase-II run names the phase-I run it loads. 'seed' is the study's
    seed a run belongs to, 'trainSeed' the --seed it trains with."""
    runs = []
    for entry in args.entries:
        af = entry["label"]
        for seed in args.seeds:
            runName = f"{args.name}-{entry['slug']}-s{seed}"
            flags = entry["flags"] + (["--afFileToLoad", seededPath(entry["loaded"], seed)] if entry["loaded"] else [])
            argv = trainerArgv + flags + ["--afType", entry["af"], "--seed", str(seed)]
            if hasPhaseOne(entry, args.splinePhases):
                # The variant's --nModels is its phase I's, given there once; phase II trains as many models as
                # every other row.
                common = trainerArgv + withoutFlag(flags, "--nModels") + ["--afType", entry["af"]]
                data = entry["phase1Data"] or args.phase1Data
                phase1Seed = args.phase1SeedOffset + seed
                phase1 = {"af": af, "seed": seed, "trainSeed": phase1Seed, "runName": runName + "-phase1", "phase": 1,
                          "reported": False, "otherCorpus": data is not None,
                          "argv": common + (["--filesTokensTr", data[0], "--filesTokensVa", data[1]] if data else [])
                          + ["--seed", str(phase1Seed), "--runName", runName + "-phase1", "--nModels",
                             str(entry["phase1Models"] or args.splineModels), "--saveAfEvery", "0"]}
                afFile = RunFiles(hp.dirResults, phase1["runName"]).afFile(hp.nSteps)
                runs.append(phase1)
                runs.append({"af": af, "seed": seed, "trainSeed": seed, "runName": runName, "phase": 2,
                             "reported": True, "after": phase1,
                             "argv": common + ["--seed", str(seed), "--runName", runName, "--afLr", "0",
                                               "--afFileToLoad", afFile]})
            else:
                runs.append({"af": af, "seed": seed, "trainSeed": seed, "runName": runName, "phase": None,
                             "reported": True, "argv": argv + ["--runName", runName]})
    return runs


def checkRuns(runs, args):
    """Validate every run's flags, the phase-I seeds and corpora, the loaded AF files and the runs finished before,
    before any training starts, so that a typo costs seconds, not hours."""
    for run in runs:
        hp, _ = trainLmAf.parseArgs(run["argv"])
        if run["phase"] == 2:
            hp = dataclasses.replace(hp, afFileToLoad="")  # the file appears only once phase I has run
        try:
            hp, _ = flagChecks.checkFlags(hp)
        except flagChecks.ConfigError as err:
            raise CompareError(f"{run['runName']}: {err}") from None
        if run["phase"] == 1 and hp.afLr == 0:
            raise CompareError("--splinePhases 2 learns the splines in phase I: --afLr must not be 0")
    checkPhaseOneSeeds(runs)
    for run in runs:
        if run["phase"] == 1 and run["otherCorpus"]:
            checkCorpus(run)
    checkLoadedFiles(runs, args)
    checkFinishedRuns(runs, args)


def checkPhaseOneSeeds(runs):
    """No phase-I model may start from the weights or read the data stream of a reported run: a model's data stream
    is TokenStream(seed, model index) and its initial weights come from the seed, so their seeds must differ."""
    reported = {}
    for run in runs:
        if run["reported"]:
            reported.setdefault(run["trainSeed"], run["runName"])
    for run in runs:
        if run["phase"] == 1 and run["trainSeed"] in reported:
            raise CompareError(f"{run['runName']} would train with --seed {run['trainSeed']}, the seed (initial "
                               f"weights and data stream) of {reported[run['trainSeed']]}; choose another "
                               "--phase1SeedOffset")


def checkCorpus(run):
    """A phase I on another corpus: its shards exist and hold one vocabulary."""
    hp, _ = trainLmAf.parseArgs(run["argv"])
    try:
        files = listShards(hp.filesTokensTr, "--phase1FilesTokensTr") + listShards(hp.filesTokensVa,
                                                                                    "--phase1FilesTokensVa")
        vocabulary.ofShards(files)
    except ShardError as err:
        raise CompareError(f"{run['runName']}: {err}") from None


def corpusName(trainGlob):
    """Which vocabulary a corpus's shards were made with, for the table's header ('' when unreadable)."""
    try:
        found = vocabulary.ofShards(listShards(trainGlob))
    except ShardError:
        return ""
    return found.name if found else vocabulary.GPT2_NAME


def checkLoadedFiles(runs, args):
    """Every loaded row's file exists and fits the row's afType and layers (loaded into a model of the run's size)."""
    loaded = {entry["label"] for entry in args.entries if entry["loaded"]}
    checked = set()
    for run in runs:
        if run["af"] not in loaded:
            continue
        hp, _ = flagChecks.checkFlags(trainLmAf.parseArgs(run["argv"])[0])
        key = (hp.afFileToLoad, hp.afType, hp.nLayers, hp.afLayerSpecific, hp.dimEmb)
        if key in checked:
            continue
        checked.add(key)
        if not os.path.isfile(hp.afFileToLoad):
            raise CompareError(f"--variant {run['af']}: --afFileToLoad {hp.afFileToLoad} does not exist"
                               + (f" (seed {run['seed']})" if SEED_FIELD in next(e["loaded"] for e in args.entries
                                                                                  if e["label"] == run["af"]) else ""))
        model = runSetup.buildModel(hp, 128, torch.device("cpu"))  # the AFs do not depend on the vocabulary
        try:
            loadAfsIntoModel(model, hp.afFileToLoad, freeze=True)
        except AfFileError as err:
            raise CompareError(f"--variant {run['af']}: {err}") from None


def checkFinishedRuns(runs, args):
    """A run already complete counts only when it was trained with the planned seed and data (an earlier tool or
    study in the same folder may have trained another), and, for --metric bpb, when its metrics hold bits per byte."""
    for run in runs:
        hp, _ = trainLmAf.parseArgs(run["argv"])
        files = RunFiles(hp.dirResults, run["runName"])
        if not files.complete(hp.nSteps):
            continue
        logged = parseLog(files.log)["hyperparameters"]
        for name in ("seed", "filesTokensTr"):
            planned = originalValueText(name, getattr(hp, name))
            if name in logged and logged[name] != planned:
                raise CompareError(f"{run['runName']} in {hp.dirResults} was trained with {name} = {logged[name]}, "
                                   f"but this study plans {planned}; use another --name or --dirResults")
        if args.metric == "bpb" and run["reported"]:
            result = readRun(hp.dirResults, run["runName"], hp.nSteps)
            if result and result["val"] and result["val"][-1][3] is None:
                raise CompareError(f"--metric bpb: {files.metrics} holds no bits per byte (written before "
                                   "trainLmAf.py reported them); use --metric loss, or train it again")


# ----------------------------------------------------------------------------------------------
# Running and reading back


def trainedTokens(hp):
    """Tokens all models of a run train on (staggered phase-I models start late)."""
    return hp.batchSize * hp.seqLength * sum(hp.nSteps - start for start in runPlan.modelStartSteps(hp))


def readRun(dirResults, runName, nSteps):
    """Parameters (from the log's last run), validation curve of model 0 as (step, loss, accuracy, bits per byte or
    None) and training seconds (from the metrics CSV) of a run; None when it wrote no metrics."""
    files = RunFiles(dirResults, runName)
    metricsPath, logPath = files.metrics, files.log
    if not os.path.isfile(metricsPath):
        return None
    with open(metricsPath, newline="") as f:
        rows = list(csv.DictReader(f))
    result = {"params": None, "complete": any(int(r["step"]) == nSteps for r in rows),
              "val": [(int(r["step"]), float(r["loss"]), float(r["accuracy"]),
                       float(r["bpb"]) if r.get("bpb") else None) for r in rows
                      if r["split"] == "val" and r["model"] == "0"],
              "trainSeconds": max((float(r["trainSeconds"]) for r in rows), default=None)}
    if os.path.isfile(logPath):
        result["params"] = parseLog(logPath)["parametersTotal"]
    return result


RUN_KINDS = ("phase-I", "other")


def runKind(run):
    """Phase-I runs train several models and take several times longer than the others."""
    return RUN_KINDS[0] if run["phase"] == 1 else RUN_KINDS[1]


def formatDuration(seconds):
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


class StudyProgress:
    """The scheduler's events for a study's runs: a line when a run starts (and on which GPU) and when it ends, with
    its result read back from its files, and the estimated time left; fills each run's 'result' or 'failure'."""

    def __init__(self, runs, slots):
        self.byName = {run["runName"]: run for run in runs}
        self.index = {run["runName"]: index for index, run in enumerate(runs, 1)}
        self.total, self.slots = len(runs), slots
        self.left = {kind: 0 for kind in RUN_KINDS}  # runs not yet finished, by kind
        self.seconds = {kind: [] for kind in RUN_KINDS}  # wall times of the runs trained here, by kind
        for run in runs:
            self.left[runKind(run)] += 1
        self.interruptSaid = False

    def say(self, run, text):
        print(f"[{self.index[run['runName']]}/{self.total}] {run['runName']}: {text}", flush=True)

    def onStart(self, task, slot):
        run = self.byName[task.name]
        where = f" (on {slot.name})" if slot.name.startswith("GPU") else ""
        self.say(run, f"trainLmAf.py {shlex.join(task.argv[2:])}{where}")

    def onFinish(self, task, outcome):
        run = self.byName[task.name]
        if outcome.skipped:
            run["failure"] = f"its phase I {run['after']['runName']} failed"
            self.say(run, f"skipped, {run['failure']}")
            self.report(run, 0.0, trained=False)
            return False
        runHp, _ = trainLmAf.parseArgs(run["argv"])
        files = RunFiles(runHp.dirResults, run["runName"])
        stderr = ""
        if os.path.isfile(files.stderr):
            with open(files.stderr, errors="replace") as f:
                stderr = f.read()
        if stderr:
            sys.stderr.write(stderr)
        fillResult(run, runHp, outcome.returncode, stderr)
        status = run.get("failure") or f"val loss {run['result']['val'][-1][1]:.4f}" + (
            f", bpb {run['result']['val'][-1][3]:.4f}" if run["result"]["val"][-1][3] is not None else "")
        self.say(run, f"{'FAILED, ' if 'failure' in run else ''}{status} ({outcome.seconds:.0f} s)")
        self.report(run, outcome.seconds, trained=not run["alreadyDone"] and "failure" not in run)
        return "failure" not in run

    def onInterrupt(self, running):
        if not self.interruptSaid:
            print("interrupted: the running runs finish their step and save (Ctrl-C again stops them at once)",
                  file=sys.stderr, flush=True)
        self.interruptSaid = True

    def report(self, run, wall, trained):
        estimate = self.timeLeft(run, wall, trained)
        if estimate:
            print(f"[{self.index[run['runName']]}/{self.total}] {estimate}", flush=True)

    def timeLeft(self, run, wall, trained):
        """After a run: the estimated time until the last run ends (the mean wall time of each kind so far, times
        the runs of that kind left, as many at a time as there are slots), as a line; None before a kind left to run
        has a time."""
        kind = runKind(run)
        self.left[kind] -= 1
        if trained:
            self.seconds[kind].append(wall)
        left = {k: n for k, n in self.left.items() if n}
        if not left or any(not self.seconds[k] for k in left):
            return None
        means = {k: float(np.mean(self.seconds[k])) for k in left}
        slots = len(self.slots)
        total = sum(left[k] * means[k] for k in left) / min(slots, sum(left.values()))
        parts = ", ".join(f"{left[k]} {k} run(s) at {means[k]:.0f} s" for k in RUN_KINDS if k in left)
        where = f"{slots} GPUs" if self.slots[0].name.startswith("GPU") else f"{slots} at a time"
        return f"estimated time left: {formatDuration(total)} ({parts}, {where})"


def fillResult(run, runHp, returncode, stderr):
    """run['result'] (its final validation and tokens/s) when it finished, else run['failure'] (why, in a line)."""
    result = readRun(runHp.dirResults, run["runName"], runHp.nSteps)
    lastError = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if returncode:
        # trainLmAf.py exits 128 + N after saving on signal N; subprocess reports a signal that killed it as -N.
        signalNumber = returncode - 128 if returncode > 128 else -returncode
        killedBy = f" ({signal.Signals(signalNumber).name})" if signalNumber in set(signal.Signals) else ""
        run["failure"] = f"exit code {returncode}{killedBy}" + (f": {lastError}" if lastError else "")
    elif result is None or not result["complete"] or not result["val"]:
        run["failure"] = "its metrics hold no final step or no validation result"
    else:
        result["tokensPerSecond"] = trainedTokens(runHp) / max(result["trainSeconds"] or 0.0, 1e-9)
        run["result"] = result


def runLocally(runs, slots):
    """Train every run on this machine's slots, a phase II after its own phase I, each from its newest checkpoint
    when an earlier study stopped it; False when interrupted."""
    tasks = []
    for run in runs:
        runHp, _ = trainLmAf.parseArgs(run["argv"])
        files = RunFiles(runHp.dirResults, run["runName"])
        run["alreadyDone"] = files.complete(runHp.nSteps)  # it only reports itself: no time for the estimate
        tasks.append(scheduler.Task(
            run["runName"], [sys.executable, TRAINER] + run["argv"] + files.resumeArguments(runHp.nSteps),
            after=(run["after"]["runName"],) if run["phase"] == 2 else (),
            # progress lines (also in each run's log) on the terminal for one run at a time; errors kept per run
            stdout=scheduler.TERMINAL if len(slots) == 1 else None, stderr=files.stderr, kind=runKind(run)))
    localScheduler = scheduler.LocalScheduler(slots, StudyProgress(runs, slots), interrupt="forward")
    previous = signal.signal(signal.SIGTERM, raiseKeyboardInterrupt)
    try:
        localScheduler.run(tasks)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return not localScheduler.interrupted


def slurmRuns(runs):
    """The runs as slurmJobs.SlurmStudy takes them."""
    described = []
    for run in runs:
        runHp, _ = trainLmAf.parseArgs(run["argv"])
        described.append({"runName": run["runName"], "argv": run["argv"], "dirResults": runHp.dirResults,
                          "nSteps": runHp.nSteps, "after": run["after"]["runName"] if run["phase"] == 2 else None})
    return described


def runOnSlurm(runs, args, hp, settings):
    """Submit what is missing; with --wait, wait until no job of the study is queued or running. True when every
    run has ended (the table can be made), False when jobs are still queued or running."""
    import slurmJobs

    study = slurmJobs.SlurmStudy(hp.dirResults, args.name, settings)
    described = slurmRuns(runs)
    submitted = study.submit(described, jobName=f"{args.name}")
    if submitted:
        arrays = sorted({jobId.split("_")[0] for jobId in submitted.values()})
        print(f"submitted {len(submitted)} run(s) to Slurm (job{'s' if len(arrays) > 1 else ''} {', '.join(arrays)}); "
              f"their output: {study.folder}", flush=True)
    said = {}
    while True:
        rows = study.status(described)
        for name, state, jobId, _ in rows:
            if said.get(name) != state:
                said[name] = state
                if state in ("running", "done", "failed") and args.wait:
                    print(f"{name}: {state}" + (f" (job {jobId})" if jobId else ""), flush=True)
        active = [row for row in rows if row[1] in ("queued", "running")]
        if not active:
            break
        if not args.wait:
            print(f"{len(active)} of {len(rows)} runs queued or running; `compareAfs.py ... --status` shows them, and "
                  "this command writes the table once they are done (--wait: wait for them)", flush=True)
            return False
        time.sleep(SLURM_POLL_SECONDS)
    failed = {name: detail for name, state, _, detail in rows if state in ("failed", "not submitted")}
    for run in runs:
        runHp, _ = trainLmAf.parseArgs(run["argv"])
        fillResult(run, runHp, 0, "")
        if "failure" in run and run["runName"] in failed:
            run["failure"] = f"its Slurm job failed: {failed[run['runName']].splitlines()[-1]}"
    return True


SLURM_POLL_SECONDS = 10  # --wait asks Slurm this often


def printStatus(runs, args, hp):
    """Which runs are done, queued, running or failed (with the last lines of their output), and not started."""
    import slurmJobs

    study = slurmJobs.SlurmStudy(hp.dirResults, args.name)
    onSlurm = bool(study.load())
    rows = study.status(slurmRuns(runs)) if onSlurm else [localStatus(run) for run in runs]
    counts = {}
    for name, state, jobId, detail in rows:
        counts[state] = counts.get(state, 0) + 1
        print(f"{name}: {state}" + (f" (job {jobId})" if jobId else ""))
        for line in detail.splitlines():
            print(f"    {line}")
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + (" (Slurm)" if onSlurm else ""))


def localStatus(run):
    """(run name, state, '', detail) of a run trained on this machine: done, running (its log is locked by the
    trainer), stopped (a checkpoint to resume from), failed (what it wrote to stderr) or not started."""
    runHp, _ = trainLmAf.parseArgs(run["argv"])
    files = RunFiles(runHp.dirResults, run["runName"])
    if files.complete(runHp.nSteps):
        return run["runName"], "done", "", ""
    if os.path.isfile(files.log):
        with open(files.log, "a") as log:
            try:
                fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return run["runName"], "running", "", ""
    checkpoint = files.newestCheckpoint()
    if checkpoint:
        return run["runName"], "stopped", "", f"resumes from {checkpoint}"
    if os.path.isfile(files.stderr) and os.path.getsize(files.stderr):
        import slurmJobs

        return run["runName"], "failed", "", slurmJobs.lastLines(files.stderr)
    return run["runName"], "not started", "", ""



# ----------------------------------------------------------------------------------------------
# Table and plot


def meanStd(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def formatMeanStd(values, digits):
    mean, std = meanStd(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def summarize(runs, entries, splinePhases, metric="loss"):
    """One row per entry (AF or variant) over its reported runs that succeeded; seedValue: the final validation
    value of --metric per seed."""
    rows = []
    for entry in entries:
        af = entry["label"]
        mine = [r for r in runs if r["af"] == af and r["reported"]]
        done = [r["result"] for r in mine if "result" in r]
        suffix = " (frozen init)" if entry["frozen"] and isSplineAf(entry["af"]) else \
            " (loaded)" if entry["loaded"] else " (phase II)" if hasPhaseOne(entry, splinePhases) else ""
        column = {"loss": 1, "bpb": 3}[metric]
        row = {"af": af, "label": af + suffix, "nRuns": len(mine), "nDone": len(done), "runs": done,
               "seedValue": {r["seed"]: r["result"]["val"][-1][column] for r in mine
                             if "result" in r and r["result"]["val"][-1][column] is not None}}
        if done:
            bpb = [d["val"][-1][3] for d in done]
            row.update(params=done[0]["params"], loss=[d["val"][-1][1] for d in done],
                       bpb=bpb if None not in bpb else None,
                       acc=[100 * d["val"][-1][2] for d in done], speed=[d["tokensPerSecond"] for d in done])
        rows.append(row)
    return rows


ALPHA, POWER = 0.05, 0.8  # two-sided paired t tests at 5%; the seeds for 80% power
MAX_SEEDS = 100_000  # "seeds for 80% power" beyond this reads "> 100,000"


def pairedDifference(row, control):
    """row's final validation value minus control's, seed by seed over the seeds both finished: {'seeds', 'deltas',
    'mean', 'sd' (sample std), 'se' (sd / sqrt(n)), 'ci' (the paired t test's 95% interval, mean ± t(0.975, n-1)
    se), 'p' (its two-sided p value), 'seedsFor80' (seedsForPower), 'won' (seeds where row's value is lower)}; sd,
    se, ci, p and seedsFor80 None for one seed; None when they share no finished seed."""
    from scipy import stats

    seeds = sorted(set(row["seedValue"]) & set(control["seedValue"]))
    if not seeds:
        return None
    deltas = np.array([row["seedValue"][s] - control["seedValue"][s] for s in seeds])
    n, mean = len(deltas), float(deltas.mean())
    paired = {"seeds": seeds, "deltas": deltas.tolist(), "mean": mean, "sd": None, "se": None, "ci": None, "p": None,
              "seedsFor80": None, "won": int((deltas < 0).sum())}
    if n > 1:
        sd = float(deltas.std(ddof=1))
        se = sd / math.sqrt(n)
        half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * se
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1)) if se > 0 else float(mean == 0)
        paired.update(sd=sd, se=se, ci=(mean - half, mean + half), p=p, seedsFor80=seedsForPower(mean, sd))
    return paired


def tTestPower(n, effect):
    """Power of the two-sided paired t test at ALPHA with n seeds when the true mean difference is `effect` standard
    deviations: P(|T| > t(1 - ALPHA/2, n-1)) for T noncentral t with n-1 degrees of freedom and noncentrality
    effect * sqrt(n)."""
    from scipy import stats

    critical = stats.t.ppf(1 - ALPHA / 2, n - 1)
    shift = effect * math.sqrt(n)
    return float(stats.nct.sf(critical, n - 1, shift) + stats.nct.cdf(-critical, n - 1, shift))


def seedsForPower(mean, sd):
    """The fewest seeds (>= 2) at which the two-sided paired t test at 5% has 80% power, if the true mean difference
    and its spread were the observed ones; None beyond MAX_SEEDS (or for a mean of 0)."""
    if sd == 0:
        return 2 if mean != 0 else None
    effect = abs(mean) / sd
    if effect == 0 or tTestPower(MAX_SEEDS, effect) < POWER:
        return None
    low, high = 1, 2  # power grows with n: double until it is reached, then bisect
    while tTestPower(high, effect) < POWER:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if tTestPower(middle, effect) < POWER else (low, middle)
    return high


def holmAdjusted(pValues):
    """Holm's step-down adjustment of the p values (None stays None) for testing them all at once: the k-th smallest
    of m becomes max over j <= k of min(1, (m - j + 1) p_(j))."""
    present = sorted((p, i) for i, p in enumerate(pValues) if p is not None)
    adjusted, running = [None] * len(pValues), 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running
    return adjusted


def pairedComparisons(rows, args):
    """(baseline comparisons, --pairs comparisons): lists of (label, paired difference or None); every distinct
    comparison of the two gets its Holm-adjusted p value ('pHolm') over all of them."""
    byLabel = {row["af"]: row for row in rows}
    againstBaseline = []
    if args.baseline:
        base = byLabel[args.baseline]
        againstBaseline = [(f"{row['label']} − {base['label']}", pairedDifference(row, base))
                           for row in rows if row is not base]
    pairs = [(f"{byLabel[a]['label']} − {byLabel[b]['label']}", pairedDifference(byLabel[a], byLabel[b]))
             for a, b in args.pairs]
    distinct = {}
    for label, paired in againstBaseline + pairs:
        if paired is not None:
            distinct.setdefault(label, paired)
    for paired, adjusted in zip(distinct.values(), holmAdjusted([p["p"] for p in distinct.values()])):
        paired["pHolm"] = adjusted
    for label, paired in againstBaseline + pairs:
        if paired is not None:
            paired["pHolm"] = distinct[label]["pHolm"]
    return againstBaseline, pairs


def formatPaired(paired):
    if paired["se"] is None:
        return f"{paired['mean']:+.4f}"
    return f"{paired['mean']:+.4f} ± {paired['se']:.4f}"


def formatP(p):
    return "–" if p is None else f"{p:.2g}" if p >= 0.001 else "<0.001"


def formatSeeds(paired):
    if paired["sd"] is None:
        return "–"
    return f"{paired['seedsFor80']:,}" if paired["seedsFor80"] is not None else f"> {MAX_SEEDS:,}"


def verdict(paired):
    """'resolved' (95% interval excludes 0), and whether it survives Holm's adjustment."""
    if paired["p"] is None:
        return "–"
    if paired["p"] >= ALPHA:
        return "not resolved"
    return "resolved, holds after Holm" if paired["pHolm"] < ALPHA else "resolved, not after Holm"


def pairedTable(title, comparisons, seeds):
    """Markdown lines: one row per comparison, its Δ per seed, mean ± s.e., 95% interval, p, Holm's verdict, seeds
    won and the seeds 80% power would need."""
    lines = ["", title, "",
             "| difference | " + " | ".join(f"Δ seed {s}" for s in seeds)
             + " | mean Δ ± s.e. | 95% CI | p | verdict (Holm) | won | seeds for 80% power |",
             "|---|" + "---:|" * (len(seeds) + 6)]
    for label, paired in comparisons:
        if paired is None:
            lines.append(f"| {label} | " + " | ".join("–" for _ in seeds) + " | – | – | – | – | – | – |")
            continue
        perSeed = dict(zip(paired["seeds"], paired["deltas"]))
        cells = [f"{perSeed[s]:+.4f}" if s in perSeed else "–" for s in seeds]
        ci = "[{:+.4f}, {:+.4f}]".format(*paired["ci"]) if paired["ci"] else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {formatPaired(paired)} | {ci} | {formatP(paired['p'])} "
                     f"| {verdict(paired)} | {paired['won']}/{len(paired['seeds'])} | {formatSeeds(paired)} |")
    return lines


def phaseOneLines(args, trainerArgv, hp):
    """Which seeds and corpora phase I trains on, for the table's header."""
    if args.splinePhases != 2 or not any(hasPhaseOne(entry, 2) for entry in args.entries):
        return []
    seeds = [args.phase1SeedOffset + s for s in args.seeds]
    lines = ["", f"Phase I of seed s trains with --seed {args.phase1SeedOffset} + s ({', '.join(map(str, seeds))}): "
                 "no phase-I model starts from the weights or reads the data stream of a reported run."]
    reportedCorpus = f"`{hp.filesTokensTr}` ({corpusName(hp.filesTokensTr) or 'unreadable'})"
    corpora = {}
    for entry in args.entries:
        if hasPhaseOne(entry, 2):
            data = entry["phase1Data"] or args.phase1Data
            corpora.setdefault(data[0] if data else hp.filesTokensTr, []).append(entry["label"])
    if len(corpora) > 1 or hp.filesTokensTr not in corpora:
        lines += ["", f"Corpora: every reported run trains on {reportedCorpus}; phase I of "
                  + "; of ".join(f"{', '.join(labels)} on `{glob}` ({corpusName(glob) or 'unreadable'})"
                                 for glob, labels in corpora.items()) + "."]
    return lines


def markdownTable(rows, args, trainerArgv, hp, failures):
    metric, finished = args.metric, [row for row in rows if row["nDone"]]
    best = min((float(np.mean(row[metric])) for row in finished if row[metric] is not None), default=None)
    reference = next(row for row in rows if row["af"] == args.baseline) if args.baseline else rows[0]
    baseline = float(np.mean(reference[metric])) if reference["nDone"] and reference[metric] is not None else None
    lines = [f"# Activation-function comparison `{args.table or args.name}`", "",
             f"Every run: `trainLmAf.py {shlex.join(trainerArgv)}` plus its `--afType`, `--seed` and `--runName`; "
             f"seeds {', '.join(map(str, args.seeds))}; {hp.nSteps} steps. Validation loss (nats per token), bits "
             f"per byte of the validation text and accuracy of model 0 at the last step, mean ± std over seeds; "
             f"Δ {METRICS[metric]} against {reference['label']}"
             + (" (the best fixed AF, --baseline best-fixed)" if args.bestFixed and args.baseline else "")
             + "; parameters per model "
             "(embeddings included)." + (f" Tokens/s with up to {args.jobs} runs side by side (--jobs)."
                                           if args.jobs > 1 else " Tokens/s with one run per GPU (--gpus)."
                                           if args.gpus else ""), "",
             f"| AF | params | val loss | val bpb | Δ {METRICS[metric]} | val acc (%) | tokens/s | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if not row["nDone"]:
            lines.append(f"| {row['label']} | – | failed | – | – | – | – | 0/{row['nRuns']} |")
            continue
        cells = {name: formatMeanStd(row[name], 4) if row[name] is not None else "–" for name in METRICS}
        value = float(np.mean(row[metric])) if row[metric] is not None else None
        if value is not None and value == best and len(finished) > 1:
            cells[metric] = f"**{cells[metric]}**"
        delta = f"{value - baseline:+.4f}" if baseline is not None and value is not None else "–"
        speed = f"{meanStd(row['speed'])[0]:,.0f}"
        lines.append(f"| {row['label']} | {row['params']:,} | {cells['loss']} | {cells['bpb']} | {delta} | "
                     f"{formatMeanStd(row['acc'], 2)} | {speed} | {row['nDone']}/{row['nRuns']} |")
    variants = [entry for entry in args.entries if entry["flags"] or entry["label"] != entry["af"] or entry["loaded"]]
    if variants:
        lines += ["", "Variants: " + "; ".join(
            f"`{e['label']}` = `{shlex.join(['--afType', e['af']] + e['flags'] + variantExtras(e))}`"
            for e in variants) + "."]
    if args.splinePhases == 2:
        lines += ["", f"Phase II rows: splines learned by {args.splineModels} models in phase I (unless the variant "
                      "sets its own --nModels; runs NAME-AF-sSEED-phase1), then loaded frozen (--afLr 0)."]
    lines += phaseOneLines(args, trainerArgv, hp)
    if any(entry["frozen"] and isSplineAf(entry["af"]) for entry in args.entries):
        lines += ["", "Frozen-init rows: the spline frozen at its --afInit shape from step 0 (--afLr 0, no phase I)."]
    if any(entry["loaded"] for entry in args.entries):
        lines += ["", "Loaded rows: the AFs of the variant's --afFileToLoad (each seed's own where it holds {seed}), "
                      "frozen unless the variant gives --afLr, no phase I."]
    againstBaseline, pairs = pairedComparisons(rows, args)
    pairedNote = (f"Δ: final {METRICS[metric]} of the first row minus the second's on the same seed (same data "
                  "order and initialisation); mean over seeds ± standard error (sample std / √n); 95% CI: the "
                  "paired t test's interval, mean ± t(0.975, n−1) · s.e., and p its two-sided p value (an interval "
                  "that holds 0, p ≥ 0.05: not resolved, within the seed-to-seed noise); verdict (Holm): a resolved "
                  f"difference that stays below 0.05 after Holm's adjustment for all {countComparisons(againstBaseline, pairs)} "
                  "comparisons of this study holds after Holm, one that does not may be chance among many; won: "
                  "seeds where the first row's value is lower; seeds for 80% power: the fewest seeds at which a "
                  "paired t test (two-sided, 5%) detects a true difference of the observed mean and spread 4 times "
                  "in 5 (noncentral t; the observed mean is itself uncertain, so read it as an order of magnitude).")
    if againstBaseline:
        bestFixed = ", the best fixed AF" if args.bestFixed else ""
        lines += pairedTable(f"Paired against {reference['label']}{bestFixed} (per seed). {pairedNote}",
                             againstBaseline, args.seeds)
    if pairs:
        lines += pairedTable("Chosen pairs, --pairs (per seed)." + ("" if againstBaseline else f" {pairedNote}"), pairs,
                             args.seeds)
    if failures:
        lines += ["", "Failed runs:"] + [f"- `{name}`: {why}" for name, why in failures]
    return "\n".join(lines) + "\n"


def variantExtras(entry):
    """What a variant gives besides trainer flags: its loaded file, its phase-I corpus."""
    extras = ["--afFileToLoad", entry["loaded"]] if entry["loaded"] else []
    if entry["phase1Data"]:
        extras += ["--phase1FilesTokensTr", entry["phase1Data"][0], "--phase1FilesTokensVa", entry["phase1Data"][1]]
    return extras


def countComparisons(againstBaseline, pairs):
    return len({label for label, paired in againstBaseline + pairs if paired is not None and paired["p"] is not None})


def splitOutliers(shown):
    """(the comparisons at the scale of most, those far larger): a comparison whose largest |value| (seeds and
    interval) is more than 4 times the 75th percentile of the others' goes to a panel of its own, so that it does
    not squeeze the differences of interest."""
    def extent(paired):
        return max([abs(d) for d in paired["deltas"]] + ([abs(c) for c in paired["ci"]] if paired["ci"] else []))

    near, far = list(shown), []
    while len(near) > 2:
        largest = max(near, key=lambda item: extent(item[1]))
        others = [extent(item[1]) for item in near if item is not largest]
        if extent(largest[1]) <= 4 * max(float(np.percentile(others, 75)), 1e-12):
            break
        near.remove(largest)
        far.append(largest)
    order = {id(item): i for i, item in enumerate(shown)}
    return near, sorted(far, key=lambda item: order[id(item)])


def drawPaired(ax, comparisons, title, metric="loss"):
    """Paired differences as a dot plot: a row per comparison, each seed a dot, the mean a bar with the 95% interval
    as whiskers (green or red when it excludes 0, grey when it holds 0; hatched marker when it does not survive
    Holm), 0 dashed; the right margin names mean ± s.e., the interval, p after Holm and the seeds won."""
    shown = [(label, paired) for label, paired in comparisons if paired is not None]
    ax.set_title(title, fontsize=10)
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=0.9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel(f"Δ final {METRICS[metric]} (first − second, same seed; whiskers: 95% CI); left of 0: the first "
                  "is better")
    if not shown:
        ax.text(0.5, 0.5, "no seed finished in both rows", transform=ax.transAxes, ha="center", va="center",
                color="grey")
        ax.set_yticks([])
        return
    for y, (label, paired) in enumerate(shown):
        withinNoise = paired["ci"] is None or paired["ci"][0] <= 0.0 <= paired["ci"][1]
        color = "grey" if withinNoise else "tab:green" if paired["mean"] < 0 else "tab:red"
        ax.plot(paired["deltas"], [y] * len(paired["deltas"]), linestyle="none", marker="o", markersize=4,
                color="dimgrey", alpha=0.7)
        if paired["ci"]:
            ax.plot(paired["ci"], [y, y], color=color, linewidth=1.6)
            ax.plot(paired["ci"], [y, y], color=color, linestyle="none", marker="|", markersize=8)
        holds = paired.get("pHolm") is not None and paired["pHolm"] < ALPHA
        ax.plot([paired["mean"]], [y], marker="D", markersize=6, color=color,
                markerfacecolor=color if holds or withinNoise else "white", markeredgewidth=1.6)
        ci = "   95% CI [{:+.3f}, {:+.3f}]".format(*paired["ci"]) if paired["ci"] else ""
        holm = f"   p(Holm) {formatP(paired.get('pHolm'))}" if paired["p"] is not None else ""
        ax.annotate(f"{formatPaired(paired)}{ci}{holm}   won {paired['won']}/{len(paired['seeds'])}", (1.0, y),
                    xycoords=("axes fraction", "data"), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_yticks(range(len(shown)), [label for label, _ in shown], fontsize=8)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    values = [v for _, p in shown for v in p["deltas"] + (list(p["ci"]) if p["ci"] else [])]
    low, high = min(values + [0.0]), max(values + [0.0])
    pad = 0.08 * max(high - low, 1e-3)
    ax.set_xlim(low - pad, high + pad)


def rowStyles(rows, bestLabel):
    """{label: (colour, linestyle)}: a colour each (tab10, tab20, then tab20 dashed), the best fixed AF black."""
    from matplotlib import colormaps

    done = [row for row in rows if row["nDone"] and row["af"] != bestLabel]
    colors = colormaps["tab10" if len(done) <= 10 else "tab20"].colors
    styles = {row["af"]: (colors[i % len(colors)], "-" if i < len(colors) else "--") for i, row in enumerate(done)}
    styles[bestLabel] = ("black", "-")
    return styles


def plotAfStudy(path, rows, title, pairedPanels=(), metric="loss", bestLabel=None):
    """Validation curves of --metric, one colour per row: the mean over seeds, a band of ± one standard error
    around it; right panel zooms on the last third of training, where the AFs' differences are small next to the
    early drop; bestLabel (the best fixed AF) is drawn in black, in front. Each of pairedPanels, (comparisons,
    title) with paired comparisons (--baseline, --pairs), adds a full-width panel below with their per-seed
    differences; comparisons far larger than the rest get a panel of their own."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for comparisons, name in pairedPanels:
        if not comparisons:
            continue
        near, far = splitOutliers([c for c in comparisons if c[1] is not None])
        panels.append((near, name))
        if far:
            panels.append((far, f"{name}: the large differences, on their own scale"))
    heights = [0.9 + 0.32 * max(len(c), 1) for c, _ in panels]
    fig = Figure(figsize=(14, 5.6 + sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)
    top = fig
    if panels:  # subfigures, so the paired panels' long labels do not narrow the curves above them
        top, bottom = fig.subfigures(2, 1, height_ratios=[5.6, sum(heights)])
        for ax, (comparisons, name) in zip(np.atleast_1d(bottom.subplots(len(panels), 1, height_ratios=heights)),
                                           panels):
            drawPaired(ax, comparisons, name, metric)
    axFull, axZoom = top.subplots(1, 2)
    column = {"loss": 1, "bpb": 3}[metric]
    styles = rowStyles(rows, bestLabel)
    curvesOf = {}
    for row in rows:
        curves = [np.asarray([(v[0], v[column]) for v in d["val"] if v[column] is not None], dtype=float)
                  for d in row["runs"]]
        curves = [c for c in curves if len(c)]
        if row["nDone"] and curves:
            curvesOf[row["af"]] = curves
    lastStep = max((c[-1, 0] for curves in curvesOf.values() for c in curves), default=1)
    zoomFrom = lastStep * 2 / 3
    bounds = {"full": [], "zoom": []}
    for row in sorted((r for r in rows if r["af"] in curvesOf), key=lambda r: r["af"] == bestLabel):
        curves, (color, linestyle) = curvesOf[row["af"]], styles[row["af"]]
        length = min(len(c) for c in curves)
        steps = curves[0][:length, 0]
        values = np.array([c[:length, 1] for c in curves])
        mean = values.mean(axis=0)
        se = values.std(axis=0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
        isBest = row["af"] == bestLabel
        label = f"{row['label']}: {formatMeanStd(row[metric], 4)}" + (" (best fixed AF)" if isBest else "")
        for ax in (axFull, axZoom):
            ax.fill_between(steps, mean - se, mean + se, color=color, alpha=0.18, linewidth=0,
                            zorder=3 if isBest else 1)
            ax.plot(steps, mean, color=color, linestyle=linestyle, linewidth=2.6 if isBest else 1.6,
                    marker="o" if length <= 30 else None, markersize=3, zorder=4 if isBest else 2,
                    label=label if ax is axFull else None)
        # The first evaluation (step 1, near log(vocab)) would squash everything else, so it sets no limits.
        later = mean[1:] if len(mean) > 2 else mean
        bounds["full"].append((later.min(), later.max()))
        tail = mean[steps >= zoomFrom]
        bounds["zoom"].append((tail.min(), tail.max()) if tail.size else (later.min(), later.max()))
    unit = {"loss": "loss (nats per token)", "bpb": "bits per byte"}[metric]
    for ax, key, name in ((axFull, "full", f"validation {METRICS[metric][4:]}"),
                          (axZoom, "zoom", f"validation {METRICS[metric][4:]}, last third of training")):
        if bounds[key]:
            low, high = min(b[0] for b in bounds[key]), max(b[1] for b in bounds[key])
            pad = 0.08 * (high - low) if high > low else 0.05
            ax.set_ylim(low - pad, high + pad)
        else:
            ax.text(0.5, 0.5, "no finished runs", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
    axZoom.set_xlim(zoomFrom - 0.02 * lastStep, lastStep * 1.02)
    if axFull.get_legend_handles_labels()[0]:
        longest = max(len(r["label"]) for r in rows if r["af"] in curvesOf)
        top.legend(loc="outside lower center", ncols=min(4 if longest < 28 else 3, len(curvesOf)), frameon=False,
                   title=f"final {METRICS[metric]} (mean ± std over seeds); lines: mean over seeds, bands: ± s.e.")
    fig.suptitle(title, fontweight="bold")
    atomicWrite(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# ----------------------------------------------------------------------------------------------
# Entry point


def raiseKeyboardInterrupt(signum, frame):
    raise KeyboardInterrupt


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
            import slurmJobs

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
