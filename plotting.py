"""Plots of training curves, learned spline AFs and activation magnitudes; the one reader of training logs (parseLog:
ours or the original code's, same progress lines: the history to plot and what the header says), and overlaying
several runs' validation curves in one figure."""

import argparse
import math
import os
import sys

import numpy as np

from lmafs.run import logLines
from lmafs.atomicFiles import atomicWrite

# Above this many models, one legend row per model is unreadable, so the colour is explained by a colorbar instead.
maxLegendModels = 6
valColor = "blue"


def _atomicSave(fig, path):
    """Render fig as PNG (atomicFiles: readers never see a half-written file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # An explicit Agg canvas renders files without ever selecting a global (possibly GUI) backend.
    FigureCanvasAgg(fig)
    atomicWrite(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _makeFigure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _noData(ax, text):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")


def _trainingFigure(history, plotMinLoss, plotMaxLoss, plotMinAcc, plotMaxAcc, title, newFigure):
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = newFigure((13, 5.2))
    axLoss, axAcc = fig.subplots(1, 2)
    byModel = {}
    for step, modelIndex, loss, acc in history.get("train", []):
        byModel.setdefault(int(modelIndex), []).append((step, loss, acc))
    val = list(history.get("val", []))
    nModels = max(byModel) + 1 if byModel else 0
    # A sub-range of plasma avoids both black (model 0) and blue (validation), so those two stay distinct.
    otherColors = colormaps["plasma"](np.linspace(0.3, 0.85, max(nModels - 1, 1)))
    manyModels = nModels > maxLegendModels

    handles = []
    # Draw the other models first so model 0 and validation end up on top.
    for modelIndex in sorted(byModel, key=lambda i: (i == 0, i)):
        steps, losses, accs = map(np.asarray, zip(*sorted(byModel[modelIndex])))
        if modelIndex == 0:
            style = dict(color="black", linewidth=2.2, zorder=3)
        else:
            style = dict(color=otherColors[modelIndex - 1], linewidth=0.9, alpha=0.85, zorder=2)
        # A single logged point is otherwise invisible as a line.
        marker = "o" if len(steps) == 1 else None
        label = f"train model {modelIndex}"
        line, = axLoss.plot(steps, losses, marker=marker, label=label, **style)
        axAcc.plot(steps, accs, marker=marker, label=label, **style)
        if modelIndex == 0 or not manyModels:
            handles.append(line)
    handles.sort(key=lambda h: int(h.get_label().rsplit(" ", 1)[1]))
    if val:
        steps, losses, accs = map(np.asarray, zip(*sorted(val)))
        style = dict(color=valColor, marker="o", markersize=3.5, linewidth=1.4, zorder=4, label="val (model 0)")
        handles.append(axLoss.plot(steps, losses, **style)[0])
        axAcc.plot(steps, accs, **style)

    axLoss.set_ylim(plotMinLoss, plotMaxLoss)
    axAcc.set_ylim(plotMinAcc, plotMaxAcc)
    axAcc.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    for ax, name in ((axLoss, "loss"), (axAcc, "token accuracy")):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if not handles:
            _noData(ax, "no data")

    if manyModels:
        # Discrete colorbar: one colour band per model index 1..N-1, matching the thin curves exactly.
        norm = BoundaryNorm(np.arange(0.5, nModels), nModels - 1)
        colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=ListedColormap(otherColors)),
                                ax=[axLoss, axAcc], fraction=0.03, pad=0.01)
        colorbar.set_label("train model index")
        colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        handles.insert(1, Line2D([], [], color=otherColors[len(otherColors) // 2], linewidth=0.9,
                                 label=f"train models 1–{nModels - 1} (colorbar)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), frameon=False)
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


def plotTraining(path, history, plotMinLoss=3.0, plotMaxLoss=15.0, plotMinAcc=0.0, plotMaxAcc=0.4, title=""):
    """Loss and token-accuracy panels over steps: one curve per trained model plus validation of model 0."""
    fig = _trainingFigure(history, plotMinLoss, plotMaxLoss, plotMinAcc, plotMaxAcc, title, _makeFigure)
    _atomicSave(fig, path)


def _afGridColumns(afs):
    nMlp = sum(1 for af in afs if af["name"].lower().startswith("mlp"))
    # One MLP row keeps MLP and attention AFs of the same layer vertically aligned; otherwise fall back to 4 wide.
    if 2 <= nMlp <= 8:
        return nMlp
    return max(1, min(len(afs), 4))


def inputRange(inputs, low=0.001, high=0.999):
    """The low and high quantiles (default 0.1% and 99.9%) of the AF inputs, read off their histogram with the
    inputs spread evenly within each bin; None without inputs."""
    edges, counts = np.asarray(inputs["edges"], dtype=float), np.asarray(inputs["histogram"], dtype=float)
    if counts.sum() <= 0:
        return None
    cdf = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    return _quantile(cdf, edges, low), _quantile(cdf, edges, high)


def _quantile(cdf, edges, q):
    """x where the piecewise-linear cdf first reaches q (empty bins keep it flat, so np.interp would not do)."""
    k = min(max(int(np.searchsorted(cdf, q, side="left")), 1), len(cdf) - 1)
    return float(edges[k - 1] + (q - cdf[k - 1]) / (cdf[k] - cdf[k - 1]) * (edges[k] - edges[k - 1]))


def zoomWindow(af):
    """The x-range a tile zooms to: where the AF's inputs lie (0.1 to 99.9 percentiles, padded by 5%), or None when
    the inputs are unknown or fill most of the drawn range anyway."""
    inputs = af.get("inputs")
    window = inputRange(inputs) if inputs is not None else None
    if window is None:
        return None
    knots = np.asarray(af["knots"], dtype=float)
    drawn = 1.2 * (knots[-1] - knots[0])  # _drawAf shows 10% constant extrapolation on each side
    low, high = window
    # at least two histogram bins wide, so a spike of identical inputs still gets a readable window
    width = max(high - low, 2 * float(np.diff(inputs["edges"]).max()))
    centre = (low + high) / 2
    low, high = centre - 0.55 * width, centre + 0.55 * width
    return (low, high) if high - low < 0.6 * drawn else None


def _afsFigure(afs, title, newFigure, zoom=False):
    ncols = _afGridColumns(afs)
    nrows = max(1, math.ceil(len(afs) / ncols))
    withInputs = any(af.get("inputs") is not None for af in afs)
    fig = newFigure((3.2 * ncols + 0.4, (3.7 if withInputs else 2.9) * nrows + (0.4 if title else 0.0)))
    # each tile: the AF on top and, when known, a strip below with where its inputs lie (same x-axis)
    grid = fig.add_gridspec(2 * nrows if withInputs else nrows, ncols,
                            height_ratios=[3, 1] * nrows if withInputs else None)
    for index, af in enumerate(afs):
        row, col = divmod(index, ncols)
        ax = fig.add_subplot(grid[2 * row if withInputs else row, col])
        _drawAf(ax, af, zoomWindow(af) if zoom else None)
        if withInputs:
            strip = fig.add_subplot(grid[2 * row + 1, col], sharex=ax)
            _drawInputs(strip, af.get("inputs"), af.get("inputsNote", "inputs not measured yet"))
            ax.tick_params(labelbottom=False)
            ax.set_xlabel("")
    if not afs:
        _noData(fig.add_subplot(grid[0, 0]), "no AFs")
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


# Where a zoomed tile's full-range inset may go (axes fractions), leaving room for its own tick labels.
INSET_BOUNDS = {"upper left": [0.13, 0.57, 0.34, 0.38], "upper right": [0.62, 0.57, 0.34, 0.38],
                "lower left": [0.13, 0.1, 0.34, 0.38], "lower right": [0.62, 0.1, 0.34, 0.38],
                "center left": [0.13, 0.33, 0.34, 0.38], "center right": [0.62, 0.33, 0.34, 0.38]}


def _insetAndLegendCorners(lines, xs, window, yLimits):
    """(inset corner, legend corner): of the tile's corners and side middles, the one the curves cross least for
    the inset, and the next emptiest one that does not overlap it for the legend."""
    grid = np.linspace(window[0], window[1], 400)
    u = (grid - window[0]) / (window[1] - window[0])
    points = [(u, (np.interp(grid, xs, line) - yLimits[0]) / (yLimits[1] - yLimits[0])) for line in lines]

    def crossed(corner):
        x0, y0, width, height = INSET_BOUNDS[corner]
        return sum(int(np.sum((px > x0 - 0.1) & (px < x0 + width) & (py > y0 - 0.05) & (py < y0 + height + 0.05)))
                   for px, py in points)

    def overlap(a, b):
        (ax0, ay0, aw, ah), (bx0, by0, bw, bh) = INSET_BOUNDS[a], INSET_BOUNDS[b]
        return ax0 < bx0 + bw and bx0 < ax0 + aw and ay0 < by0 + bh and by0 < ay0 + ah

    emptiest = sorted(INSET_BOUNDS, key=crossed)  # a stable sort: ties keep the upper left first
    return emptiest[0], next(corner for corner in emptiest[1:] if not overlap(corner, emptiest[0]))


def _drawAf(ax, af, window=None):
    """The AF's tile; with window (x-low, x-high), the tile spans that window, its y-range the curve's within it,
    and an inset draws the whole curve with the window shaded."""
    knots = np.asarray(af["knots"], dtype=float)
    values = np.asarray(af["values"], dtype=float)
    channels = values.reshape(-1, values.shape[-1])
    # A sampled curve ("curve": True, a non-spline AF) has no knots to mark and is not constant outside its grid.
    curve = af.get("curve", False)
    # Constant extrapolation outside the knot range is part of the AF's behaviour, so show a bit of it.
    margin = 0.1 * (knots[-1] - knots[0]) if len(knots) > 1 else 1.0
    xs = knots if curve else np.concatenate([[knots[0] - margin], knots, [knots[-1] + margin]])
    extended = channels if curve else np.concatenate([channels[:, :1], channels, channels[:, -1:]], axis=1)
    if values.ndim > 1:
        # Fade individual channels more as there are more of them, so the spread stays visible without a solid blob.
        alpha = float(np.clip(6.0 / len(channels), 0.04, 0.35))
        ax.plot(xs, extended.T, color="tab:blue", linewidth=0.6, alpha=alpha)
    mean = extended.mean(axis=0)
    start = None if curve or af.get("start") is None else \
        np.asarray(af["start"], dtype=float).reshape(-1, values.shape[-1]).mean(axis=0)
    if start is not None:  # the spline at step 0, under the current one
        start = np.concatenate([start[:1], start, start[-1:]])
        ax.plot(xs, start, color="tab:green", linestyle="-.", linewidth=1.2, label="step 0")
    ax.plot(xs, mean, color="navy", linewidth=2.0 if values.ndim > 1 else 1.6,
            label="now" if start is not None else None)
    if not curve:
        ax.plot(knots, mean[1:-1], linestyle="none", marker="o", markersize=2.2, color="navy")
    legendCorner = "upper left"
    if window is not None:
        # piecewise linear: the curves' extremes within the window lie at knots inside it or at its ends
        inside = np.concatenate([[window[0]], xs[(xs > window[0]) & (xs < window[1])], [window[1]]])
        lines = list(extended) + ([start] if start is not None else [])
        ys = [np.interp(inside, xs, line) for line in lines]
        low, high = float(np.min(ys)), float(np.max(ys))
        pad = 0.08 * (high - low) if high > low else max(0.5, 0.1 * abs(high))
        yLimits = (low - pad, high + pad)
        insetCorner, legendCorner = _insetAndLegendCorners(lines, xs, window, yLimits)
    if start is not None:
        ax.legend(fontsize=7, loc=legendCorner, frameon=False)
    # axline does not take part in autoscaling, so the spline, not the identity, sets the y-range.
    ax.axline((0.0, 0.0), slope=1.0, color="grey", linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_xlim(xs[0], xs[-1])
    title = af["name"] + (f"  ({len(channels)} ch)" if values.ndim > 1 else "")
    if window is not None:
        ax.set_xlim(*window)
        ax.set_ylim(*yLimits)
        title += "  (inputs' 0.1–99.9%)"
        inset = ax.inset_axes(INSET_BOUNDS[insetCorner])
        inset.plot(xs, mean, color="navy", linewidth=1.0)
        if start is not None:
            inset.plot(xs, start, color="tab:green", linestyle="-.", linewidth=0.8)
        inset.axvspan(*window, color="tab:orange", alpha=0.25, linewidth=0)
        inset.set_xlim(xs[0], xs[-1])
        inset.tick_params(labelsize=5.5, length=2, pad=1)
        inset.set_title("full range", fontsize=6, pad=2)
        inset.set_facecolor("white")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("input")
    ax.set_ylabel("output")
    ax.grid(True, alpha=0.3)


def _drawInputs(ax, inputs, note="inputs not measured yet"):
    """Where the AF's inputs lie: their histogram (log counts), the knot range, and the share outside it; without
    a histogram, the note."""
    ax.set_xlabel("input")
    if inputs is None:
        ax.set_yticks([])
        _noData(ax, note)
        return
    edges, counts = np.asarray(inputs["edges"], dtype=float), np.asarray(inputs["histogram"], dtype=float)
    ax.stairs(counts, edges, fill=True, color="tab:orange", alpha=0.7)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(0, max(counts.max(), 1.0) * 2)
    # The scale brings a label per decade, which a strip this low cannot hold; the shape is what matters.
    ax.set_yticks([])
    ax.set_yticks([], minor=True)
    for x in (-inputs["range"], inputs["range"]):
        ax.axvline(x, color="grey", linestyle=":", linewidth=1.0)
    share = 100 * inputs["outside"]
    ax.text(0.99, 0.92, f"{share:.2f}% outside ±{inputs['range']:g}", transform=ax.transAxes, ha="right", va="top",
            fontsize=8, color="firebrick" if share > 1 else "dimgrey",
            bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.8))
    ax.set_ylabel(f"inputs\nstep {inputs['step']}", fontsize=7)


def plotAfs(path, afs, title="", zoom=False):
    """Grid of learned AFs, one tile per AF (per-channel ones drawn thin around their mean); each af is
    {'name', 'knots', 'values'} for a spline (and 'start': its values at step 0, drawn dash-dotted), plus 'curve':
    True for another AF sampled on a grid, and 'inputs':
    {'edges', 'histogram', 'outside', 'range', 'step'} to draw where its inputs lie in a strip below it ('inputsNote':
    the text of that strip when it has no histogram). zoom: a tile whose inputs lie in a narrow part of the knot
    range spans just that part (their 0.1 to 99.9 percentiles), with the whole curve in an inset."""
    _atomicSave(_afsFigure(afs, title, _makeFigure, zoom), path)


def _overlayFigure(runs, title, newFigure):
    """Top row: the whole curves; bottom row: the second half of training, where runs differ by a few hundredths
    of a nat that the first steps' 10-nat fall would hide."""
    from matplotlib import colormaps
    from matplotlib.ticker import PercentFormatter

    fig = newFigure((13, 9))
    (axLoss, axAcc), (zoomLoss, zoomAcc) = fig.subplots(2, 2)
    colors = colormaps["tab10"](np.arange(max(len(runs), 1)) % 10)
    curves = []
    for (label, history), color in zip(runs, colors):
        points = sorted(history.get("val", []))
        style = dict(color=color, linewidth=1.6, marker="o", markersize=3)
        if not points:  # a run logged without validation still shows up, by model 0's training curve
            points = sorted((step, loss, acc) for step, model, loss, acc in history.get("train", []) if model == 0)
            style.update(linestyle="--", marker=None)
            label += " (train, no validation)"
        if points:
            curves.append((label, np.asarray(points, dtype=float), style))
    lastStep = max((c[1][-1, 0] for c in curves), default=0.0)
    for label, points, style in curves:
        steps, losses, accs = points.T
        late = steps >= 0.5 * lastStep
        axLoss.plot(steps, losses, label=label, **style)
        axAcc.plot(steps, accs, label=label, **style)
        zoomLoss.plot(steps[late], losses[late], label=label, **style)
        zoomAcc.plot(steps[late], accs[late], label=label, **style)
    for ax in (axAcc, zoomAcc):
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=1))
    for ax, name in ((axLoss, "validation loss"), (axAcc, "validation token accuracy"),
                     (zoomLoss, "validation loss, second half"), (zoomAcc, "validation token accuracy, second half")):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(name.split(",")[0])
        ax.grid(True, alpha=0.3)
        if not curves:
            _noData(ax, "no validation or training lines in these logs")
    if curves:
        axLoss.legend(fontsize=9)
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


