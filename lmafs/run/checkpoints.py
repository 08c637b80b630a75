"""The model checkpoint pt-RUN-stepNNNN.pt: its format and version string, writing it from a run's parts and
restoring a run from it (Checkpointer), and turning it back into a runnable model with the tokenizer it was trained
with: the corpus vocabulary it carries, or GPT-2's (generate.py, evalBlimp.py, evalHarness.py)."""
import dataclasses
import sys
from dataclasses import dataclass

import numpy as np
import torch

from lmafs.data import vocabulary
from activationFunctions import FORMAT as AF_FILE_FORMAT, AfFileError, safeTorchLoad
from lmafs.network.afFiles import perLayerValues, scoreSplineKnots, splineKnots
from lmafs.atomicFiles import atomicWrite
from lmafs.run.flagChecks import ConfigError
from lmafs.run.runSetup import buildModel

CHECKPOINT_FORMAT = "lm-afs checkpoint 1"


# ----------------------------------------------------------------------------------------------
# Writing and restoring a run


class Checkpointer:
    """Writes a run's pt-RUN-stepNNNN.pt and restores a run from one: the model's weights, both optimizers, the data
    streams' positions, the run state (runState.RunState), the random generators and the AFs. Under torchrun each
    process holds models modelRange = (first, stop) of the run (all of them, data parallel), and saving gathers
    them on the main process."""

    def __init__(self, hp, files, model, optimizer, afOptimizer, streams, state, dist, dataParallel, modelRange,
                 vocabSize, corpusVocabulary, device):
        self.hp, self.files, self.model = hp, files, model
        self.optimizer, self.afOptimizer, self.streams, self.state = optimizer, afOptimizer, streams, state
        self.dist, self.dataParallel, self.vocabSize, self.device = dist, dataParallel, vocabSize, device
        self.corpusVocabulary = corpusVocabulary
        first, stop = modelRange
        self.mine = slice(first, stop)
        self.nLocal = stop - first

    def localState(self):
        """What differs between ranks: this rank's models' weights, optimizer state, data positions, window."""
        weightNames = [name for name, _ in self.model.namedWeightParameters()]
        state = self.model.state_dict()
        return {"weights": {name: state[name].cpu() for name in weightNames},
                "optimizer": {k: [t.cpu() for t in v] if isinstance(v, list) else v.cpu()
                              for k, v in self.optimizer.state_dict().items()},
                "dataPositions": [s.state_dict() for s in self.streams],
                "window": self.state.state_dict()["window"]}

    def checkpointDict(self):
        """The whole run's state on the main rank (gathered from all ranks under torchrun); None elsewhere."""
        parts = self.dist.gatherToMain(self.localState())
        if not self.dist.isMain:
            return None
        if self.dataParallel:
            parts = parts[:1]  # every rank holds the same model and reads the same (strided) stream

        def cat(tensors):
            return torch.cat(tensors) if len(tensors) > 1 else tensors[0]

        model = self.model.state_dict()
        for name in parts[0]["weights"]:
            model[name] = cat([p["weights"][name] for p in parts])
        optimizer = {key: [cat([p["optimizer"][key][i] for p in parts])
                           for i in range(len(parts[0]["optimizer"][key]))] for key in ("expAvg", "expAvgSq")}
        optimizer["stepCounts"] = cat([p["optimizer"]["stepCounts"] for p in parts])
        window = {key: cat([p["window"][key] for p in parts]) for key in ("loss", "acc", "count")}
        window["steps"], window["seconds"] = parts[0]["window"]["steps"], parts[0]["window"]["seconds"]
        runState = self.state.state_dict()
        return {
            "format": CHECKPOINT_FORMAT,
            "hyperparameters": dataclasses.asdict(self.hp),
            "step": runState["step"],
            "vocabSize": self.vocabSize,
            "model": model,
            "optimizer": optimizer,
            "afOptimizer": self.afOptimizer.state_dict() if self.afOptimizer else None,
            "dataPositions": [position for p in parts for position in p["dataPositions"]],
            "history": runState["history"],
            "trainSeconds": runState["trainSeconds"],
            "window": window,
            "rng": {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "knots": splineKnots(self.model),
            "afValuesMlp": perLayerValues(self.model, "mlp"),
            "afValuesAtt": perLayerValues(self.model, "att"),
            "scoreKnots": scoreSplineKnots(self.model),
            "afValuesScore": perLayerValues(self.model, "score"),
            **({"tokenizer": self.corpusVocabulary.json} if self.corpusVocabulary else {}),
        }

    def save(self):
        """Write pt-RUN-stepNNNN.pt (a collective under torchrun: every rank must call it); returns its path."""
        path = self.files.checkpoint(self.state.step)
        state = self.checkpointDict()
        if state is not None:
            atomicWrite(path, lambda tmp: torch.save(state, tmp))
        return path

    def restore(self, ckpt):
        """Continue from a checkpoint (the model weights were loaded before this rank took its block)."""
        self.optimizer.load_state_dict(ckpt["optimizer"], models=slice(None) if self.dataParallel else self.mine)
        if self.afOptimizer and ckpt["afOptimizer"]:
            self.afOptimizer.load_state_dict(ckpt["afOptimizer"])
        # one stream for every model of a process (data parallel, or the same data for all models), else one per model
        shared = self.dataParallel or len(self.streams) < self.nLocal
        positions = ckpt["dataPositions"][:1] if shared else ckpt["dataPositions"][self.mine]
        for stream, state in zip(self.streams, positions):
            stream.load_state_dict(state)
        self.state.load_state_dict(ckpt, models=slice(None, self.nLocal) if self.dataParallel else self.mine)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"]["cuda"]:
            restoreCudaRngStates(ckpt["rng"]["cuda"])


def loadResumeCheckpoint(path):
    """The checkpoint --resumeFrom names (its hyperparameters supply the flags not given: flagChecks.settle)."""
    try:
        ckpt = safeTorchLoad(path, "--resumeFrom")
    except AfFileError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"--resumeFrom {path!r} is not a model checkpoint (pt-RUN-stepNNNN.pt) of trainLmAf.py")
    return ckpt


