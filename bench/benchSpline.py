"""Times spline-activation forward+backward (PyTorch and Triton implementations) against GELU and prints the ratio.

Each row names the backend that ran its forward and its backward ("torch", "triton-tl", "triton-gluon"). On a CPU
the rows are timed in turns, one run of each per round, so a machine shared with other work slows them alike.
The last line is `ratio X` = splineActivation (what a model calls) / GELU.

    python bench/benchSpline.py                          # CUDA: 20 x 4096 x 1024 bfloat16
    python bench/benchSpline.py --device cpu --quick     # 2 x 256 x 256
    python bench/benchSpline.py --device cpu --models 3 --tokens 128 --channels 256 --dtype float32
"""

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def bucketizeSpline(x, values, knotMin, knotStep):
    """Plain PyTorch spline: bucketize finds the interval, gathers read the knots, autograd gives both gradients."""
    numKnots = values.numel()
    knots = knotMin + knotStep * torch.arange(numKnots, device=x.device, dtype=torch.float32)
    xFloat = x.float()
    i = (torch.bucketize(xFloat, knots, right=True) - 1).clamp(0, numKnots - 2)
    # clamping w (not x) gives zero input gradient outside the knots and sends the whole weight to the end knot
    w = ((xFloat - knots[i]) / knotStep).clamp(0.0, 1.0)
    left = values[i]
    return (left + w * (values[i + 1] - left)).to(x.dtype)


def autogradPair(forward, backward, **backwardOptions):
    """Differentiable spline from a (forward, backward) pair taking (x, values, knotMin, invStep)."""

    class Spline(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, values, knotMin, invStep):
            ctx.save_for_backward(x, values)
            ctx.knotMin, ctx.invStep = knotMin, invStep
            return forward(x, values, knotMin, invStep)

        @staticmethod
        def backward(ctx, gradOut):
            x, values = ctx.saved_tensors
            gradX, gradValues = backward(gradOut, x, values, ctx.knotMin, ctx.invStep, **backwardOptions)
            return gradX, gradValues, None, None

    return lambda x, values, knotMin, knotStep: Spline.apply(x, values, knotMin, 1.0 / knotStep)


def splineImplementations(device):
    """(name, spline function, (forward backend, backward backend)) rows runnable on device, plus notes on the rest.

    The first row is splineActivation, what a model calls; the backends it names are those it chose when it ran.
    """
    notes = []
    try:
        import activationFunctions
    except ImportError as error:
        return [("torch bucketize+gather", bucketizeSpline, ("torch", "torch"))], [
            f"activationFunctions not importable ({error}): its spline rows are skipped"]
    rows = [("splineActivation", activationFunctions.splineActivation, None),
            ("torch bucketize+gather (autograd)", bucketizeSpline, ("torch", "torch"))]
    if device.type == "cuda":
        rows.append(("PyTorch path via autograd.Function", autogradPair(
            activationFunctions.splineForwardTorch, activationFunctions.splineBackwardTorch), ("torch", "torch")))
        try:
            from lmafs.network import splineKernel
        except ImportError as error:
            notes.append(f"splineKernel not importable ({error}): Triton rows are skipped")
        else:
            offered = splineKernel.kernelBackends(device)
            for name, missing in splineKernel.MISSING_FEATURES.items():
                if missing:
                    notes.append(f"{name} not offered by this Triton: it lacks {', '.join(missing)}")
            for forward in offered["forward"]:
                for backward in offered["backward"]:
                    rows.append((f"{forward} / {backward} kernels", autogradPair(
                        splineKernel.splineForwardTriton, splineKernel.splineBackwardTriton, backend=backward),
                        (forward, backward)))
    else:
        # what torch.compile calls: the same PyTorch code behind the custom op's dispatch
        customOp = activationFunctions._splineForwardOp
        rows.append(("lmafs::spline_forward custom op", lambda x, values, knotMin, knotStep: customOp(
            x, values, float(knotMin), 1.0 / float(knotStep)), ("torch", "torch")))
        notes.append("Triton kernels run on CUDA only: skipped")
    return rows, notes


