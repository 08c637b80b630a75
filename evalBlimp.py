"""Scores a trained model on BLiMP minimal pairs and reports its accuracy per set, per field and overall (printed, CSV, PNG).

    python evalBlimp.py --modelFile results/pt-RUN-step20000.pt --blimpDir blimp/data --limit 100
    python evalBlimp.py --modelFile results/pt-RUN-step20000.pt --blimpDir hf   # nyu-mll/blimp from the hub

A pair is right when the model gives the grammatical sentence the higher total log-probability; each
sentence is scored after <|endoftext|> (a document start, as in training), summing log p over its tokens.
The CSV (UID, field, linguistics_term, nPairs, accuracy as a fraction) and the bar chart are written next
to the model as blimp-RUN-stepNNNN[-modelK][-limitN].csv/.png.
"""
import argparse
import csv
import dataclasses
import glob
import json
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmafs.atomicFiles import atomicWrite
from lmafs.run.checkpoints import LoadError, addModelArguments, checkModelArguments, checkTokensFit, encodingOf, exitCode, loadModel
from lmafs.cliErrors import OneLineErrorParser
from lmafs.run.runSetup import pickDevice

HUB_DATASET = "nyu-mll/blimp"
REQUIRED_KEYS = ("sentence_good", "sentence_bad", "UID", "field", "linguistics_term")
CHANCE = 50.0


class BlimpError(Exception):
    """BLiMP data that cannot be read; the message is one line for the user."""


@dataclasses.dataclass
class BlimpSet:
    uid: str
    field: str
    linguisticsTerm: str
    pairs: list = dataclasses.field(default_factory=list)  # (sentence_good, sentence_bad)


# ----------------------------------------------------------------------------------------------
# Reading the pairs


def setsFromRecords(records, limit, sets=None):
    """Group (where, record) items into BlimpSets by UID, keeping at most limit pairs per set (None: all)."""
    sets = {} if sets is None else sets
    for where, record in records:
        if not isinstance(record, dict):
            raise BlimpError(f"{where}: expected a JSON object with {', '.join(REQUIRED_KEYS)}")
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise BlimpError(f"{where}: missing {', '.join(repr(key) for key in missing)} "
                             f"(a BLiMP record has {', '.join(REQUIRED_KEYS)})")
        if not all(isinstance(record[key], str) for key in REQUIRED_KEYS):
            raise BlimpError(f"{where}: {', '.join(REQUIRED_KEYS)} must all be strings")
        uid = record["UID"]
        blimpSet = sets.setdefault(uid, BlimpSet(uid, record["field"], record["linguistics_term"]))
        if limit is None or len(blimpSet.pairs) < limit:
            blimpSet.pairs.append((record["sentence_good"], record["sentence_bad"]))
    return sets