def restoreCudaRngStates(states):
    """The saved CUDA generators of the GPUs this process sees (a checkpoint of an 8-GPU node resumed on fewer GPUs
    holds more states than there are devices), and one line naming what was not restored when the counts differ."""
    visible = torch.cuda.device_count()
    for index, state in enumerate(states[:visible]):
        torch.cuda.set_rng_state(state, index)
    if len(states) != visible:
        unrestored = (f"those of GPUs {visible}-{len(states) - 1} not restored" if len(states) > visible else
                      f"GPUs {len(states)}-{visible - 1} keep their seeded states")
        print(f"Resume: the checkpoint holds the CUDA random states of {len(states)} GPU(s), {visible} visible now: "
              f"restored GPU(s) 0-{min(visible, len(states)) - 1}, {unrestored}", flush=True)


# ----------------------------------------------------------------------------------------------
# Loading a trained model


class LoadError(Exception):
    """A model file or vocabulary that cannot be used; the message is one line for the user."""


def addModelArguments(parser):
    """--modelFile, --modelId and --vocab_file, shared by the scripts that load a trained model."""
    parser.add_argument("--modelFile", required=True, help="model checkpoint pt-RUN-stepNNNN.pt (from --saveModelEvery)")
    parser.add_argument("--modelId", type=int, default=None,
                        help="which model of a phase-I checkpoint to use (default: model 0)")
    parser.add_argument("--vocab_file", default=None,
                        help="GPT-2 vocabulary file (r50k_base.tiktoken / gpt2.tiktoken) to use instead of tiktoken's "
                             "cache and the shipped vocab/r50k_base.tiktoken")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="where the model runs; auto: CUDA if present, else the CPU")


def checkModelArguments(parser, args):
    if args.modelId is not None and args.modelId < 0:
        parser.error(f"--modelId must be >= 0, got {args.modelId}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU; use --device cpu (or auto)")


def exitCode(work, userErrors=(LoadError,)):
    """Run work(); a user error or Ctrl-C becomes one line on stderr and a non-zero exit code, not a traceback."""
    try:
        work()
    except userErrors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


@dataclass
class TrainedModel:
    model: torch.nn.Module  # one N=1 GPT in eval mode on its device
    hyperparameters: dict
    step: int
    modelId: int
    nModels: int
    vocabSize: int
    tokenizer: str = None  # the corpus vocabulary's tokenizer.json text; None: GPT-2

    def describe(self, path):
        return (f"model {path}: step {self.step}, model {self.modelId} of {self.nModels}, "
                f"{self.hyperparameters['nLayers']} layers x {self.hyperparameters['dimEmb']}, "
                f"afType {self.hyperparameters['afType']!r}, contextSize {self.hyperparameters['contextSize']}, "
                f"vocabSize {self.vocabSize}")


