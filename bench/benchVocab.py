"""The training step with GPT-2's vocabulary (50,304 ids) against a corpus vocabulary (preprocessFineweb.py
--vocabSize 4096), at the study recipe's small and medium sizes: one model, `spline;att-spline`, the same trainer code,
only the vocabulary changed (the shards' largest id sets it).

Rounds alternate between the two vocabularies so that a machine whose load changes during the run slows both
alike; each figure is the median over all rounds. The last line is `ratio X` = GPT-2 seconds per step / corpus
vocabulary seconds per step at the small size.

    OMP_NUM_THREADS=1 python bench/benchVocab.py --device cpu
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchPhase1 import batchedStepper, timeSteps  # noqa: E402
from lmafs.data.tokenShards import writeShard  # noqa: E402
from trainLmAf import Trainer, parseArgs  # noqa: E402

SIZES = {"small": dict(nLayers=2, dimEmb=64, nHeads=2, seqLength=256),
         "medium": dict(nLayers=4, dimEmb=128, nHeads=4, seqLength=512)}
VOCABULARIES = {"GPT-2": 50257, "corpus 4,096": 4096}


def writeShards(folder, nIds, nTokens=200_000, seed=0):
    """Random ids below nIds: shards whose largest id gives the model that vocabulary (rounded up to 128)."""
    tokens = np.random.default_rng(seed).integers(0, nIds, nTokens)
    tokens[-1] = nIds - 1
    writeShard(os.path.join(folder, "fineweb_train_000001.bin"), tokens)


def makeTrainer(folder, size, device):
    flags = ["--filesTokensTr", f"{folder}/fineweb_train_*.bin", "--filesTokensVa", "", "--device", device,
             "--dirResults", os.path.join(folder, "results"), "--afType", "spline;att-spline", "--afLayerSpecific", "0",
             "--tokenDocSep", "-1", "--nSteps", "1000", "--nStepsWarmup", "10", "--nStepsCooldown", "100",
             "--plottingLevel", "0", "--lr", "0.002"]
    for name, value in SIZES[size].items():
        flags += [f"--{name}", str(value)]
    flags += ["--contextSize", str(SIZES[size]["seqLength"])]
    hp, given = parseArgs(flags)
    return Trainer(hp, given).setup()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two vocabularies per size")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s); {args.rounds} rounds "
          f"x {args.steps} steps per vocabulary, alternating")
    print("| size | vocab 50,304 (s/step) | vocab 4,096 (s/step) | ratio |\n|---|---:|---:|---:|")
    ratios = {}
    with tempfile.TemporaryDirectory() as root:
        for size in SIZES:
            trainers = {}
            for name, nIds in VOCABULARIES.items():
                folder = os.path.join(root, f"{size}-{nIds}")
                os.makedirs(folder)
                writeShards(folder, nIds)
                trainers[name] = makeTrainer(folder, size, args.device)
            steppers = {name: batchedStepper(trainer) for name, trainer in trainers.items()}
            times = {name: [] for name in trainers}
            for name in trainers:  # first steps: allocation and any compilation
                timeSteps(steppers[name], device, 2, 1)
            for _ in range(args.rounds):
                for name in trainers:
                    times[name].append(timeSteps(steppers[name], device, 0, args.steps)[0])
            gpt2, corpus = (float(np.median(times[name])) for name in VOCABULARIES)
            ratios[size] = gpt2 / corpus
            sizeText = "{nLayers} x {dimEmb}, seqLength {seqLength}".format(**SIZES[size])
            print(f"| {size} ({sizeText}) | {gpt2:.3f} | {corpus:.3f} | {ratios[size]:.1f}x |", flush=True)
            if [t.vocabSize for t in trainers.values()] != [50304, 4096]:
                raise RuntimeError(f"the models' vocabularies are {[t.vocabSize for t in trainers.values()]}, not "
                                   "50,304 and 4,096")
    print(f"ratio {ratios['small']:.2f}")


if __name__ == "__main__":
    main()