def timeRows(steps, device, repeats):
    """Median milliseconds of each step after warm-up: on CUDA do_bench (L2 flushed between runs); on a CPU in turns."""
    if device.type == "cuda":
        import triton.testing
        return [triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median") for step in steps]
    for step in steps:
        for _ in range(3):
            step()
    samples = [[] for _ in steps]
    for _ in range(repeats):
        for step, times in zip(steps, samples):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(times) for times in samples]


def deviceName(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuInfo:
            for line in cpuInfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def parseArgs():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2 x 256 x 256 elements, for a CPU smoke run")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--knots", type=int, default=64)
    parser.add_argument("--knotRange", type=float, default=15.0, help="knots span [-knotRange, knotRange]")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds on CPU (default 50 with --quick or below 10M elements, else 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.channels, args.models = 256, 256, 2
    if args.repeats is None:
        args.repeats = 50 if args.models * args.tokens * args.channels < 10_000_000 else 5
    return args


def main():
    args = parseArgs()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.models, args.tokens, args.channels)
    x = torch.randn(shape, device=device, generator=generator).to(dtype).requires_grad_()
    gradOut = torch.randn(shape, device=device, generator=generator).to(dtype)
    knotMin, knotStep = -args.knotRange, 2 * args.knotRange / (args.knots - 1)
    values = torch.randn(args.knots, device=device, generator=generator).requires_grad_()

    implementations, notes = splineImplementations(device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device: {deviceName(device)} ({device.type}{threads}), torch {torch.__version__}")
    print(f"input: models x tokens x channels = {' x '.join(map(str, shape))} ({x.numel():,} elements), "
          f"{args.dtype}, {args.knots} knots on [{knotMin}, {-knotMin}]")
    for note in notes:
        print(f"note: {note}")

    # each spline's knot gradient is checked against the bucketize one: a broken kernel shows in the table
    reference = torch.autograd.grad(bucketizeSpline(x, values, knotMin, knotStep), values, gradOut)[0]
    rows = [("gelu (torch.nn.functional)", lambda: torch.autograd.grad(F.gelu(x), x, gradOut), ("", ""), math.nan)]
    for name, spline, backends in implementations:
        try:
            error = math.nan
            if spline is not bucketizeSpline:
                gradValues = torch.autograd.grad(spline(x, values, knotMin, knotStep), values, gradOut)[0]
                error = ((gradValues - reference).abs().max() / reference.abs().max()).item()
        except Exception as failure:  # one broken implementation must not hide the other timings
            print(f"note: {name} failed: {type(failure).__name__}: {failure}")
            continue
        step = (lambda spline=spline: torch.autograd.grad(spline(x, values, knotMin, knotStep), (x, values), gradOut))
        rows.append((name, step, backends, error))
    times = timeRows([step for _, step, _, _ in rows], device, args.repeats)
    geluMs = times[0]
    if any(backends is None for _, _, backends, _ in rows):
        import activationFunctions
        # read after the runs: a kernel that failed during them has been replaced by its fallback
        chosen = activationFunctions.splineBackends(device, nKnots=args.knots, dtype=dtype)
        rows = [(name, step, backends or (chosen["forward"], chosen["backward"]), error)
                for name, step, backends, error in rows]

    print(f"{'implementation (forward+backward)':<40}{'forward':>14}{'backward':>14}{'ms':>10}{'vs GELU':>9}"
          f"{'knot-grad rel. diff vs bucketize':>34}")
    for (name, _, (forward, backward), error), ms in zip(rows, times):
        errorText = "" if math.isnan(error) else f"{error:.1e}"
        print(f"{name:<40}{forward:>14}{backward:>14}{ms:>10.3f}{ms / geluMs:>9.2f}{errorText:>34}")
    byName = {name: ms for (name, _, _, _), ms in zip(rows, times)}
    if "splineActivation" in byName:
        print(f"ratio {byName['splineActivation'] / geluMs:.2f}")


if __name__ == "__main__":
    main()
