"""Times spline-activation forward+backward (PyTorch and Triton implementations) against GELU and prints the ratio."""

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
    """(name, spline function) pairs runnable on this device, plus notes on the ones left out."""
    implementations = [("torch bucketize+gather", bucketizeSpline)]
    notes = []
    try:
        import activationFunctions
    except ImportError as error:
        activationFunctions = None
        notes.append(f"activationFunctions not importable ({error}): its spline rows are skipped")
    if activationFunctions is not None and hasattr(activationFunctions, "splineActivation"):
        label = "triton kernels via custom_op" if device.type == "cuda" else "PyTorch fallback"
        implementations.append((f"splineActivation ({label})", activationFunctions.splineActivation))
    elif activationFunctions is not None:
        notes.append("activationFunctions.splineActivation not found: its row is skipped")
    if device.type == "cuda" and all(hasattr(activationFunctions, name)
                                     for name in ("splineForwardTorch", "splineBackwardTorch")):
        implementations.append(("activationFunctions PyTorch fallback", autogradPair(
            activationFunctions.splineForwardTorch, activationFunctions.splineBackwardTorch)))
    if device.type == "cuda":
        try:
            import splineKernel
        except ImportError as error:
            notes.append(f"splineKernel not importable ({error}): Triton rows are skipped")
        else:
            for backend in splineKernel.backwardBackends(device):
                implementations.append((f"triton ({backend} backward)", autogradPair(
                    splineKernel.splineForwardTriton, splineKernel.splineBackwardTriton, backend=backend)))
    else:
        notes.append("Triton kernels run on CUDA only: skipped")
    return implementations, notes


def timeMs(step, device, repeats):
    """Median milliseconds of step() after warm-up (on CUDA: do_bench's events, L2 flushed between runs)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
    for _ in range(3):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--knots", type=int, default=64)
    parser.add_argument("--knotRange", type=float, default=15.0, help="knots span [-knotRange, knotRange]")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation on CPU")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.channels, args.models = 256, 256, 2
    if args.repeats is None:
        args.repeats = 10 if args.quick else 20
    return args


def main():
    args = parseArgs()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.models, args.tokens, args.channels)
    x = torch.randn(shape, device=device, generator=generator).to(dtype).requires_grad_()
    gradOut = torch.randn(shape, device=device, generator=generator).to(dtype)
    knotMin, knotStep = -args.knotRange, 2 * args.knotRange / (args.knots - 1)
    values = torch.randn(args.knots, device=device, generator=generator).requires_grad_()

    implementations, notes = splineImplementations(device)
    print(f"device: {deviceName(device)} ({device.type})")
    print(f"input: models x tokens x channels = {' x '.join(map(str, shape))} ({x.numel():,} elements), "
          f"{args.dtype}, {args.knots} knots on [{knotMin}, {-knotMin}]")
    for note in notes:
        print(f"note: {note}")

    geluMs = timeMs(lambda: torch.autograd.grad(F.gelu(x), x, gradOut), device, args.repeats)
    # each spline's knot gradient is checked against the bucketize one: a broken kernel shows in the table
    reference = torch.autograd.grad(bucketizeSpline(x, values, knotMin, knotStep), values, gradOut)[0]
    rows = [("gelu (torch.nn.functional)", geluMs, float("nan"), False)]
    for name, spline in implementations:
        try:
            error = float("nan")
            if spline is not bucketizeSpline:
                gradValues = torch.autograd.grad(spline(x, values, knotMin, knotStep), values, gradOut)[0]
                error = ((gradValues - reference).abs().max() / reference.abs().max()).item()
            ms = timeMs(lambda spline=spline: torch.autograd.grad(spline(x, values, knotMin, knotStep), (x, values),
                                                                   gradOut), device, args.repeats)
        except Exception as failure:  # one broken implementation must not hide the other timings
            print(f"note: {name} failed: {type(failure).__name__}: {failure}")
            continue
        rows.append((name, ms, error, spline is bucketizeSpline))

    print(f"{'implementation (forward+backward)':<44}{'ms':>10}{'vs GELU':>10}{'knot-grad rel. diff vs bucketize':>34}")
    for name, ms, error, _ in rows:
        errorText = "" if math.isnan(error) else f"{error:.1e}"
        print(f"{name:<44}{ms:>10.3f}{ms / geluMs:>10.2f}{errorText:>34}")
    bucketizeMs = [ms for _, ms, _, isBaseline in rows if isBaseline]
    ours = [ms for _, ms, _, isBaseline in rows[1:] if not isBaseline]
    if bucketizeMs and ours:
        print(f"ours vs plain bucketize/gather: {min(ours) / bucketizeMs[0]:.2f}x the time")
    print(f"ratio {min(ours) / geluMs:.2f}")  # our best spline (the bucketize baseline excluded) / GELU


if __name__ == "__main__":
    main()
