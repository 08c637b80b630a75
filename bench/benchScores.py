"""Times attention forward+backward with each score transform (softmax, softplus, sigmoid, spline) as the model runs
it on this device: SDPA / the explicit scores on a CPU, compiled FlexAttention on CUDA; prints the ratios to softmax."""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def timeMs(step, device, repeats):
    """Median milliseconds of step() after warm-up (on CUDA: do_bench's events, L2 flushed between runs)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
    for _ in range(2):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def buildKernels(device, contextSize, headDim):
    """(score, kernel) for every score type, as a model on device builds its attention kernel: compiled
    FlexAttention on CUDA, SDPA / the explicit scores on a CPU."""
    from lmafs.network.attention import SCORE_TYPES, AttentionKernel
    implementation = "flex" if device.type == "cuda" else "sdpa"
    return [(score, AttentionKernel(implementation, contextSize, 32, headDim, score, device=device))
            for score in SCORE_TYPES]


def parseArgs():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    parser.add_argument("--sequences", type=int, default=20, help="sequences per call (phase I: one per model)")
    parser.add_argument("--seqLength", type=int, default=4096)
    parser.add_argument("--contextSize", type=int, default=1024)
    parser.add_argument("--nHeads", type=int, default=4)
    parser.add_argument("--headDim", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per score on CPU")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.seqLength, args.contextSize = 1, 1024, 1024
    if args.repeats is None:
        args.repeats = 5 if args.quick else 10
    return args


def main():
    args = parseArgs()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from activationFunctions import Spline
    from lmafs.network.attention import documentIds

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    kernels = buildKernels(device, args.contextSize, args.headDim)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.sequences, args.nHeads, args.seqLength, args.headDim)
    q, k = (F.rms_norm(torch.randn(shape, device=device, generator=generator), (args.headDim,)).to(dtype)
            .requires_grad_() for _ in range(2))
    v = torch.randn(shape, device=device, generator=generator).to(dtype).requires_grad_()
    gradOut = torch.randn(shape, device=device, generator=generator).to(dtype)
    # documents of ~1000 tokens, as FineWeb's are on average
    tokens = torch.randint(0, 1000, (args.sequences, args.seqLength), device=device, generator=generator)
    docs = documentIds(tokens, 0)
    spline = Spline(nKnots=64, knotRange=math.sqrt(args.headDim), init=-1).to(device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"q, k, v: {' x '.join(map(str, shape))} {args.dtype}, contextSize {args.contextSize}, "
          "attention " + ("compiled FlexAttention" if kernels[0][1].implementation == "flex" else
                          "SDPA / explicit scores"))

    rows = []
    for score, kernel in kernels:
        mask = kernel.mask(docs)
        inputs = (q, k, v) + ((spline.values,) if score == "spline" else ())

        def step(kernel=kernel, mask=mask, inputs=inputs):
            return torch.autograd.grad(kernel(q, k, v, mask, spline), inputs, gradOut)

        rows.append((score, kernel.describeScore(), timeMs(step, device, args.repeats)))
    softmaxMs = rows[0][2]
    print(f"{'score':<10}{'ms (fwd+bwd)':>14}{'vs softmax':>12}  how")
    for score, how, ms in rows:
        print(f"{score:<10}{ms:>14.1f}{ms / softmaxMs:>12.2f}  {how}")
    print(f"ratio {dict((s, ms) for s, _, ms in rows)['sigmoid'] / softmaxMs:.2f}")  # sigmoid / softmax


if __name__ == "__main__":
    main()
