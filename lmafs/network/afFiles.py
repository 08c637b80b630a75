"""Learned-AF files (ptAf-RUN-stepNNNN.pt and .csv): writing them from a model, and loading them into a model for
phase II. Reading them safely (readAfFile, safeTorchLoad, AfFileError) lives in activationFunctions, whose
replaceActivations reads them too; the names are importable from here as well.

The .pt file is a plain dict of tensors, strings and numbers (loaded with weights_only=True, so a
shared file cannot run code): the hyperparameters, the knots, and the MLP and attention spline values
of every layer (values shared across layers are repeated per layer); with a learned attention-score
spline (afType ...;score-spline) also its own knots ('scoreKnots', on [-sqrt(headDim), sqrt(headDim)])
and values per layer ('scoreValues'). The .csv file has, for every spline (MLP layers, then attention
layers, then score layers; per-channel splines one row per channel), a line of knots and a line of
values, as published by the original authors (whose files have no score rows).
"""
import csv
import itertools

import torch

from activationFunctions import FORMAT, SPLINE_TYPES, AfFileError, readAfFile
from lmafs.atomicFiles import atomicWrite


def perLayerValues(model, kind):
    """Values of every layer's spline of one kind ('mlp'/'att'/'score'), float32 CPU tensors; [] if that AF is not a
    spline."""
    name = {"mlp": model.afMlpName, "att": model.afAttName, "score": model.afScoreName}[kind]
    if name not in SPLINE_TYPES:
        return []
    getAf = {"mlp": model.mlpAf, "att": model.attAf, "score": model.scoreAf}[kind]
    return [getAf(layer).values.detach().float().cpu().clone() for layer in range(model.nLayers)]


def splineKnots(model):
    for afs in (model.mlpAfs, model.attAfs):
        for af in afs:
            if hasattr(af, "knots"):
                return af.knots.detach().float().cpu().clone()
    return None


def scoreSplineKnots(model):
    """The knots of the attention-score splines (their own range), or None without them."""
    return model.scoreAfs[0].knots.detach().float().cpu().clone() if len(model.scoreAfs) else None


def afFileDict(model, hyperparameters, step):
    return {
        "format": FORMAT,
        "hyperparameters": dict(hyperparameters),
        "step": int(step),
        "nLayers": model.nLayers,
        "afTypeMlp": model.afMlpName,
        "afTypeAtt": model.afAttName,
        "knots": splineKnots(model),
        "mlpValues": perLayerValues(model, "mlp"),
        "attValues": perLayerValues(model, "att"),
        "afTypeScore": model.afScoreName,
        "scoreKnots": scoreSplineKnots(model),
        "scoreValues": perLayerValues(model, "score"),
    }


def saveAfFiles(stem, model, hyperparameters, step):
    """Write stem.pt and stem.csv; returns the two paths."""
    data = afFileDict(model, hyperparameters, step)
    atomicWrite(stem + ".pt", lambda tmp: torch.save(data, tmp))

    def writeCsv(tmp):
        import numpy as np  # only writing needs numpy: the installed package (pip install .) reads files with torch alone

        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")  # the original's line endings, so files compare byte for byte
            for knots, allValues in ((data["knots"], data["mlpValues"] + data["attValues"]),
                                     (data["scoreKnots"], data["scoreValues"])):
                for values in allValues:
                    knotsRow = [repr(float(k)) for k in knots.tolist()]
                    for row in values.reshape(-1, values.shape[-1]).numpy():
                        writer.writerow(knotsRow)
                        writer.writerow([str(v) for v in row.astype(np.float32)])

    atomicWrite(stem + ".csv", writeCsv)
    return stem + ".pt", stem + ".csv"


