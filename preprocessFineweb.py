"""Turns text (FineWeb streamed from the Hugging Face hub, or a local corpus) into the GPT-2 token shards trainLmAf.py reads, or downloads ready-made ones.

    python preprocessFineweb.py "./data-fineweb10B" --n_shards 8            # FineWeb sample-10BT
    python preprocessFineweb.py "./data-fineweb10B" --n_shards 8 --from_hub # modded-nanogpt's shards
    python preprocessFineweb.py ./data-mine --input "corpus/*.jsonl" --name mine
    python preprocessFineweb.py ./data-v4096 --input corpus.txt --vocabSize 4096   # a vocabulary of the corpus

Every document becomes <|endoftext|> (50256) followed by its GPT-2 tokens; documents are
concatenated in order and cut into shards of exactly --shard_size tokens (a document spills into
the next shard), the last one partial. Shard 0 is validation ({name}_val_000000.bin), the others
training ({name}_train_000001.bin, ...). Shards are written atomically; a rerun re-tokenizes (the
only way to know where later shards start) but keeps shards whose contents are already right.

--vocabSize N trains a byte-level BPE of N ids (<|endoftext|> is id 0) on the training text only, saves it as
tokenizer.json beside the shards and tokenizes with it; the shard headers record its fingerprint. The validation
shard's text never shapes the vocabulary: the BPE learns from the text after a held-out beginning of the corpus,
and is trained again with a longer one until that beginning covers the whole validation shard.
"""
import argparse
import collections
import glob
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import time

import numpy as np
import tiktoken
from tqdm import tqdm

from lmafs.data import tokenShards
from lmafs.data import vocabulary
from lmafs.atomicFiles import atomicWriteText
from lmafs.cliErrors import describeError

FINEWEB_DATASET = "HuggingFaceFW/fineweb"
FINEWEB_CONFIG = "sample-10BT"
HUB_SHARDS_REPO = "kjj0/fineweb10B-gpt2"
DEFAULT_SHARD_SIZE = 10**8
EOT_ID = vocabulary.GPT2_EOT_ID  # <|endoftext|>, the document separator
INPUT_TYPES = (".txt", ".jsonl", ".json", ".parquet")
# Text per worker task: large enough that inter-process traffic is small next to tokenizing,
# small enough that all workers stay busy and the last task does not dominate.
CHUNK_CHARS = 1 << 18
# Tasks queued per worker: keeps workers fed while bounding how much text waits in memory
# (Pool.imap would read the whole corpus ahead of slow workers).
TASKS_PER_WORKER = 4
# The first guess of the validation shard's text, in characters per token (a few-thousand-id BPE of English text
# averages about 3); a longer guess only costs the BPE some training text, a shorter one a retraining.
HELD_OUT_CHARS_PER_TOKEN = 4
DEFAULT_VOCAB_SAMPLE_CHARS = 10**8


class PreprocessError(Exception):
    """A problem with the input, the vocabulary or the network; the message says what to do."""


def quietHubClients():
    # the hub client's retry warnings would bury the one error line
    from huggingface_hub.utils import logging as hubLogging

    hubLogging.set_verbosity_error()


# One tokenizer per process: set by initWorker (called directly when --num_proc 1, else via initPoolWorker).
workerEncoding = None


def makeEncoding(encoder):
    """encoder: ("gpt2", tiktoken Encoding arguments) or ("bpe", a CorpusVocabulary)."""
    kind, spec = encoder
    return tiktoken.Encoding(**spec) if kind == "gpt2" else vocabulary.BpeEncoding(spec)


def initWorker(encoder):
    global workerEncoding
    workerEncoding = makeEncoding(encoder)


def initPoolWorker(encoder):
    # Ctrl-C reaches the whole process group; the main process handles it and terminates the pool,
    # so workers ignore it instead of each printing a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initWorker(encoder)


def tokenizeChunk(texts):
    """Tokens of a list of documents, each as <|endoftext|> followed by its tokens, as one uint16 array."""
    ids = []
    for text in texts:
        ids.append(workerEncoding.eot_token)
        ids.extend(workerEncoding.encode_ordinary(text))
    tokens = np.array(ids, dtype=np.int64)
    if tokens.max() > tokenShards.MAX_TOKEN_ID:
        raise PreprocessError(f"token id {int(tokens.max())} does not fit uint16; the shard format needs a vocabulary of at most 65536 tokens")
    return tokens.astype(np.uint16)


