"""The network's parts besides model.py and activationFunctions.py: attention (FlexAttention, SDPA, the score types),
splineKernel (the Triton spline kernels), stackedAdam (one AdamW per stacked model), afFiles (ptAf files)."""