def readCheckpoint(path):
    """The checkpoint dict at path (loaded with weights_only=True); LoadError for anything else."""
    try:
        checkpoint = safeTorchLoad(path, "--modelFile")
    except AfFileError as err:
        raise LoadError(str(err)) from None
    marker = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if marker == AF_FILE_FORMAT:
        raise LoadError(f"--modelFile {path!r} is a ptAf file: it holds only the activation functions, not the model; "
                        "give a model checkpoint pt-RUN-stepNNNN.pt (trainLmAf.py writes them with --saveModelEvery)")
    if marker != CHECKPOINT_FORMAT:
        raise LoadError(f"--modelFile {path!r} is not a model checkpoint of trainLmAf.py (no "
                        f"'{CHECKPOINT_FORMAT}' marker); give a pt-RUN-stepNNNN.pt file")
    missing = [key for key in ("hyperparameters", "vocabSize", "model", "step") if key not in checkpoint]
    if missing:
        raise LoadError(f"--modelFile {path!r} is an incomplete checkpoint (no {', '.join(missing)})")
    return checkpoint


def loadModel(path, modelId, device):
    """Model modelId (None: 0) of the checkpoint at path, rebuilt from the hyperparameters stored in it."""
    checkpoint = readCheckpoint(path)
    hyperparameters = checkpoint["hyperparameters"]
    nModels = hyperparameters.get("nModels", 1)
    modelId = 0 if modelId is None else modelId
    if not 0 <= modelId < nModels:
        raise LoadError(f"--modelId {modelId}: {path!r} holds {nModels} model(s), numbered 0 to {nModels - 1}")
    try:
        # Built on the CPU, so attention is SDPA with a dense mask on every device: FlexAttention (what
        # buildModel picks on CUDA) would recompile for every new batch shape, and those vary here.
        stacked = buildModel(hyperparameters, checkpoint["vocabSize"], "cpu")
        stacked.load_state_dict(checkpoint["model"])
    except (ConfigError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(f"--modelFile {path!r}: its weights do not match the model its hyperparameters "
                        f"describe ({reason})") from None
    model = stacked if nModels == 1 else stacked.singleModel(modelId)
    model.requires_grad_(False)
    return TrainedModel(model.to(device).eval(), hyperparameters, int(checkpoint["step"]), modelId,
                        nModels, int(checkpoint["vocabSize"]), checkpoint.get("tokenizer"))


def encodingOf(trained, vocabFile):
    """The tokenizer the model was trained with (tiktoken's Encoding interface) and a line saying which it is: the
    corpus vocabulary the checkpoint carries, else GPT-2's (see gpt2Encoding)."""
    if trained.tokenizer is None:
        encoding, source = gpt2Encoding(vocabFile)
        return encoding, f"GPT-2 vocabulary: {source}"
    if vocabFile:
        raise LoadError("--vocab_file names the GPT-2 vocabulary, but this model was trained with a corpus vocabulary "
                        "that its checkpoint carries; drop --vocab_file")
    try:
        corpusVocabulary = vocabulary.fromJson(trained.tokenizer, "the checkpoint's tokenizer")
    except vocabulary.VocabularyError as err:
        raise LoadError(str(err)) from None
    return vocabulary.BpeEncoding(corpusVocabulary), f"Tokenizer: the checkpoint's {corpusVocabulary.name}"


def gpt2Encoding(vocabFile):
    """The GPT-2 tiktoken Encoding and where its vocabulary came from: vocabFile (a .tiktoken file) or, when None,
    tiktoken's cache, the copy shipped in vocab/, or tiktoken's download (vocabulary.loadGpt2Vocabulary)."""
    import tiktoken

    try:
        params, source = vocabulary.loadGpt2Vocabulary(vocabFile)
    except vocabulary.VocabularyError as err:
        raise LoadError(str(err)) from None
    return tiktoken.Encoding(**params), source


def checkTokensFit(tokens, vocabSize, what):
    """LoadError when a token id is beyond the model's vocabulary (a model trained on data that never held it)."""
    largest = max(tokens, default=-1)
    if largest >= vocabSize:
        raise LoadError(f"{what} holds token id {largest}, but the model knows only ids below {vocabSize} "
                        "(its training data never held a larger one)")