def chunkDocuments(documents):
    chunk, chars = [], 0
    for text in documents:
        chunk.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def startTokenizers(encoder, numProc):
    """A pool of numProc tokenizer processes, or None when this process tokenizes (numProc 1)."""
    if numProc == 1:
        initWorker(encoder)
        return None
    # A BPE was trained in this process with the tokenizers library's threads running: its workers are spawned,
    # as forking a process after those threads ran makes the library disable itself (with a warning) in the copy
    context = multiprocessing.get_context("spawn" if encoder[0] == "bpe" else None)
    return context.Pool(numProc, initializer=initPoolWorker, initargs=(encoder,))


def tokenChunks(documents, pool, numProc):
    """Token arrays of the documents, in document order."""
    if pool is None:
        for chunk in chunkDocuments(documents):
            yield tokenizeChunk(chunk)
        return
    pending = collections.deque()
    for chunk in chunkDocuments(documents):
        pending.append(pool.apply_async(tokenizeChunk, (chunk,)))
        if len(pending) >= numProc * TASKS_PER_WORKER:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------- document sources

def fineWebDocuments():
    """Texts of FineWeb sample-10BT, streamed: documents are tokenized as they arrive, nothing is stored on disk first."""
    import datasets  # imported here: it takes seconds and only this path needs it

    quietHubClients()
    datasets.logging.set_verbosity_error()
    where = f"{FINEWEB_DATASET} ({FINEWEB_CONFIG})"
    try:
        dataset = datasets.load_dataset(FINEWEB_DATASET, name=FINEWEB_CONFIG, split="train", streaming=True)
    except Exception as e:
        raise PreprocessError(f"cannot open {where} on the Hugging Face hub ({describeError(e)}); check the network, or use --from_hub or --input") from None

    def texts():
        try:
            for row in dataset:
                yield row["text"]
        except Exception as e:
            raise PreprocessError(f"streaming {where} from the Hugging Face hub failed ({describeError(e)}); check the network and re-run (complete shards are kept)") from None

    return texts()


def inputFiles(patterns):
    """The files named by --input, globs expanded (sorted), in the order given."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(f"no files match --input '{pattern}'")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise PreprocessError(f"--input {pattern} is not a file; give a file or a glob such as 'corpus/*.jsonl'")
    for path in paths:
        if not path.endswith(INPUT_TYPES):
            raise PreprocessError(f"--input file {path} has an unsupported type; use {', '.join(INPUT_TYPES)}")
    return paths


def fieldText(record, textField, where):
    if not isinstance(record, dict) or textField not in record:
        fields = ", ".join(map(str, record)) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise PreprocessError(f"{where}: no field '{textField}' (fields: {fields}); set --text_field")
    text = record[textField]
    if not isinstance(text, str):
        raise PreprocessError(f"{where}: field '{textField}' holds {type(text).__name__}, not text; set --text_field to a text field")
    return text


def jsonLinesTexts(f, path, textField):
    for lineNumber, line in enumerate(f, 1):
        if line.strip():
            where = f"{path} line {lineNumber}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreprocessError(f"{where} is not valid JSON ({e.msg}); one JSON object per line is expected") from None
            yield fieldText(record, textField, where)


def txtDocuments(text, docChars):
    """A .txt file's text as one document, or (docChars) cut at the first blank line after every docChars characters."""
    if not docChars:
        yield text
        return
    start = 0
    while start < len(text):
        cut = text.find("\n\n", start + docChars)
        end = len(text) if cut < 0 else cut + 2
        yield text[start:end]
        start = end


def fileTexts(path, textField, docChars=None):
    """Texts of one input file, read incrementally where the format allows."""
    if path.endswith(".parquet"):
        import pyarrow.parquet

        parquetFile = pyarrow.parquet.ParquetFile(path)
        if textField not in parquetFile.schema_arrow.names:
            raise PreprocessError(f"{path}: no column '{textField}' (columns: {', '.join(parquetFile.schema_arrow.names)}); set --text_field")
        for batch in parquetFile.iter_batches(columns=[textField], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise PreprocessError(f"{path}: column '{textField}' holds {type(text).__name__}, not text; set --text_field to a text column")
                yield text
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".txt"):
            yield from txtDocuments(f.read(), docChars)
        elif path.endswith(".jsonl"):
            yield from jsonLinesTexts(f, path, textField)
        else:
            # a .json file is either one array of records or JSON lines (as datasets accepts both)
            start = f.read(1)
            while start.isspace():
                start = f.read(1)
            f.seek(0)
            if start == "[":
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise PreprocessError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
                for index, record in enumerate(records):
                    yield fieldText(record, textField, f"{path} record {index}")
            else:
                yield from jsonLinesTexts(f, path, textField)


