"""LM-AFs' internals, one folder a layer; what users run or import by name (trainLmAf.py, activationFunctions.py,
model.py, compareAfs.py, ...) lies at the repository's root and builds on these:

- run/      one training run: the flags' checks, the plan, setup, passes, gradients, state, outputs and log lines,
            checkpoints, stopping, torchrun, trackers, the preflight
- network/  the network's parts besides model.py and activationFunctions.py: attention and its score types, the
            Triton spline kernels, the per-model Adam, ptAf files
- data/     token shards and vocabularies
- study/    many runs: the local scheduler (CPU slots, GPUs) and Slurm jobs; the plan, statistics and report of a
            comparison of AFs
- atomicFiles.py, cliErrors.py: writing files whole, one-line command-line errors (used by every layer)
"""
