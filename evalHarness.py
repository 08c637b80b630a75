"""Our checkpoints in lm-evaluation-harness: the model adapter `lmafs` (registered when this module is imported) and a
thin command line around lm_eval.simple_evaluate that prints the harness's table.

    python evalHarness.py --modelFile results/pt-RUN-step20000.pt --tasks lambada_openai,hellaswag --limit 100
    python evalHarness.py --modelFile results/pt-RUN-step20000.pt --tasks my_task --include_path my_tasks/

or from Python, after `import evalHarness`:  lm_eval.simple_evaluate(model="lmafs", model_args={"modelFile": PATH}, ...)

The adapter reads a pt-RUN-stepNNNN.pt checkpoint (phase-I model 0, or modelId) and the GPT-2 tokenizer as the other
scripts do. Texts are scored as in training: after <|endoftext|> (a document start), at most seqLength tokens per
forward pass, the model's own sliding window (contextSize) inside. loglikelihood scores a continuation after its
context (an empty context: after <|endoftext|> alone); loglikelihood_rolling cuts a text into windows of seqLength
predicted tokens, each with the previous token as context, exactly the validation sequences of trainLmAf.py, so a
text of k * seqLength tokens gets -(validation loss) * k * seqLength; generate_until writes greedily (or samples, with
temperature > 0) until a stop string, <|endoftext|> or max_gen_toks.
"""
import argparse
import sys

import torch

from lmafs.run.checkpoints import LoadError, addModelArguments, checkModelArguments, encodingOf, exitCode, loadModel
from lmafs.cliErrors import OneLineErrorParser
from generate import pickToken
from lmafs.run.runSetup import pickDevice

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise SystemExit("error: evalHarness.py needs lm-evaluation-harness; install it with: pip install lm-eval") from None


# Tokens per forward pass at most: the float32 logits of 8192 tokens over GPT-2's vocabulary take 1.6 GB.
TOKENS_PER_PASS = 8192


class HarnessError(Exception):
    """A task list or request the harness cannot run; the message is one line for the user."""