def localDocuments(paths, textField, docChars=None):
    for path in paths:
        try:
            yield from fileTexts(path, textField, docChars)
        except UnicodeDecodeError as e:
            raise PreprocessError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def shuffledDocuments(documents, seed):
    """All documents in memory, in an order drawn with the seed: every shard, the validation one included, then
    samples the whole corpus instead of one stretch of it."""
    documents = list(documents)
    random.Random(seed).shuffle(documents)
    return documents


# ---------------------------------------------------------------- shards

def shardPath(outDir, name, index):
    return os.path.join(outDir, f"{name}_{'val' if index == 0 else 'train'}_{index:06d}.bin")


def saveShard(path, tokens, overwrite, vocabularyMark):
    """Write the shard unless an identical one (tokens and vocabulary) is already there; True if it was written."""
    if not overwrite:
        try:
            existing = tokenShards.loadShard(path)
            sameVocabulary = tokenShards.readShardVocabulary(path) == vocabularyMark
        except tokenShards.ShardError:
            existing = None  # missing or broken: write it
        if existing is not None and sameVocabulary and existing.size == tokens.size and np.array_equal(existing, tokens):
            return False
    tokenShards.writeShard(path, tokens, vocabularyMark)
    return True


def removeLeftovers(outDir, name):
    """Delete temporary files that an interrupted run left behind (writeShard names them '<shard>.<pid>.tmp')."""
    for path in sorted(glob.glob(os.path.join(glob.escape(outDir), f"{glob.escape(name)}_*.bin.*.tmp"))):
        os.remove(path)
        print(f"removed {path} (left by an interrupted run)")


def writeShards(chunks, outDir, name, shardSize, nShards, overwrite, vocabularyMark=None):
    """Cut the token stream into shards; returns (number of shards, total tokens, shards written)."""
    buffer = np.empty(shardSize, dtype=np.uint16)
    fill = index = total = written = 0

    def finish(tokens):
        path = shardPath(outDir, name, index)
        wrote = saveShard(path, tokens, overwrite, vocabularyMark)
        tqdm.write(f"{'wrote' if wrote else 'kept '} {path} ({tokens.size:,} tokens{'' if wrote else ', already complete'})")
        return wrote

    # disable=None: a bar on a terminal only; logs and pipes get the per-shard lines without carriage-return noise
    with tqdm(total=nShards * shardSize if nShards else None, unit="tok", unit_scale=True, mininterval=1, disable=None) as progress:
        for chunk in chunks:
            used = 0
            while used < chunk.size:
                take = min(shardSize - fill, chunk.size - used)
                buffer[fill:fill + take] = chunk[used:used + take]
                fill += take
                used += take
                if fill == shardSize:
                    written += finish(buffer)
                    index += 1
                    fill = 0
                    if index == nShards:
                        progress.update(used)
                        return index, total + used, written
            total += used
            progress.update(used)
        if fill:
            written += finish(buffer[:fill])
            index += 1
    return index, total, written


def warnAboutExtraShards(outDir, name, nWritten):
    """Shards of an earlier, longer run would be read by the trainer's glob as if they belonged to this one."""
    pattern = re.compile(rf"{re.escape(name)}_(?:val|train)_(\d{{6}})\.bin")
    extra = sorted(f for f in os.listdir(outDir) if (m := pattern.fullmatch(f)) and int(m.group(1)) >= nWritten)
    if extra:
        print(f"note: {len(extra)} shard file(s) beyond this run's last shard are in {outDir} (e.g. {extra[0]}), from an earlier run; delete them if training should not read them", file=sys.stderr)


# ---------------------------------------------------------------- a vocabulary of the corpus

def textAfter(documents, skipChars, sampleChars, seen):
    """The documents' text from character skipChars on, at most sampleChars of it; seen["chars"] counts what went out."""
    for text in documents:
        if skipChars >= len(text):
            skipChars -= len(text)
            continue
        text, skipChars = text[skipChars:sampleChars - seen["chars"] + skipChars], 0
        seen["chars"] += len(text)
        yield text
        if seen["chars"] >= sampleChars:
            return


