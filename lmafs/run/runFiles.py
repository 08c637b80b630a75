"""The run's files: every name a run writes in its output folder (log, metrics, model checkpoints, ptAf files, plots,
tracker folder), made from the folder and the run name, so that the writers and the readers (compareAfs.py,
bench/gpuCheck.py) spell them one way."""
import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class RunFiles:
    folder: str
    runName: str

    def path(self, name):
        return os.path.join(self.folder, name)

    @property
    def log(self):
        return self.path(f"log-{self.runName}.txt")

    @property
    def metrics(self):
        return self.path(f"metrics-{self.runName}.csv")

    @property
    def stderr(self):
        """What a run launched by compareAfs.py wrote to stderr (its errors; its progress lines are in the log)."""
        return self.path(f"stderr-{self.runName}.txt")

    def complete(self, nSteps):
        """Whether the log holds the final step's line (trainLmAf.py then stops at once: "already complete")."""
        if not os.path.isfile(self.log):
            return False
        prefix = f"Step {nSteps}/{nSteps} "
        with open(self.log, errors="replace") as f:
            return any(line.startswith(prefix) for line in f)

    def newestCheckpoint(self):
        """The model checkpoint of the most steps in the folder (saved on an interrupt, or by --saveModelEvery), or
        None."""
        pattern = re.compile(rf"^pt-{re.escape(self.runName)}-step(\d+)\.pt$")
        found = [(int(match.group(1)), name) for name in os.listdir(self.folder) if (match := pattern.match(name))] \
            if os.path.isdir(self.folder) else []
        return self.path(max(found)[1]) if found else None

    def resumeArguments(self, nSteps):
        """--resumeFrom the newest checkpoint when the run has one and is not complete, else nothing: a run stopped
        by an interrupt, a time limit or a preemption continues where it saved."""
        newest = None if self.complete(nSteps) else self.newestCheckpoint()
        return ["--resumeFrom", newest] if newest else []

    @property
    def trackerFolder(self):
        return os.path.join(self.folder, "tensorboard", self.runName)

    def checkpoint(self, step):
        """The model checkpoint after `step` steps."""
        return self.path(f"pt-{self.runName}-step{step:04d}.pt")

    def afStem(self, step):
        """The ptAf files after `step` steps, without their .pt/.csv ending."""
        return self.path(f"ptAf-{self.runName}-step{step:04d}")

    def afFile(self, step):
        return self.afStem(step) + ".pt"

    def plot(self, kind, step, suffix=""):
        """A plot (kind tr: loss/accuracy, af: the AFs, act: activation magnitudes) refreshed after `step` steps; suffix: after the step, e.g. '-lossVa3.2101'."""
        return self.path(f"{kind}-{self.runName}-step{step:06d}{suffix}.png")

    def olderPlots(self, kinds, keep):
        """This run's plots of those kinds in the folder, except the paths in keep: earlier refreshes."""
        pattern = re.compile(rf"^({'|'.join(kinds)})-{re.escape(self.runName)}-step\d{{6}}.*\.png$")
        keepNames = {os.path.basename(path) for path in keep}
        return [self.path(name) for name in sorted(os.listdir(self.folder))
                if pattern.match(name) and name not in keepNames]
