"""trainLmAf.main under torchrun with a fault in one process, for tests/test_torchrunStops.py:

    python -m torch.distributed.run ... tests/faultyProcess.py FAULT RANK STEP OUT FLAGS...

FAULT, in process RANK only: none; signalWhileReporting (it sends itself SIGTERM as it reports step STEP, after that
step's agreement); outOfMemoryInForward (its training pass of step STEP runs out of memory); outOfMemoryBeforeStepOne
(its pass before step 1 runs out of memory); fallbackTooBig (FlexAttention fails in its pass before step 1, and the
SDPA fallback would not fit its memory). Each process writes its pid to OUT/pid-R.txt (so that a test can end a hung
one), its stderr to OUT/stderr-R.txt and main's return value to OUT/exit-R.txt."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lmafs.run import forwardPasses  # noqa: E402
from lmafs.run import runSetup  # noqa: E402
import trainLmAf  # noqa: E402


def injectFault(fault, faulty, step):
    if fault == "none":
        return
    if fault == "signalWhileReporting":
        reportsAndSaves = trainLmAf.Trainer.reportsAndSaves

        def signalledWhileReporting(self, pending):
            if faulty and self.state.step == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return reportsAndSaves(self, pending)

        trainLmAf.Trainer.reportsAndSaves = signalledWhileReporting
    elif fault == "outOfMemoryInForward":
        forward, trainingPasses = forwardPasses.Passes.forward, []

        def runsOut(self, tokens, first):  # one training pass per step: one model per process
            if faulty and torch.is_grad_enabled():
                trainingPasses.append(first)
                if len(trainingPasses) == step:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return forward(self, tokens, first)

        forwardPasses.Passes.forward = runsOut
    elif fault in ("outOfMemoryBeforeStepOne", "fallbackTooBig"):
        arguments = runSetup.modelArguments
        runSetup.modelArguments = lambda *a, **k: {**arguments(*a, **k), "attention": "flex"}

        def runVariants(self, variants):  # the other processes' passes succeed
            if faulty and fault == "outOfMemoryBeforeStepOne":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if faulty:
                raise RuntimeError("no FlexAttention kernel fits this GPU")

        forwardPasses.Passes.runVariants = runVariants
        if faulty and fault == "fallbackTooBig":
            trainLmAf.fallbackProblemHere = lambda *args: "the SDPA fallback needs an estimated 64.0 GiB per pass"
    else:
        raise ValueError(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault, faultyRank, step, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rank = int(os.environ["RANK"])
    with open(os.path.join(out, f"pid-{rank}.txt"), "w") as f:
        f.write(str(os.getpid()))
    stderr = open(os.path.join(out, f"stderr-{rank}.txt"), "w")
    os.dup2(stderr.fileno(), 2)
    injectFault(fault, rank == faultyRank, step)
    status = trainLmAf.main(sys.argv[5:])
    with open(os.path.join(out, f"exit-{rank}.txt"), "w") as f:
        f.write(str(status))
    sys.exit(status)