def splitCsvRows(rows, rowKnots, path, nLayers, afMlp, afAtt, afScore, channelsMlp, channelsAtt):
    """Assign a CSV's spline rows to MLP, attention and score layers as the requested afType expects them; returns
    {'mlpValues', 'attValues', 'scoreValues', 'knots', 'scoreKnots', 'attentionIgnored'}. MLP and attention rows
    must share one set of knots, score rows another."""

    def rowsPerLayer(name, channels):
        return 0 if name not in SPLINE_TYPES else channels if name == "splinePerDim" else 1

    def perLayer(start, perLayerCount):
        layers = [rows[start + i * perLayerCount:start + (i + 1) * perLayerCount] for i in range(nLayers)]
        return [layer[0] if perLayerCount == 1 else torch.stack(layer) for layer in layers]

    perMlp, perAtt, perScore = rowsPerLayer(afMlp, channelsMlp), rowsPerLayer(afAtt, channelsAtt), \
        rowsPerLayer(afScore, 1)
    nMlp, nAtt, nScore = nLayers * perMlp, nLayers * perAtt, nLayers * perScore
    kinds = [name for name in (afMlp, afAtt, afScore) if name in SPLINE_TYPES]
    attentionIgnored = False
    if len(rows) == len(kinds) and all(name == "spline" for name in kinds):
        # one spline per kind, shared by all layers: the loader copies it into every layer
        counts = (int(afMlp == "spline"), int(afAtt == "spline"), int(afScore == "spline"))
    else:
        # A file from an MLP+attention run may feed an MLP-only phase II: one attention spline per layer follows.
        attentionIgnored = nAtt == 0 and nScore == 0 and len(rows) == nMlp + nLayers
        if len(rows) != nMlp + nAtt + nScore and not attentionIgnored:
            raise AfFileError(f"afFileToLoad {path!r} holds {len(rows)} splines, but --afType "
                              f"'{afMlp};att-{afAtt};score-{afScore}' with {nLayers} layers needs "
                              f"{nMlp + nAtt + nScore} (MLP layers first, then attention, then score layers)")
        counts = (nMlp, nAtt, nScore)
    ends = list(itertools.accumulate(counts))
    groups = [range(end - count, end) for count, end in zip(counts, ends)]
    for group in (list(groups[0]) + list(groups[1]), list(groups[2])):
        for i in group[1:]:
            if not torch.allclose(rowKnots[i], rowKnots[group[0]]):
                raise AfFileError(f"afFileToLoad {path!r}: line {2 * i + 1} has other knots than line "
                                  f"{2 * group[0] + 1} (the MLP and attention splines must use the same knots, and "
                                  "so must the score splines)")

    def values(kindIndex, perLayerCount):
        if not counts[kindIndex]:
            return []
        start = ends[kindIndex] - counts[kindIndex]
        return rows[start:start + 1] if counts[kindIndex] == 1 else perLayer(start, perLayerCount)

    shared = list(groups[0]) + list(groups[1])
    return {"mlpValues": values(0, perMlp), "attValues": values(1, perAtt), "scoreValues": values(2, perScore),
            "knots": rowKnots[shared[0]] if shared else None,
            "scoreKnots": rowKnots[groups[2][0]] if counts[2] else None, "attentionIgnored": attentionIgnored}


# ----------------------------------------------------------------------------------------------
# Loading into a model (phase II)


