"""Turning a model checkpoint of trainLmAf.py (pt-RUN-stepNNNN.pt) back into a runnable model, with the GPT-2 tokenizer it reads."""
import sys
from dataclasses import dataclass

import torch

import afFiles
import trainLmAf


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

    def describe(self, path):
        return (f"model {path}: step {self.step}, model {self.modelId} of {self.nModels}, "
                f"{self.hyperparameters['nLayers']} layers x {self.hyperparameters['dimEmb']}, "
                f"afType {self.hyperparameters['afType']!r}, contextSize {self.hyperparameters['contextSize']}, "
                f"vocabSize {self.vocabSize}")


def pickDevice(name="auto"):
    """The device --device names; auto: CUDA if present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def readCheckpoint(path):
    """The checkpoint dict at path (loaded with weights_only=True); LoadError for anything else."""
    try:
        checkpoint = afFiles.safeTorchLoad(path, "--modelFile")
    except afFiles.AfFileError as err:
        raise LoadError(str(err)) from None
    marker = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if marker == afFiles.FORMAT:
        raise LoadError(f"--modelFile {path!r} is a ptAf file: it holds only the activation functions, not the model; "
                        "give a model checkpoint pt-RUN-stepNNNN.pt (trainLmAf.py writes them with --saveModelEvery)")
    if marker != trainLmAf.CHECKPOINT_FORMAT:
        raise LoadError(f"--modelFile {path!r} is not a model checkpoint of trainLmAf.py (no "
                        f"'{trainLmAf.CHECKPOINT_FORMAT}' marker); give a pt-RUN-stepNNNN.pt file")
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
        stacked = trainLmAf.buildModel(hyperparameters, checkpoint["vocabSize"], "cpu")
        stacked.load_state_dict(checkpoint["model"])
    except (trainLmAf.ConfigError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(f"--modelFile {path!r}: its weights do not match the model its hyperparameters "
                        f"describe ({reason})") from None
    model = stacked if nModels == 1 else stacked.singleModel(modelId)
    model.requires_grad_(False)
    return TrainedModel(model.to(device).eval(), hyperparameters, int(checkpoint["step"]), modelId,
                        nModels, int(checkpoint["vocabSize"]))


def gpt2Encoding(vocabFile):
    """The GPT-2 tiktoken Encoding and where its vocabulary came from: vocabFile (a .tiktoken file) or, when None,
    tiktoken's cache, the copy shipped in vocab/, or tiktoken's download (as preprocessFineweb.py finds it)."""
    import tiktoken

    from preprocessFineweb import PreprocessError, loadVocabulary

    try:
        params, source = loadVocabulary(vocabFile)
    except PreprocessError as err:
        raise LoadError(str(err)) from None
    return tiktoken.Encoding(**params), source


def checkTokensFit(tokens, vocabSize, what):
    """LoadError when a token id is beyond the model's vocabulary (a model trained on data that never held it)."""
    largest = max(tokens, default=-1)
    if largest >= vocabSize:
        raise LoadError(f"{what} holds token id {largest}, but the model knows only ids below {vocabSize} "
                        "(its training data never held a larger one)")
