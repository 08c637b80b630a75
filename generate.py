"""Samples text from a trained model checkpoint: a prompt in, its continuation out.

    python generate.py --modelFile results/pt-RUN-step20000.pt --prompt "The city" --maxNewTokens 100 \\
        --temperature 0.8 --topK 50 --seed 0

The prompt follows <|endoftext|> (a document start, as in training). The model sees at most the last
contextSize tokens (and never more than the seqLength it was trained on), and sampling stops when it
writes the document separator. The text goes to stdout, what was loaded and why it stopped to stderr.
"""
import argparse
import sys

import torch
from tqdm import tqdm

from lmafs.run.checkpoints import addModelArguments, checkModelArguments, checkTokensFit, encodingOf, exitCode, loadModel
from lmafs.cliErrors import OneLineErrorParser
from lmafs.run.runSetup import pickDevice


def pickToken(logits, temperature, topK, generator):
    """Next token from 1-D logits: the most likely one at temperature 0, else a sample among the topK (0: all)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < topK < logits.numel():
        kthLargest = torch.topk(logits, topK).values[-1]
        logits = logits.masked_fill(logits < kthLargest, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def sampleTokens(model, tokens, maxNewTokens, window, temperature, topK, stopToken, nUsable, generator, device):
    """Up to maxNewTokens tokens following tokens, and whether sampling ended at stopToken (not included).

    Each step feeds the last `window` tokens; only ids below nUsable (those the tokenizer can decode) are drawn."""
    tokens, new = list(tokens), []
    for _ in tqdm(range(maxNewTokens), desc="generating", unit="token", disable=None, leave=False):
        context = torch.tensor(tokens[-window:], dtype=torch.int64, device=device)[None, None]
        nextToken = pickToken(model.logits(context)[0, 0, -1, :nUsable], temperature, topK, generator)
        if nextToken == stopToken:
            return new, True
        tokens.append(nextToken)
        new.append(nextToken)
    return new, False


def parseArgs(argv):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    addModelArguments(parser)
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--maxNewTokens", type=int, default=100, help="tokens to write at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: always the most likely token")
    parser.add_argument("--topK", type=int, default=50, help="sample among the K most likely tokens; 0: among all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (same seed, same text on one device)")
    args = parser.parse_args(argv)
    if args.maxNewTokens < 1:
        parser.error(f"--maxNewTokens must be at least 1, got {args.maxNewTokens}")
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.topK < 0:
        parser.error(f"--topK must be >= 0, got {args.topK}")
    checkModelArguments(parser, args)
    return args


def generate(args):
    device = pickDevice(args.device)
    trained = loadModel(args.modelFile, args.modelId, device)
    print(trained.describe(args.modelFile) + f", device {device.type}", file=sys.stderr)
    encoding, vocabLine = encodingOf(trained, args.vocab_file)
    print(vocabLine, file=sys.stderr)
    promptTokens = [encoding.eot_token] + encoding.encode_ordinary(args.prompt)
    checkTokensFit(promptTokens, trained.vocabSize, "--prompt")
    hp = trained.hyperparameters
    window = min(hp["contextSize"], hp["seqLength"])
    # Documents in the training data are separated by tokenDocSep; without one (-1) they still start with <|endoftext|>.
    stopToken = hp["tokenDocSep"] if hp["tokenDocSep"] >= 0 else encoding.eot_token
    generator = torch.Generator(device=device).manual_seed(args.seed)
    # The model's vocabulary is padded to a multiple of 128; ids past the tokenizer's cannot be decoded.
    nUsable = min(trained.vocabSize, encoding.n_vocab)
    new, stopped = sampleTokens(trained.model, promptTokens, args.maxNewTokens, window, args.temperature, args.topK,
                                stopToken, nUsable, generator, device)
    print(args.prompt + encoding.decode(new))
    reason = "the document separator" if stopped else f"--maxNewTokens {args.maxNewTokens}"
    print(f"({len(new)} tokens, stopped at {reason})", file=sys.stderr)


def main(argv=None):
    args = parseArgs(argv)
    return exitCode(lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
