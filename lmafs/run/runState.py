"""The run's state that a checkpoint carries besides weights, optimizers and data positions: the step, the training
seconds, the history of reported numbers and the window of training losses since the last report."""
import torch


class RunState:
    """One process's run state; window: this process's nModels models' sums since the last report."""

    def __init__(self, nModels, device):
        self.nModels, self.device = nModels, device
        self.step = 0
        self.trainSeconds = 0.0
        self.history = {"train": [], "val": [], "actMean": [], "actMax": []}
        self.resetWindow()

    def resetWindow(self):
        zeros = torch.zeros(self.nModels, device=self.device)
        self.window = {"loss": zeros, "acc": zeros.clone(), "count": zeros.clone(), "steps": 0, "seconds": 0.0}

    def recordStep(self, nActive, losses, accuracies):
        """One more step done, by the first nActive models, with these losses and accuracies [nActive]."""
        self.step += 1
        self.window["loss"][:nActive] += losses
        self.window["acc"][:nActive] += accuracies
        self.window["count"][:nActive] += 1
        self.window["steps"] += 1

    def addTrainingTime(self, seconds):
        self.trainSeconds += seconds
        self.window["seconds"] += seconds

    def secondsPerStep(self):
        return self.window["seconds"] / max(1, self.window["steps"])

    def state_dict(self):
        """The checkpoint's step, trainSeconds, history and window entries (the window's tensors on the CPU)."""
        return {"step": self.step, "trainSeconds": self.trainSeconds, "history": self.history,
                "window": {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.window.items()}}

    def load_state_dict(self, state, models=slice(None)):
        """Continue from a checkpoint's entries; models: this process's rows of the run's window."""
        self.step, self.trainSeconds, self.history = state["step"], state["trainSeconds"], state["history"]
        window = state["window"]
        self.window = {key: window[key][models].to(self.device) for key in ("loss", "acc", "count")}
        self.window["steps"], self.window["seconds"] = window["steps"], window.get("seconds", 0.0)