def plotRunOverlay(path, runs, title=""):
    """Validation loss and accuracy against steps, one labelled curve per run; runs = [(label, history)]."""
    _atomicSave(_overlayFigure(runs, title, _makeFigure), path)


def runLabels(logPaths):
    """A label per log: its run name, or, where two logs share a run name, its path relative to their common folder."""
    names = [runName(p) for p in logPaths]
    if len(set(names)) == len(names):
        return names
    absolute = [os.path.abspath(p) for p in logPaths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [os.path.join(os.path.relpath(os.path.dirname(p), common), name).removeprefix("." + os.sep)
            for p, name in zip(absolute, names)]


def _spreadLabels(positions, high, gap):
    """Shift sorted label positions apart by at least gap, pushing back down if the top label passes high."""
    spread = list(positions)
    for i in range(1, len(spread)):
        spread[i] = max(spread[i], spread[i - 1] + gap)
    if spread and spread[-1] > high:
        spread[-1] = high
        for i in range(len(spread) - 2, -1, -1):
            spread[i] = min(spread[i], spread[i + 1] - gap)
    return spread


def _activationsFigure(history, layerNames, newFigure):
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig = newFigure((11, 5.5))
    ax = fig.add_subplot()
    series = []
    for key, cmapName, kind in (("actMean", "Blues", "mean"), ("actMax", "Reds", "max")):
        records = sorted(history.get(key, []), key=lambda r: r[0])
        if not records:
            continue
        steps = np.array([r[0] for r in records], dtype=float)
        nSites = min(len(r[1]) for r in records)
        table = np.array([list(r[1])[:nSites] for r in records], dtype=float)
        # Darkest shade for the first site so the thick reference line is also the most prominent.
        colors = colormaps[cmapName](np.linspace(0.95, 0.45, max(nSites, 1)))
        for site in range(nSites):
            name = layerNames[site] if site < len(layerNames) else f"site {site}"
            series.append((steps, table[:, site], colors[site], site == 0, f"{name} {kind}"))

    positive = np.concatenate([v[v > 0] for _, v, *_ in series]) if series else np.array([])
    if positive.size == 0:
        _noData(ax, "no activation data")
    else:
        for steps, values, color, first, label in series:
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, values, color=color, linewidth=2.4 if first else 1.1, marker=marker, markersize=3,
                    label=label, zorder=3 if first else 2)
        ax.set_yscale("log", nonpositive="mask")
        # Magnitudes often span only one or two decades, where decade-only ticks would leave the axis nearly unlabelled.
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        low, high = positive.min() / 1.3, positive.max() * 1.3
        ax.set_ylim(low, high)
        allSteps = np.concatenate([s for s, *_ in series])
        ax.set_xlim(allSteps.min(), allSteps.max() if allSteps.max() > allSteps.min() else allSteps.min() + 1)
        _labelLineEnds(ax, series, math.log10(low), math.log10(high))
        ax.legend(handles=[Line2D([], [], color=colormaps["Blues"](0.8), label="mean |x|"),
                           Line2D([], [], color=colormaps["Reds"](0.8), label="max |x|"),
                           Line2D([], [], color="grey", linewidth=2.4, label="first site (thick)")],
                  loc="upper left", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("|activation|")
    ax.set_title("activation magnitude before each AF site")
    ax.grid(True, which="major", alpha=0.3)
    return fig


def _labelLineEnds(ax, series, logLow, logHigh):
    """Name each line at the right margin, de-overlapped, with a thin leader to where the line actually ends."""
    ends = []
    for steps, values, color, _, label in series:
        finite = np.flatnonzero(np.isfinite(values) & (values > 0))
        if finite.size:
            ends.append((math.log10(values[finite[-1]]), steps[finite[-1]], color, label))
    ends.sort(key=lambda e: e[0])
    span = logHigh - logLow
    gap = min(0.045 * span, span / max(len(ends), 1))
    placed = _spreadLabels([e[0] for e in ends], logHigh, gap)
    fontsize = 8 if len(ends) <= 24 else 6
    for (logY, step, color, label), labelLogY in zip(ends, placed):
        ax.annotate(label, xy=(step, 10 ** logY), xytext=(1.015, 10 ** labelLogY),
                    textcoords=ax.get_yaxis_transform(), va="center", fontsize=fontsize, color=color,
                    annotation_clip=False, arrowprops=dict(arrowstyle="-", color=color, linewidth=0.5, alpha=0.6))


def plotActivations(path, history, layerNames):
    """Mean (blue) and max (red) |x| before each AF site over steps, log scale, lines named at their right end."""
    _atomicSave(_activationsFigure(history, layerNames, _makeFigure), path)


def parseLog(path):
    """Rebuild a history from a training log (ours or the original code's): {'train': [(step, model, loss, acc)],
    'val': [(step, loss, acc)], 'actMean'/'actMax': [(step, values per site)]} (accuracy back to fractions), as
    plotTraining and plotActivations take it, and what the header and the other progress lines say:
    'secondsPerStep': [(step, model 0's s/step)], 'peakMemory': [(step, GB)], 'hyperparameters': {name: text},
    'parameters': {tensor: count}, 'parametersTotal', 'vocabSize', 'modelsPerPass' (None where not logged),
    'kernels' (the kernel lines of the header) and 'fallbacks' (FlexAttention's switch to SDPA)."""
    # Keyed by (step, model) because model 0's summary line and a per-model line for model 0 describe the same point.
    # A log can hold a run started again from scratch after a crash (the original's logs do): later lines win.
    train, val, seconds, peaks = {}, {}, {}, {}
    history = {"actMean": [], "actMax": [], "hyperparameters": {}, "parameters": {}, "parametersTotal": None,
               "vocabSize": None, "modelsPerPass": None, "kernels": [], "fallbacks": []}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if found := logLines.VALIDATION.parse(line):
                val[found["step"]] = (found["loss"], found["accuracy"] / 100.0)
            elif found := logLines.MODEL_TRAINING.parse(line):
                train[(found["step"], found["model"])] = (found["loss"], found["accuracy"] / 100.0)
            elif found := logLines.TRAINING.parse(line):
                train[(found["step"], 0)] = (found["loss"], found["accuracy"] / 100.0)
                if found["secondsPerStep"] is not None:
                    seconds[found["step"]] = found["secondsPerStep"]
            elif found := logLines.ACTIVATIONS.parse(line):
                try:
                    values = [float(v) for v in found["values"].split()]
                except ValueError:
                    continue
                history["actMean" if found["kind"] == 2 else "actMax"].append((found["step"], values))
            elif found := logLines.PEAK_MEMORY.parse(line):
                peaks[found["step"]] = found["gigabytes"]
            elif found := logLines.HYPERPARAMETER.parse(line):
                history["hyperparameters"][found["name"]] = found["value"].strip("'")
            elif found := logLines.PARAMETER.parse(line):
                history["parameters"][found["name"]] = found["count"]
            elif found := logLines.PARAMETER_TOTALS.parse(line):
                history["parametersTotal"] = found["total"]
            elif found := logLines.VOCABULARY.parse(line):
                history["vocabSize"] = found["size"]
            elif found := logLines.MODELS_PER_PASS.parse(line):
                history["modelsPerPass"] = found["modelsPerPass"]
            elif line.startswith(logLines.KERNEL_PREFIXES):
                history["kernels"].append(line)
            elif line.startswith(logLines.FALLBACK_PREFIX):
                history["fallbacks"].append(line)
    history["train"] = [(step, model, loss, acc) for (step, model), (loss, acc) in train.items()]
    history["val"] = [(step, loss, acc) for step, (loss, acc) in sorted(val.items())]
    history["secondsPerStep"] = sorted(seconds.items())
    history["peakMemory"] = sorted(peaks.items())
    return history


def runName(logPath):
    """log-RUN.txt -> RUN; any other file name -> its stem."""
    stem = os.path.splitext(os.path.basename(logPath))[0]
    return stem[len("log-"):] if stem.startswith("log-") and len(stem) > len("log-") else stem


def hasDisplay():
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def showFiles(paths):
    """Show PNG files in a live window, without blocking, when a display exists (else do nothing)."""
    if not hasDisplay():
        return
    import matplotlib.pyplot as plt

    for index, path in enumerate(paths):
        fig = plt.figure(num=f"LM-AFs {index}", clear=True)
        fig.figimage(plt.imread(path), resize=True)
    plt.pause(0.001)


def parseArgs(argv=None):
    parser = argparse.ArgumentParser(
        description="Plot training curves and activation magnitudes from a training log (ours or the original "
                    "code's); with several logs or --out, overlay their validation curves in one figure.",
        epilog="example: python plotting.py log-baseline-gelu.txt theirs/log-baseline-gelu.txt --out compare.png")
    parser.add_argument("logFiles", nargs="+", metavar="logFile")
    parser.add_argument("--out", default=None, help="PNG of the overlay (default with several logs: compare.png)")
    parser.add_argument("--outDir", default=None, help="folder for one log's PNGs (default: the log's folder)")
    parser.add_argument("--show", action="store_true", help="also open a live window if a display exists")
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parseArgs(argv)
    for path in args.logFiles:
        if not os.path.isfile(path):
            parser.exit(2, f"error: log file {path!r} does not exist\n")

    if len(args.logFiles) > 1 or args.out:
        runs = list(zip(runLabels(args.logFiles), map(parseLog, args.logFiles)))
        outPath = args.out or "compare.png"
        os.makedirs(os.path.dirname(os.path.abspath(outPath)), exist_ok=True)
        plotRunOverlay(outPath, runs)
        print(f"wrote {outPath} ({len(runs)} runs: {', '.join(label for label, _ in runs)})")
        figures = [lambda newFigure: _overlayFigure(runs, "", newFigure)]
    else:
        logFile = args.logFiles[0]
        history = parseLog(logFile)
        run = runName(logFile)
        outDir = args.outDir or os.path.dirname(os.path.abspath(logFile))
        os.makedirs(outDir, exist_ok=True)
        nSites = max((len(v) for _, v in history["actMean"] + history["actMax"]), default=0)
        # The log does not say which site is which, so use neutral names rather than guess MLP/attention.
        layerNames = [f"site {i}" for i in range(nSites)]
        trPath = os.path.join(outDir, f"tr-{run}.png")
        actPath = os.path.join(outDir, f"act-{run}.png")
        plotTraining(trPath, history, title=run)
        plotActivations(actPath, history, layerNames)
        print(f"wrote {trPath} and {actPath}")
        figures = [lambda newFigure: _trainingFigure(history, 3.0, 15.0, 0.0, 0.4, run, newFigure),
                   lambda newFigure: _activationsFigure(history, layerNames, newFigure)]

    if args.show:
        if not hasDisplay():
            print("--show: no display found (DISPLAY/WAYLAND_DISPLAY unset), wrote the files only")
            return
        # pyplot is imported only here, so it can pick an interactive backend for the display that exists.
        import matplotlib.pyplot as plt

        for draw in figures:
            draw(lambda figsize: plt.figure(figsize=figsize, layout="constrained"))
        plt.show()


if __name__ == "__main__":
    main()