def validationChars(documents, encoding, shardSize):
    """How many characters of the documents the first shardSize tokens (the validation shard) cover."""
    nTokens = chars = 0
    for text in documents:
        encoded = encoding.tokenizer.encode(text, add_special_tokens=False)
        nTokens += 1  # <|endoftext|> before each document
        if nTokens + len(encoded.ids) >= shardSize:
            inShard = shardSize - nTokens
            return chars + (encoded.offsets[inShard - 1][1] if inShard > 0 else 0)
        nTokens += len(encoded.ids)
        chars += len(text)
    return chars


def trainCorpusVocabulary(openDocuments, args):
    """Train the BPE on the training text (after the validation shard's), write tokenizer.json; its CorpusVocabulary."""
    heldOut = args.shard_size * HELD_OUT_CHARS_PER_TOKEN
    startTime = time.time()
    for attempt in range(1, 6):
        seen = {"chars": 0}
        print(f"training a byte-level BPE of {args.vocabSize:,} ids on at most {args.vocabSampleChars:,} characters "
              f"of the training text (the text after the first {heldOut:,} characters, which hold the validation shard)",
              flush=True)
        tokenizer = vocabulary.trainBpe(textAfter(openDocuments(), heldOut, args.vocabSampleChars, seen), args.vocabSize,
                                        showProgress=sys.stderr.isatty())
        if tokenizer.get_vocab_size() < args.vocabSize:
            raise PreprocessError(f"the corpus is too small to train a vocabulary of {args.vocabSize:,} ids: its training "
                                  f"text ({seen['chars']:,} characters after the validation shard) gives only "
                                  f"{tokenizer.get_vocab_size():,}; lower --vocabSize or --shard_size, or add text")
        trained = vocabulary.fromJson(tokenizer.to_str(), "the trained BPE")
        covered = validationChars(openDocuments(), vocabulary.BpeEncoding(trained), args.shard_size)
        if covered <= heldOut:
            break
        print(f"the validation shard covers {covered:,} characters, more than the {heldOut:,} held out: training again")
        heldOut = covered + covered // 20 + 1
    else:
        raise PreprocessError("the validation shard's text kept growing past the held-out text after 5 BPE trainings; "
                              "lower --shard_size")
    print(f"trained the BPE in {time.time() - startTime:.1f} s on {seen['chars']:,} characters (the validation "
          f"shard's {covered:,} held out); {trained.name}")
    return trained


def writeTokenizerFile(outDir, trained):
    path = os.path.join(outDir, vocabulary.TOKENIZER_FILE)
    atomicWriteText(path, trained.json)
    print(f"wrote {path}")


def removeStaleTokenizer(outDir):
    """A tokenizer.json of an earlier --vocabSize run would contradict the GPT-2 shards written now."""
    path = os.path.join(outDir, vocabulary.TOKENIZER_FILE)
    if os.path.exists(path):
        os.remove(path)
        print(f"removed {path} (an earlier run's corpus vocabulary; these shards are GPT-2's)")