def jsonLines(path):
    """(where, record) for every non-blank line of a .jsonl file; where is 'path:line'."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise BlimpError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise BlimpError(f"{path} is not UTF-8 text; BLiMP files are .jsonl text") from None
    except OSError as err:
        raise BlimpError(f"cannot read {path} ({err.strerror})") from None


def readLocalSets(blimpDir, limit):
    """BLiMP sets from the .jsonl files (one per set) in blimpDir, sorted by field, then UID."""
    if not os.path.isdir(blimpDir):
        raise BlimpError(f"--blimpDir {blimpDir!r} is not a folder (give the folder of BLiMP .jsonl files, or 'hf')")
    paths = sorted(glob.glob(os.path.join(glob.escape(blimpDir), "*.jsonl")))
    if not paths:
        raise BlimpError(f"--blimpDir {blimpDir!r} holds no .jsonl files (BLiMP has one per set, e.g. "
                         "anaphor_gender_agreement.jsonl)")
    sets = {}
    for path in paths:
        setsFromRecords(jsonLines(path), limit, sets)
    if not sets:
        raise BlimpError(f"the .jsonl files in --blimpDir {blimpDir!r} hold no BLiMP pairs (all lines are blank)")
    return sortedSets(sets.values())


def readHubSets(limit):
    """BLiMP sets from the Hugging Face dataset nyu-mll/blimp (one config per set; needs the network)."""
    try:
        import datasets

        configs = datasets.get_dataset_config_names(HUB_DATASET)
        sets = {}
        for config in tqdm(configs, desc=f"reading {HUB_DATASET}", unit="set", disable=None):
            split = datasets.load_dataset(HUB_DATASET, config, split="train")
            setsFromRecords(((f"{HUB_DATASET}/{config} row {i}", row) for i, row in enumerate(split)), limit, sets)
    except BlimpError:
        raise
    except Exception as err:  # no network, hub or datasets errors: all mean "use local files"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BlimpError(f"cannot read {HUB_DATASET} from the Hugging Face hub ({reason}); download the BLiMP "
                         ".jsonl files and pass their folder as --blimpDir") from None
    return sortedSets(sets.values())


def sortedSets(sets):
    return sorted(sets, key=lambda s: (s.field, s.uid))


# ----------------------------------------------------------------------------------------------
# Scoring


def tokenizeSets(sets, encoding, vocabSize):
    """Token lists <|endoftext|> + sentence, good then bad for every pair, in set order."""
    prefix = [encoding.eot_token]
    sequences = []
    for blimpSet in sets:
        for good, bad in blimpSet.pairs:
            for sentence in (good, bad):
                tokens = prefix + encoding.encode_ordinary(sentence)
                checkTokensFit(tokens, vocabSize, f"BLiMP set {blimpSet.uid}, sentence {sentence!r}")
                sequences.append(tokens)
    return sequences


@torch.no_grad()
def sentenceLogProbs(model, sequences, batchSize, device):
    """Sum over positions t >= 1 of log p(token t | tokens before t), per sequence (float64 CPU tensor)."""
    # Sorted by length, so a batch pads little.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = torch.zeros(len(sequences), dtype=torch.float64)
    for start in tqdm(range(0, len(order), batchSize), desc="scoring", unit="batch", disable=None):
        rows = order[start:start + batchSize]
        length = max(len(sequences[i]) for i in rows)
        if length < 2:
            continue  # nothing to predict: the scores stay 0
        tokens = torch.zeros(len(rows), length, dtype=torch.int64)
        # Padding after a sentence's end cannot change earlier positions (the mask is causal); its
        # targets are ignore_index, so padded positions add nothing to the sums.
        targets = torch.full((len(rows), length - 1), -100, dtype=torch.int64)
        for row, i in enumerate(rows):
            sequence = torch.tensor(sequences[i], dtype=torch.int64)
            tokens[row, :len(sequence)] = sequence
            targets[row, :len(sequence) - 1] = sequence[1:]
        logits = model.logits(tokens[None].to(device))[0, :, :-1]
        negLogProbs = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.to(device).reshape(-1),
                                      ignore_index=-100, reduction="none")
        scores[rows] = -negLogProbs.view(len(rows), -1).sum(1).double().cpu()
    return scores


def pairsCorrect(scores):
    """Per pair (scores interleaved good, bad): whether the grammatical sentence scored strictly higher."""
    return (scores[0::2] > scores[1::2]).tolist()


# ----------------------------------------------------------------------------------------------
# Aggregation and reports


def aggregate(sets, correct):
    """Accuracies (in %) per set, per field and overall; correct holds one bool per pair, in set order."""
    setRows, position = [], 0
    for blimpSet in sets:
        flags = correct[position:position + len(blimpSet.pairs)]
        position += len(blimpSet.pairs)
        setRows.append({"UID": blimpSet.uid, "field": blimpSet.field, "linguistics_term": blimpSet.linguisticsTerm,
                        "nPairs": len(flags), "nCorrect": sum(flags)})
    fieldRows = {}
    for row in setRows:
        total = fieldRows.setdefault(row["field"], {"field": row["field"], "nPairs": 0, "nCorrect": 0, "nSets": 0})
        total["nPairs"] += row["nPairs"]
        total["nCorrect"] += row["nCorrect"]
        total["nSets"] += 1
    overall = {"nPairs": len(correct), "nCorrect": sum(correct), "nSets": len(setRows)}
    for row in setRows + list(fieldRows.values()) + [overall]:
        row["accuracy"] = 100.0 * row["nCorrect"] / row["nPairs"]
    return setRows, sorted(fieldRows.values(), key=lambda r: r["field"]), overall


def reportLines(setRows, fieldRows, overall):
    names = [f"{row['UID']} ({row['field']})" for row in setRows] + [f"field {row['field']}" for row in fieldRows]
    width = max(len(name) for name in names + ["overall"])
    lines = [f"{name:{width}s}   acc {row['accuracy']:5.1f}  ({row['nPairs']} pairs)"
             for name, row in zip(names, setRows)]
    lines.append("")
    lines += [f"{name:{width}s}   acc {row['accuracy']:5.1f}  ({row['nPairs']} pairs, {row['nSets']} sets)"
              for name, row in zip(names[len(setRows):], fieldRows)]
    lines.append(f"{'overall':{width}s}   acc {overall['accuracy']:5.1f}  "
                 f"({overall['nPairs']} pairs, {overall['nSets']} sets)")
    return lines


def writeCsv(path, setRows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["UID", "field", "linguistics_term", "nPairs", "accuracy"])
            for row in setRows:
                writer.writerow([row["UID"], row["field"], row["linguistics_term"], row["nPairs"],
                                 f"{row['accuracy'] / 100:.4f}"])

    atomicWrite(path, write)


def plotAccuracies(path, setRows, fieldRows, overall, title):
    """Horizontal bars of per-set accuracy, grouped and coloured by field, with the 50% chance line."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fieldNames = [row["field"] for row in fieldRows]
    palette = colormaps["tab10"]
    colorOf = {name: palette(i % palette.N) for i, name in enumerate(fieldNames)}
    # Sets top to bottom in report order, with a gap between fields so the groups read as blocks.
    positions, y, previousField = [], 0.0, None
    for row in setRows:
        if previousField is not None and row["field"] != previousField:
            y += 0.8
        positions.append(-y)
        y += 1.0
        previousField = row["field"]
    accuracies = [row["accuracy"] for row in setRows]

    fig = Figure(figsize=(10, 2.2 + 0.2 * y), layout="constrained")
    FigureCanvasAgg(fig)  # an explicit Agg canvas: no global (possibly GUI) backend gets selected
    ax = fig.subplots()
    ax.barh(positions, accuracies, height=0.8, color=[colorOf[row["field"]] for row in setRows])
    for position, accuracy in zip(positions, accuracies):
        ax.text(accuracy + 0.8, position, f"{accuracy:.1f}", va="center", fontsize=7)
    ax.axvline(CHANCE, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(positions, [row["UID"] for row in setRows], fontsize=8)
    ax.set_ylim(min(positions) - 0.7, 0.7)
    ax.set_xlim(0, 105)
    ax.set_xlabel("accuracy (%): grammatical sentence more probable")
    ax.tick_params(axis="x", labeltop=True, top=True)
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=colorOf[row["field"]], label=f"{row['field']}  {row['accuracy']:.1f}% "
                                                           f"({row['nSets']} sets)") for row in fieldRows]
    handles.append(ax.plot([], [], color="black", linestyle="--", linewidth=1, label=f"chance ({CHANCE:.0f}%)")[0])
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=9)
    fig.suptitle(f"BLiMP  {title}\noverall {overall['accuracy']:.1f}%  ({overall['nPairs']} pairs, "
                 f"{overall['nSets']} sets)", fontsize=11)
    atomicWrite(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def outputStem(modelFile, trained, limit):
    """blimp-RUN-stepNNNN[-modelK][-limitN] in the model's folder, so results of different runs never collide."""
    name = os.path.basename(modelFile)
    name = name[:-len(".pt")] if name.endswith(".pt") else name
    name = name[len("pt-"):] if name.startswith("pt-") else name
    stem = f"blimp-{name}"
    if trained.nModels > 1:
        stem += f"-model{trained.modelId}"
    if limit is not None:
        stem += f"-limit{limit}"
    return os.path.join(os.path.dirname(os.path.abspath(modelFile)), stem)


# ----------------------------------------------------------------------------------------------
# Command line


def parseArgs(argv):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    addModelArguments(parser)
    parser.add_argument("--blimpDir", required=True,
                        help="folder of BLiMP .jsonl files (one per set), or 'hf' for the hub dataset nyu-mll/blimp")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many pairs per set (default: all)")
    parser.add_argument("--batchSize", type=int, default=None,
                        help="sentences per forward pass (default: 256 on a GPU, 32 on the CPU)")
    args = parser.parse_args(argv)
    for name in ("limit", "batchSize"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    checkModelArguments(parser, args)
    return args


def evaluate(args):
    device = pickDevice(args.device)
    trained = loadModel(args.modelFile, args.modelId, device)
    print(trained.describe(args.modelFile) + f", device {device.type}")
    encoding, vocabLine = encodingOf(trained, args.vocab_file)
    print(vocabLine)
    sets = readHubSets(args.limit) if args.blimpDir == "hf" else readLocalSets(args.blimpDir, args.limit)
    nPairs = sum(len(s.pairs) for s in sets)
    print(f"BLiMP: {len(sets)} sets, {nPairs} pairs from {args.blimpDir}"
          + (f" (at most {args.limit} per set)" if args.limit is not None else ""))
    sequences = tokenizeSets(sets, encoding, trained.vocabSize)
    batchSize = args.batchSize or (256 if device.type == "cuda" else 32)
    scores = sentenceLogProbs(trained.model, sequences, batchSize, device)
    setRows, fieldRows, overall = aggregate(sets, pairsCorrect(scores))
    for line in reportLines(setRows, fieldRows, overall):
        print(line)
    stem = outputStem(args.modelFile, trained, args.limit)
    writeCsv(stem + ".csv", setRows)
    plotAccuracies(stem + ".png", setRows, fieldRows, overall,
                   f"{os.path.basename(args.modelFile)} (model {trained.modelId}, step {trained.step})")
    print(f"wrote {stem}.csv and {stem}.png")


def main(argv=None):
    args = parseArgs(argv)
    return exitCode(lambda: evaluate(args), (LoadError, BlimpError, OSError))


if __name__ == "__main__":
    sys.exit(main())