@register_model("lmafs")
class LmAfsModel(TemplateLM):
    """lm_eval model for trainLmAf.py checkpoints; model_args: modelFile, modelId, vocab_file, batch_size, device."""

    def __init__(self, modelFile, modelId=None, vocab_file=None, batch_size=None, device=None, **unused):
        # unused: what simple_evaluate passes every model by name (max_batch_size, ...), meaningless here
        super().__init__()
        self._device = pickDevice(device or "auto")
        self.trained = loadModel(modelFile, None if modelId in (None, "") else int(modelId), self._device)
        self.encoding, self.vocabLine = encodingOf(self.trained, vocab_file)
        self.maxLength = int(self.trained.hyperparameters["seqLength"])
        # lm_eval passes "auto" or a number (possibly as text)
        self.batchSize = int(batch_size) if str(batch_size).isdigit() else \
            (64 if self._device.type == "cuda" else 16)

    @property
    def eot_token_id(self):
        return self.encoding.eot_token

    @property
    def tokenizer_name(self):
        return "gpt2-r50k_base"

    @property
    def device(self):
        return self._device

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.encoding.encode_ordinary(string)

    def tok_decode(self, tokens):
        return self.encoding.decode(tokens)

    def checkFits(self, tokens):
        largest = max(tokens, default=-1)
        if largest >= self.trained.vocabSize:
            raise HarnessError(f"a request holds token id {largest}, but the model knows only ids below "
                               f"{self.trained.vocabSize} (its training data never held a larger one)")

    def batches(self, order, lengths):
        """Consecutive slices of order (longest first) of at most batchSize rows and TOKENS_PER_PASS tokens."""
        start = 0
        while start < len(order):
            rows = max(1, min(self.batchSize, TOKENS_PER_PASS // max(1, lengths[order[start]])))
            yield order[start:start + rows]
            start += rows

    @torch.no_grad()
    def scoreTokens(self, pairs):
        """(sum of log p(continuation | context), whether every continuation token is the most likely one) per
        (contextTokens, continuationTokens) pair; at most maxLength tokens are fed, the oldest context dropped."""
        results = [None] * len(pairs)
        fed = [(context + continuation)[-(self.maxLength + 1):][:-1] for context, continuation in pairs]
        # longest first, so batches pad little; padding after a sequence cannot change it (the mask is causal)
        order = sorted(range(len(pairs)), key=lambda i: -len(fed[i]))
        for rows in self.batches(order, [len(f) for f in fed]):
            length = len(fed[rows[0]])
            tokens = torch.zeros(len(rows), length, dtype=torch.int64, device="cpu")
            for row, i in enumerate(rows):
                self.checkFits(pairs[i][0] + pairs[i][1])
                tokens[row, :len(fed[i])] = torch.tensor(fed[i], dtype=torch.int64, device="cpu")
            logits = self.trained.model.logits(tokens[None].to(self._device))[0]
            for row, i in enumerate(rows):
                continuation = pairs[i][1]
                predicted = logits[row, len(fed[i]) - len(continuation):len(fed[i])]
                target = torch.tensor(continuation, dtype=torch.int64, device=self._device)
                logProb = float(predicted.log_softmax(-1).gather(-1, target[:, None]).double().sum())
                results[i] = (logProb, bool((predicted.argmax(-1) == target).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        # A document starts after <|endoftext|>, in training and here: the harness adds it only to empty contexts.
        pairs = [(context if strings[0] == "" else [self.eot_token_id] + context, continuation)
                 for strings, context, continuation in requests]
        for (strings, _, continuation) in requests:
            if not continuation:
                raise HarnessError(f"empty continuation to score after {strings[0]!r}")
            if len(continuation) > self.maxLength:
                raise HarnessError(f"a continuation of {len(continuation)} tokens is longer than the model's "
                                   f"seqLength {self.maxLength}")
        return self.scoreTokens(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        totals = []
        for request in requests:
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.eot_token_id,
                max_seq_len=self.maxLength, context_len=1)]
            totals.append(sum(logProb for logProb, _ in self.scoreTokens(windows)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        outputs = []
        hp = self.trained.hyperparameters
        window = min(hp["contextSize"], hp["seqLength"])
        nUsable = min(self.trained.vocabSize, self.encoding.n_vocab)  # ids the tokenizer can decode
        generator = torch.Generator(device=self._device).manual_seed(0)
        for request in requests:
            context, genKwargs = request.args
            genKwargs = dict(genKwargs or {})
            until = genKwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            maxNew = int(genKwargs.pop("max_gen_toks", 256))
            temperature = float(genKwargs.pop("temperature", 0.0)) if genKwargs.pop("do_sample", True) else 0.0
            topK = int(genKwargs.pop("top_k", 0) or 0)
            tokens = [self.eot_token_id] + self.tok_encode(context)
            self.checkFits(tokens)
            new = []
            text = ""
            for _ in range(maxNew):
                inputs = torch.tensor(tokens[-window:], dtype=torch.int64, device=self._device)[None, None]
                nextToken = pickToken(self.trained.model.logits(inputs)[0, 0, -1, :nUsable], temperature, topK,
                                      generator)
                if nextToken == self.eot_token_id:
                    break
                tokens.append(nextToken)
                new.append(nextToken)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


# ----------------------------------------------------------------------------------------------
# Command line


def parseArgs(argv):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    addModelArguments(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated harness task (or group) names")
    parser.add_argument("--include_path", default=None, help="folder of your own task YAML files")
    parser.add_argument("--limit", type=float, default=None,
                        help="at most this many documents per task (a fraction below 1: that share of them)")
    parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batchSize", type=int, default=None,
                        help="sequences per forward pass (default: 64 on a GPU, 16 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the harness's sampling of few-shot examples")
    args = parser.parse_args(argv)
    if args.limit is not None and not args.limit > 0:
        parser.error(f"--limit must be > 0, got {args.limit:g}")
    if args.batchSize is not None and args.batchSize < 1:
        parser.error(f"--batchSize must be at least 1, got {args.batchSize}")
    checkModelArguments(parser, args)
    return args


def evaluate(args):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    taskManager = TaskManager(include_path=args.include_path)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = [task for task in tasks if not taskManager.match_tasks([task])]
    if unknown:
        raise HarnessError(f"--tasks: unknown task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists the harness's, "
                           "--include_path adds a folder of your own task YAML files")
    model = LmAfsModel(args.modelFile, args.modelId, args.vocab_file, args.batchSize, args.device)
    print(model.trained.describe(args.modelFile) + f", device {model.device.type}")
    print(model.vocabLine)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=taskManager, limit=limit,
                                      num_fewshot=args.num_fewshot, random_seed=args.seed,
                                      fewshot_random_seed=args.seed, log_samples=False)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return results


def main(argv=None):
    args = parseArgs(argv)
    return exitCode(lambda: evaluate(args), (LoadError, HarnessError))


if __name__ == "__main__":
    sys.exit(main())
