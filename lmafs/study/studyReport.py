"""A comparison's report: its rows summarised over seeds, the paired comparisons (against a baseline, chosen pairs)
with their statistics, the Markdown table compare-NAME.md and the plot compare-NAME.png."""
import shlex

import numpy as np

from lmafs.atomicFiles import atomicWrite
from lmafs.study.studyPlan import hasPhaseOne, isFixedAf, isSplineAf, corpusName, BEST_FIXED
from lmafs.study.studyStatistics import ALPHA, MAX_SEEDS, meanStd, pairedDifference, holmAdjusted


METRICS = {"loss": "val loss", "bpb": "val bpb"}


def formatMeanStd(values, digits):
    mean, std = meanStd(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def bestFixedRow(rows, args):
    """The label of the finished fixed-AF row with the lowest mean final validation value of --metric ('' when
    none finished)."""
    fixed = {entry["label"] for entry in args.entries if isFixedAf(entry["af"])}
    finished = [row for row in rows if row["af"] in fixed and row["nDone"] and row[args.metric] is not None]
    return min(finished, key=lambda row: float(np.mean(row[args.metric])))["af"] if finished else ""


def resolveBaseline(rows, args):
    """The baseline row's label: --baseline's, or for best-fixed bestFixedRow's."""
    return bestFixedRow(rows, args) if args.baseline == BEST_FIXED else args.baseline


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