def preprocess(args):
    paths = inputFiles(args.input) if args.input else None
    if paths and args.shuffleDocs is not None:
        documents = shuffledDocuments(localDocuments(paths, args.text_field, args.txtDocChars), args.shuffleDocs)
        openDocuments = lambda: iter(documents)  # noqa: E731
        what = f"{len(paths)} input file(s), {len(documents):,} documents in an order drawn with seed {args.shuffleDocs}"
    elif paths:
        openDocuments = lambda: localDocuments(paths, args.text_field, args.txtDocChars)  # noqa: E731
        what = f"{len(paths)} input file(s)"
    else:
        openDocuments = fineWebDocuments  # the stream starts again at its first document each time
        what = f"{FINEWEB_DATASET} ({FINEWEB_CONFIG}), streamed"
    if args.vocabSize:
        trained = trainCorpusVocabulary(openDocuments, args)
        encoder, mark = ("bpe", trained), (trained.size, trained.fingerprint)
    else:
        encodingParams, source = vocabulary.loadGpt2Vocabulary(args.vocab_file)
        print(f"GPT-2 vocabulary: {source}")
        encoder, mark = ("gpt2", encodingParams), None
    os.makedirs(args.outDir, exist_ok=True)
    removeLeftovers(args.outDir, args.name)
    if args.vocabSize:
        writeTokenizerFile(args.outDir, trained)
    else:
        removeStaleTokenizer(args.outDir)
    # the pool is forked before the dataset client starts its threads: forking a threaded process can deadlock
    pool = startTokenizers(encoder, args.num_proc)
    try:
        documents = openDocuments()
        limit = f"at most {args.n_shards}" if args.n_shards else "all"
        print(f"tokenizing {what} with {args.num_proc} process(es) into {args.outDir}: {limit} shards of {args.shard_size:,} tokens")
        startTime = time.time()
        chunks = tokenChunks(documents, pool, args.num_proc)
        nShards, total, written = writeShards(chunks, args.outDir, args.name, args.shard_size, args.n_shards, args.overwrite, mark)
        seconds = time.time() - startTime
    finally:
        if pool is not None:
            pool.terminate()
    if total == 0:
        raise PreprocessError("the input holds no documents")
    print(f"done: {total:,} tokens in {nShards} shard(s) ({written} written, {nShards - written} already complete) in {seconds:.1f} s = {total / max(seconds, 1e-9):,.0f} tokens/s")
    if nShards == 1:
        print("note: all tokens fit in the validation shard, so there is no training shard; lower --shard_size", file=sys.stderr)
    warnAboutExtraShards(args.outDir, args.name, nShards)


# ---------------------------------------------------------------- ready-made shards

def downloadFromHub(args):
    """Fetch modded-nanogpt's GPT-2 FineWeb shards (same format) into outDir, checking every header."""
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    quietHubClients()
    where = f"the Hugging Face hub dataset {HUB_SHARDS_REPO}"
    if args.n_shards:
        names = [os.path.basename(shardPath("", "fineweb", i)) for i in range(args.n_shards)]
    else:
        try:
            files = list_repo_files(HUB_SHARDS_REPO, repo_type="dataset")
        except Exception as e:
            raise PreprocessError(f"cannot list {where} ({describeError(e)}); check the network") from None
        # val (index 0) first, then training shards by index
        names = sorted((f for f in files if re.fullmatch(r"fineweb_(val|train)_\d{6}\.bin", f)), key=lambda f: f[-10:])
    os.makedirs(args.outDir, exist_ok=True)
    for name in names:
        path = os.path.join(args.outDir, name)
        if not args.overwrite:
            try:
                count = tokenShards.readShardHeader(path)
                print(f"kept {path} ({count:,} tokens, already complete)")
                continue
            except tokenShards.ShardError:
                pass  # missing or incomplete: download it
        try:
            path = hf_hub_download(HUB_SHARDS_REPO, name, repo_type="dataset", local_dir=args.outDir, force_download=args.overwrite)
        except EntryNotFoundError as e:
            if isinstance(e, LocalEntryNotFoundError):  # raised when the hub cannot be reached
                raise PreprocessError(f"cannot download {name} from {where} ({describeError(e)}); check the network") from None
            raise PreprocessError(f"{where} has no file {name}; lower --n_shards") from None
        except Exception as e:
            raise PreprocessError(f"cannot download {name} from {where} ({describeError(e)}); check the network") from None
        print(f"downloaded {path} ({tokenShards.readShardHeader(path):,} tokens)")


# ---------------------------------------------------------------- command line

def usableCpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parseArgs(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outDir", nargs="?", default="./data-fineweb10B", help="folder the shards are written to (default: ./data-fineweb10B)")
    parser.add_argument("--n_shards", type=int, default=None, help="write at most this many shards, validation included (default: all the data)")
    parser.add_argument("--shard_size", type=int, default=None, help=f"tokens per shard (default {DEFAULT_SHARD_SIZE:,}; not with --from_hub)")
    parser.add_argument("--num_proc", type=int, default=usableCpus(), help="tokenizer processes (default: all usable cores)")
    parser.add_argument("--from_hub", action="store_true", help=f"download the ready-made GPT-2 FineWeb shards of {HUB_SHARDS_REPO} instead of tokenizing")
    parser.add_argument("--input", action="append", metavar="PATH_OR_GLOB", help=f"tokenize local files instead of FineWeb: {', '.join(INPUT_TYPES)} (a .txt file is one document); quote globs; repeat the flag for more")
    parser.add_argument("--text_field", default="text", help="field holding the text in .jsonl/.json/.parquet input (default: text)")
    parser.add_argument("--name", default="fineweb", help="file-name prefix of the shards: NAME_val_000000.bin, NAME_train_000001.bin, ... (default: fineweb)")
    parser.add_argument("--vocab_file", default=None, help="GPT-2 vocabulary file (r50k_base.tiktoken / gpt2.tiktoken) to use instead of tiktoken's cache and the shipped vocab/r50k_base.tiktoken")
    parser.add_argument("--overwrite", action="store_true", help="rewrite shards even when an identical complete one exists")
    parser.add_argument("--txtDocChars", type=int, default=None, metavar="CHARS",
                        help="cut each .txt input into documents at the first blank line after every CHARS characters (default: a .txt file is one document)")
    parser.add_argument("--shuffleDocs", type=int, default=None, metavar="SEED",
                        help="--input: put the documents in an order drawn with SEED before tokenizing, so that the validation shard and every training shard sample the whole corpus (holds the corpus in memory; default: file order)")
    parser.add_argument("--vocabSize", type=int, default=None, metavar="N",
                        help=f"train a byte-level BPE of N ids ({vocabulary.MIN_VOCAB_SIZE:,} to {vocabulary.MAX_VOCAB_SIZE:,}) on the training text and tokenize with it instead of GPT-2's; saved as OUTDIR/{vocabulary.TOKENIZER_FILE} (default: the GPT-2 vocabulary)")
    parser.add_argument("--vocabSampleChars", type=int, default=DEFAULT_VOCAB_SAMPLE_CHARS, metavar="CHARS",
                        help=f"--vocabSize: the BPE learns from at most this many characters of the training text, the first after the validation shard (default {DEFAULT_VOCAB_SAMPLE_CHARS:,}; a smaller corpus is used whole)")
    args = parser.parse_args(argv)
    if args.n_shards is not None and args.n_shards < 1:
        raise PreprocessError(f"--n_shards must be at least 1, got {args.n_shards}")
    if args.num_proc < 1:
        raise PreprocessError(f"--num_proc must be at least 1, got {args.num_proc}")
    if args.vocabSize is not None and not vocabulary.MIN_VOCAB_SIZE <= args.vocabSize <= vocabulary.MAX_VOCAB_SIZE:
        raise PreprocessError(f"--vocabSize must be between {vocabulary.MIN_VOCAB_SIZE} (the 256 bytes and <|endoftext|>) and {vocabulary.MAX_VOCAB_SIZE:,} (shards store ids as uint16), got {args.vocabSize}")
    if args.txtDocChars is not None and args.txtDocChars < 1:
        raise PreprocessError(f"--txtDocChars must be at least 1, got {args.txtDocChars}")
    if args.shuffleDocs is not None and not args.input:
        raise PreprocessError("--shuffleDocs needs --input (a streamed corpus cannot be reordered)")
    if args.vocabSampleChars < 1:
        raise PreprocessError(f"--vocabSampleChars must be at least 1, got {args.vocabSampleChars}")
    if args.vocabSize is not None and args.vocab_file:
        raise PreprocessError("--vocab_file names the GPT-2 vocabulary and --vocabSize trains one of the corpus; drop one of them")
    if args.from_hub:
        for flag, given in (("--input", args.input), ("--shard_size", args.shard_size is not None), ("--name", args.name != "fineweb"), ("--vocabSize", args.vocabSize is not None)):
            if given:
                raise PreprocessError(f"{flag} does not apply to --from_hub (the hub holds fixed shards fineweb_*.bin of {DEFAULT_SHARD_SIZE:,} tokens); drop one of them")
    else:
        args.shard_size = DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size
        if not 1 <= args.shard_size <= tokenShards.MAX_HEADER_COUNT:
            raise PreprocessError(f"--shard_size must be between 1 and {tokenShards.MAX_HEADER_COUNT}, got {args.shard_size}")
        if not re.fullmatch(r"[\w.-]+", args.name):
            raise PreprocessError(f"--name '{args.name}' must be letters, digits, '_', '-' or '.' (it becomes part of file names)")
    return args


def main(argv=None):
    try:
        args = parseArgs(argv)
        if args.from_hub:
            downloadFromHub(args)
        else:
            preprocess(args)
    except (PreprocessError, tokenShards.ShardError, vocabulary.VocabularyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; complete shards are kept, re-run the same command to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
