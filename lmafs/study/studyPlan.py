"""A comparison's plan: its rows (an afType, or a --variant with flags of its own: a frozen-init control, a loaded
AF file, a phase I of its own size or corpus), the trainLmAf.py runs they make (phase I on seeds of its own, phase II
after it), and every check made before anything trains (flags, phase-I seeds and corpora, loaded files, runs an
earlier study left in the folder); reading a finished run back from its files."""
import csv
import dataclasses
import os
import re
import shlex

import torch

import trainLmAf
from activationFunctions import LEARNABLE_TYPES, MLP_INPUT_TYPES, SPLINE_TYPES, AfFileError
from lmafs.data import vocabulary
from lmafs.data.tokenShards import ShardError, listShards
from lmafs.network.afFiles import loadAfsIntoModel
from lmafs.run import flagChecks, runPlan, runSetup
from lmafs.run.runFiles import RunFiles
from lmafs.run.runOutputs import originalValueText
from plotting import parseLog


# Flags the comparison sets per run; given by the user they would make the runs differ or collide.
PER_RUN_FLAGS = ("afType", "seed", "runName", "resumeFrom")


# Flags of compareAfs.py that a variant may give too (for its own phase I); the trainer never sees them.
PHASE1_DATA_FLAGS = ("phase1FilesTokensTr", "phase1FilesTokensVa")


# --baseline's word for the fixed-AF row (nothing learned in its AFs) with the lowest mean final validation value.
BEST_FIXED = "best-fixed"


SEED_FIELD = "{seed}"  # in a loaded row's --afFileToLoad: replaced by each seed


class CompareError(Exception):
    """Bad comparison flags; the message is one line for the user."""


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
