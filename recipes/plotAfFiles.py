"""Overlay the learned MLP and attention splines of several AF files (ptAf .pt, or the original's .csv) in one figure,
each curve labelled with its roughness S (the smoothness prior's integral of f''^2): how far phase I moved an AF
from its start, and how smooth it left it (docs/studies.md, "Why phase I hurts at the medium size").

    python recipes/plotAfFiles.py OUT.png [LABEL=]FILE [[LABEL=]FILE ...] [--xRange 3] [--start relu2]

A .pt file's first MLP and attention spline are drawn (layer 0; shared splines are the same in every layer); a .csv
is read as the original writes it for MLP and attention splines (the MLP layers' rows first, then as many attention
rows; afFiles.splitCsvRows).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import activationFunctions as afs  # noqa: E402
from lmafs.atomicFiles import atomicWrite  # noqa: E402
from lmafs.cliErrors import OneLineErrorParser  # noqa: E402
from lmafs.network.afFiles import splitCsvRows  # noqa: E402


def firstSplines(path):
    """(knots, MLP values, attention values or None) of an AF file's first layer."""
    data = afs.readAfFile(path)
    if data["rows"] is not None:
        rows = data["rows"]
        attention = "spline" if len(rows) > 1 else "linear"
        split = splitCsvRows(rows, data["rowKnots"], path, max(1, len(rows) // 2), "spline", attention, "softmax", 1, 1)
        data = {"knots": split["knots"], "mlpValues": split["mlpValues"], "attValues": split["attValues"]}
    if not data["mlpValues"]:
        raise afs.AfFileError(f"{path!r} holds no MLP spline")
    attention = data["attValues"][0] if data["attValues"] else None
    return data["knots"], data["mlpValues"][0], attention


def roughness(knots, values):
    """The smoothness prior's S of values on these knots."""
    return float(afs.splineRoughness(values.double(), float(knots[1] - knots[0])))


def main(argv=None):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("files", nargs="+", metavar="[LABEL=]FILE")
    parser.add_argument("--xRange", type=float, default=3.0, help="draw inputs in [-X, X] (default 3)")
    parser.add_argument("--start", default="relu2",
                        help="a fixed AF of the zoo drawn dashed for reference (default relu2; 'none' for none)")
    args = parser.parse_args(argv)
    curves = []
    for spec in args.files:
        label, _, path = spec.rpartition("=")
        label = label or os.path.basename(path)
        try:
            curves.append((label,) + firstSplines(path))
        except afs.AfFileError as err:
            parser.error(str(err))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    x = torch.linspace(-args.xRange, args.xRange, 601, device="cpu")
    if args.start != "none":
        knots = curves[0][1]
        startS = roughness(knots, afs.splineInitValues(args.start, knots))
        axes[0].plot(x, afs.splineInitValues(args.start, x), "k--", lw=1,
                     label=f"{args.start} (S {startS:,.0f} as a spline on these knots)")
    for site, ax in enumerate(axes):
        for label, knots, mlp, attention in curves:
            values = (mlp, attention)[site]
            if values is None:
                continue
            S = roughness(knots, values)
            values = values.float().mean(0) if values.dim() == 2 else values.float()  # a per-channel one: the mean
            inside = (knots >= -args.xRange) & (knots <= args.xRange)
            ax.plot(knots[inside], values[inside], marker=".", ms=3, lw=1, label=f"{label} (S {S:,.0f})")
        ax.set_title(("MLP spline", "attention (pre-QKV) spline")[site])
        ax.set_xlabel("input")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    FigureCanvasAgg(fig)
    atomicWrite(args.out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    print(f"wrote {args.out} ({len(curves)} files)")


if __name__ == "__main__":
    main()