def loadAfsIntoModel(model, path, freeze):
    """Copy the splines of a ptAf file into the model's AF modules; returns lines to print.

    Raises AfFileError on any mismatch (depth, AF type, per-channel shape, values that differ across
    layers the model shares one AF between, attention or score AFs missing)."""
    data = readAfFile(path)
    afMlp, afAtt, afScore, nLayers = model.afMlpName, model.afAttName, model.afScoreName, model.nLayers
    if afMlp not in SPLINE_TYPES and afAtt not in SPLINE_TYPES and afScore != "spline":
        raise AfFileError(f"--afFileToLoad needs a spline afType (spline or splinePerDim, or score-spline), got "
                          f"'{afMlp};att-{afAtt};score-{afScore}'")
    notes = []
    if data["rows"] is not None:
        channelsMlp = model.mlpAfs[0].channels if afMlp == "splinePerDim" else 1
        channelsAtt = model.attAfs[0].channels if afAtt == "splinePerDim" else 1
        split = splitCsvRows(data["rows"], data["rowKnots"], path, nLayers, afMlp, afAtt, afScore, channelsMlp,
                             channelsAtt)
        mlpValues, attValues, scoreValues = split["mlpValues"], split["attValues"], split["scoreValues"]
        knots, scoreKnots = split["knots"], split["scoreKnots"]
        if split["attentionIgnored"]:
            notes.append("the file's attention AFs are not used (the attention AF is not a spline)")
    else:
        if data["nLayers"] != nLayers:
            raise AfFileError(f"afFileToLoad {path!r} comes from a model with {data['nLayers']} layers, "
                              f"this one has --nLayers {nLayers}")
        for kind, wanted, have in (("MLP", afMlp, data["afTypeMlp"]), ("attention", afAtt, data["afTypeAtt"]),
                                   ("attention-score", afScore, data["afTypeScore"])):
            if wanted in SPLINE_TYPES and have != wanted:
                raise AfFileError(f"afFileToLoad {path!r} holds '{have}' {kind} AFs, but --afType asks for '{wanted}'"
                                  + (" (a file from a run without score-spline)" if kind == "attention-score" else ""))
            if wanted not in SPLINE_TYPES and have in SPLINE_TYPES:
                notes.append(f"the file's {kind} AFs are not used (the {kind} AF is '{wanted}', not a spline)")
        mlpValues = data["mlpValues"] if afMlp in SPLINE_TYPES else []
        attValues = data["attValues"] if afAtt in SPLINE_TYPES else []
        scoreValues = data["scoreValues"] if afScore == "spline" else []
        knots, scoreKnots = data["knots"], data["scoreKnots"]
    for kind, values, kindKnots, modules, layerIndex in (
            ("MLP", mlpValues, knots, model.mlpAfs, model.mlpAfIndex),
            ("attention", attValues, knots, model.attAfs, model.attAfIndex),
            ("attention-score", scoreValues, scoreKnots, model.scoreAfs, model.scoreAfIndex)):
        if not values:
            continue
        if len(values) == 1:  # one spline shared by all layers, stored once
            values = values * nLayers
        if len(values) != nLayers:
            raise AfFileError(f"afFileToLoad {path!r} holds {len(values)} {kind} AFs for a model with --nLayers {nLayers}")
        for moduleIndex, module in enumerate(modules):
            layers = [layer for layer, m in enumerate(layerIndex) if m == moduleIndex]
            first = values[layers[0]]
            for layer in layers[1:]:
                if not torch.equal(values[layer], first):
                    raise AfFileError(f"afFileToLoad {path!r}: the {kind} AFs of layers {layers[0]} and {layer} differ, "
                                      "but this model shares one AF between them; use --afLayerSpecific 1")
            try:
                module.loadValues(first, kindKnots, freeze=freeze)
            except ValueError as err:
                raise AfFileError(f"afFileToLoad {path!r}: {kind} AF of layer {layers[0]}: {err}") from None
    state = "frozen" if freeze else "fine-tuned"
    if mlpValues or attValues:
        notes.append(f"loaded AFs from {path}: {knots.numel()} knots in [{float(knots[0]):g}, {float(knots[-1]):g}], "
                     f"{state}")
    if scoreValues:
        bound = model.kernel.headDim ** 0.5
        notes.append(f"loaded attention-score splines from {path}: {scoreKnots.numel()} knots in "
                     f"[{float(scoreKnots[0]):g}, {float(scoreKnots[-1]):g}], {state}"
                     + ("" if abs(float(scoreKnots[-1]) - bound) < 1e-4 * bound else
                        f"; this model's scores span ±{bound:g} (sqrt of its head size)"))
    return notes
