"""Experiment trackers for trainLmAf.py (--tracker): the rows of metrics-RUN.csv, the AF-input out-of-range shares, the
smoothness term and the plots, sent to TensorBoard or Weights & Biases, whose packages are imported only when asked for.

    --tracker tensorboard   event files in dirResults/tensorboard/RUN/ (tensorboard --logdir dirResults/tensorboard)
    --tracker wandb         project lm-afs (WANDB_PROJECT overrides), files in dirResults/wandb/; WANDB_MODE=offline
                            writes the run there only (`wandb sync` uploads it later)

Tags: model 0's rows as train/loss, train/accuracy, val/loss, val/accuracy, lr, tokens, trainSeconds; the other models
of phase I as train/modelM/loss, train/modelM/accuracy, lr/modelM, tokens/modelM; afInputsOutOfRange/SITE (att_0,
MLP_0, ...: a share in [0, 1]); afSmoothness/S and afSmoothness/penalty; the figures as plots/tr, plots/af,
plots/act. The x axis is the training step. A resumed run continues the same tracker run: the same TensorBoard
folder, whose events after the checkpoint's step are dropped (they are trained again, as the CSV drops its rows), and
the same W&B run, whose id is derived from dirResults and runName (W&B cannot drop what it holds: steps after the
checkpoint appear twice there).
"""
import hashlib
import importlib.util
import os
import re

TRACKERS = ("tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrackerError(Exception):
    """A tracker that cannot start (e.g. W&B online without a login); the message is one line for the user."""


def missingPackage(name):
    """The one-line error when --tracker name's package is not installed, else None (nothing is imported)."""
    if name and importlib.util.find_spec(PACKAGES[name]) is None:
        return f"--tracker {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}"
    return None


def rowScalars(model, split, loss, accuracy, lr, trainSeconds, tokens):
    """The tags and values of one metrics-RUN.csv row."""
    if model == 0:
        return {f"{split}/loss": loss, f"{split}/accuracy": accuracy, "lr": lr, "tokens": tokens,
                "trainSeconds": trainSeconds}
    return {f"{split}/model{model}/loss": loss, f"{split}/model{model}/accuracy": accuracy, f"lr/model{model}": lr,
            f"tokens/model{model}": tokens}


def tagName(tag):
    """AF site names hold spaces ("att 0"), which tags do not."""
    return tag.replace(" ", "_")


class NoTracker:
    """--tracker "" (and processes other than the main one): nothing is sent."""

    def write(self, step, model, split, loss, accuracy, lr, trainSeconds, tokens):
        pass

    def scalars(self, step, values):
        pass

    def images(self, step, paths):
        pass

    def close(self):
        pass


class TensorBoardTracker(NoTracker):
    def __init__(self, folder, resumeStep):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop this folder's earlier events from the resumed step on
        self.writer = SummaryWriter(folder, purge_step=resumeStep + 1 if resumeStep else None)
        self.folder = folder

    def write(self, step, model, split, loss, accuracy, lr, trainSeconds, tokens):
        self.scalars(step, rowScalars(model, split, loss, accuracy, lr, trainSeconds, tokens))

    def scalars(self, step, values):
        for tag, value in values.items():
            self.writer.add_scalar(tagName(tag), value, step)
        self.writer.flush()

    def images(self, step, paths):
        from matplotlib.image import imread

        for kind, path in paths:
            self.writer.add_image(f"plots/{kind}", imread(path)[..., :3], step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker(NoTracker):
    def __init__(self, folder, runName, runId, hyperparameters):
        import wandb

        os.makedirs(folder, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lm-afs"), name=runName, id=runId,
                              resume="allow", dir=folder, config=hyperparameters)
        # our step is the x axis: W&B's own step must increase, which a resumed run's repeated steps would not
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, step, model, split, loss, accuracy, lr, trainSeconds, tokens):
        self.scalars(step, rowScalars(model, split, loss, accuracy, lr, trainSeconds, tokens))

    def scalars(self, step, values):
        self.run.log({"step": step, **{tagName(tag): value for tag, value in values.items()}})

    def images(self, step, paths):
        self.run.log({"step": step, **{f"plots/{kind}": self.wandb.Image(path) for kind, path in paths}})

    def close(self):
        self.run.finish()


def wandbRunId(dirResults, runName):
    """The same id for every start and resume of a run (runName in dirResults), different for other folders."""
    digest = hashlib.sha1(os.path.abspath(dirResults).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', runName)[:54]}-{digest}"


def openTracker(hp, resumeStep):
    """The tracker --tracker asks for (NoTracker for none), continuing the run's earlier one after a resume."""
    if hp.tracker == "tensorboard":
        return TensorBoardTracker(os.path.join(hp.dirResults, "tensorboard", hp.runName), resumeStep)
    if hp.tracker == "wandb":
        try:
            return WandbTracker(hp.dirResults, hp.runName, wandbRunId(hp.dirResults, hp.runName), vars(hp))
        except Exception as err:  # wandb raises many types (no API key, no network, a bad project name)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackerError(f"--tracker wandb could not start a run ({reason}); log in with `wandb login`, or "
                               "set WANDB_MODE=offline to keep the run on this machine") from None
    return NoTracker()
