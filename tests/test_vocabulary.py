"""A corpus vocabulary end to end: preprocessFineweb.py --vocabSize trains a byte-level BPE on the training text only,
writes it as a standard tokenizer.json and records its fingerprint in the shard headers; trainLmAf.py takes vocabSize
and tokenDocSep from it, refuses mixed or mismatched vocabularies with one line before writing anything, carries the
tokenizer in its checkpoints and resumes exactly; generate.py, evalBlimp.py and evalHarness.py tokenize with it."""
import csv
import glob
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmafs.run import checkpoints
import evalBlimp
import generate
import trainLmAf
from lmafs.data import vocabulary
from conftest import REPO, tinyFlags
from lmafs.data.tokenShards import HEADER_BYTES, HEADER_DTYPE, MAGIC, VERSION, loadShard, readShardHeader, readShardVocabulary, writeShard

SCRIPT = os.path.join(REPO, "preprocessFineweb.py")
BLIMP_SAMPLE = os.path.join(REPO, "tests", "data", "blimp-sample")
VOCAB = 400
SHARD = 2000
# only in the validation shard's documents: a vocabulary trained on all the text would learn it
VALIDATION_WORD = "zyxwvutsrq"
WORDS = ["the", "The", "king", "queen", "shall", "not", "be", "to", "and", "of", "my", "lord", "good", "night",
         "sweet", "prince", "what", "is", "this", "that", "thou", "art", "hath", "come", "go", "here", "there", "o",
         "ROMEO:", "JULIET:", ",", ".", "!", "?", "\n", "\n\n", "café", "don't"]


def makeDocuments(seed=0, n=80):
    """Documents of common words and of random ones (letters a to p: never those of VALIDATION_WORD), so that the
    BPE always has pairs left to merge; the first document, inside the validation shard, repeats VALIDATION_WORD."""
    rng = random.Random(seed)
    rare = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 8))) for _ in range(300)]
    documents = [" ".join(rng.choice(WORDS if rng.random() < 0.7 else rare) for _ in range(rng.randint(40, 160)))
                 for _ in range(n)]
    documents[0] = " ".join([VALIDATION_WORD] * 60 + [documents[0]])
    return documents


def writeJsonl(path, documents):
    with open(path, "w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


def preprocess(outDir, *args, check=True):
    result = subprocess.run([sys.executable, SCRIPT, str(outDir)] + [str(a) for a in args], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assertOneErrorLine(result, code, *fragments):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpeCorpus")
    documents = makeDocuments()
    path = writeJsonl(folder / "docs.jsonl", documents)
    data = folder / "data"
    result = preprocess(data, "--input", path, "--shard_size", SHARD, "--vocabSize", VOCAB, "--num_proc", 2)
    return {"documents": documents, "path": path, "data": data, "stdout": result.stdout}


@pytest.fixture(scope="module")
def otherCorpus(tmp_path_factory):
    """The same documents under another vocabulary size: shards of a different vocabulary."""
    folder = tmp_path_factory.mktemp("bpeOther")
    path = writeJsonl(folder / "docs.jsonl", makeDocuments())
    preprocess(folder / "data", "--input", path, "--shard_size", SHARD, "--vocabSize", VOCAB + 10, "--num_proc", 1)
    return folder / "data"


def tokenizerFile(data):
    return os.path.join(data, vocabulary.TOKENIZER_FILE)


def independentTokens(data, documents):
    """The documents as the trained tokenizer.json encodes them, loaded by the tokenizers library itself."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizerFile(data))
    tokenizer.encode_special_tokens = True
    eot = tokenizer.token_to_id(vocabulary.EOT_TEXT)
    tokens = []
    for text in documents:
        tokens.append(eot)
        tokens.extend(tokenizer.encode(text, add_special_tokens=False).ids)
    return np.array(tokens, dtype=np.int64)


def shardFiles(data):
    return sorted(glob.glob(os.path.join(data, "fineweb_val_*.bin"))) + sorted(glob.glob(os.path.join(data, "fineweb_train_*.bin")))


# ---------------------------------------------------------------- the vocabulary and the shards


def testShardsHoldTheDocumentsAsTheirTokenizerJsonEncodesThem(corpus):
    files = shardFiles(corpus["data"])
    assert len(files) >= 3 and all(readShardHeader(p) == SHARD for p in files[:-1])
    stored = np.concatenate([np.asarray(loadShard(p), dtype=np.int64) for p in files])
    np.testing.assert_array_equal(stored, independentTokens(corpus["data"], corpus["documents"]))
    assert stored.max() < VOCAB and stored[0] == 0  # <|endoftext|> is id 0 and opens the first document


def testTokenizerRoundTripsTextItNeverSaw(corpus):
    """Byte-level BPE covers every byte: characters absent from the corpus encode and decode back exactly, with the
    tokenizers library and with transformers' fast tokenizer on the same file."""
    from tokenizers import Tokenizer

    texts = ["ROMEO: good night, sweet prince.", "東京 🤖 naïve ☃", "tabs\tand\nnew lines  ", "\x00\x7f", ""]
    ours = vocabulary.BpeEncoding(vocabulary.readTokenizerFile(tokenizerFile(corpus["data"])))
    library = Tokenizer.from_file(tokenizerFile(corpus["data"]))
    for text in texts:
        ids = ours.encode_ordinary(text)
        assert ours.decode(ids) == text
        assert ids == library.encode(text, add_special_tokens=False).ids
    assert ours.encode_ordinary("<|endoftext|>") != [ours.eot_token]  # written text, as tiktoken's encode_ordinary
    assert len(ours.encode_ordinary("東京")) == len("東京".encode())  # unseen: one id per byte
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizerFile(corpus["data"]))
    assert fast.vocab_size == VOCAB and fast.convert_tokens_to_ids(vocabulary.EOT_TEXT) == 0
    assert fast.decode(fast.encode(texts[1])) == texts[1]


def testValidationTextNeverShapesTheVocabulary(corpus):
    vocab = json.load(open(tokenizerFile(corpus["data"]), encoding="utf-8"))["model"]["vocab"]
    assert not [token for token in vocab if "zy" in token]
    assert "held out" in corpus["stdout"] and "trained the BPE in" in corpus["stdout"]
    # the control: a BPE of the same size trained on all of the text does learn the validation-only word
    everything = vocabulary.trainBpe(iter(corpus["documents"]), VOCAB, showProgress=False)
    assert [token for token in everything.get_vocab() if "zy" in token]


def testHeadersRecordTheVocabularyInSlotsOtherReadersIgnore(corpus):
    trained = vocabulary.readTokenizerFile(tokenizerFile(corpus["data"]))
    assert trained.size == VOCAB and trained.eotId == 0
    for path in shardFiles(corpus["data"]):
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype=HEADER_DTYPE)
        # what llm.c and modded-nanogpt read: magic, version, count; the rest of the header stays zero
        assert tuple(header[:3]) == (MAGIC, VERSION, readShardHeader(path))
        assert header[3] == VOCAB and header[4:8].tobytes() == trained.fingerprint and not header[8:].any()
        assert readShardVocabulary(path) == (VOCAB, trained.fingerprint)


def testGpt2ShardsRecordNoVocabulary(tmp_path):
    path = str(tmp_path / "fineweb_val_000000.bin")
    writeShard(path, [50256, 1, 2])
    with open(path, "rb") as f:
        assert not np.frombuffer(f.read(HEADER_BYTES), dtype=HEADER_DTYPE)[3:].any()
    assert readShardVocabulary(path) is None and vocabulary.ofShards([path]) is None


def testFingerprintIgnoresFormattingButNotTheVocabulary(corpus):
    text = open(tokenizerFile(corpus["data"]), encoding="utf-8").read()
    spec = json.loads(text)
    assert vocabulary.fingerprint(json.dumps(spec, indent=4)) == vocabulary.fingerprint(text)
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    assert vocabulary.fingerprint(json.dumps(spec)) != vocabulary.fingerprint(text)


def testRerunKeepsShardsAndTokenizer(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus["data"], data)
    before = {p: open(p, "rb").read() for p in shardFiles(data) + [tokenizerFile(data)]}
    result = preprocess(data, "--input", corpus["path"], "--shard_size", SHARD, "--vocabSize", VOCAB, "--num_proc", 1)
    assert f"(0 written, {len(before) - 1} already complete)" in result.stdout
    assert {p: open(p, "rb").read() for p in before} == before


def testGpt2RunRemovesAStaleTokenizer(corpus, tmp_path, offline):
    data = tmp_path / "data"
    shutil.copytree(corpus["data"], data)
    result = preprocess(data, "--input", corpus["path"], "--shard_size", SHARD, "--num_proc", 1)
    assert not os.path.exists(tokenizerFile(data)) and "removed" in result.stdout
    written = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert written and all(readShardVocabulary(p) is None for p in written)
    # GPT-2 needs fewer tokens: the earlier run's last shards are left, named in a note, and refused by the trainer
    stale = sorted(set(shardFiles(data)) - {os.path.abspath(p) if os.path.isabs(p) else p for p in written})
    assert stale and "beyond this run's last shard" in result.stderr
    with pytest.raises(vocabulary.VocabularyError, match="different vocabularies"):
        vocabulary.ofShards(shardFiles(data))


@pytest.mark.parametrize("args, fragments", [
    (["--vocabSize", 256], ["--vocabSize must be between 257", "got 256"]),
    (["--vocabSize", 65536], ["and 65,535", "got 65536"]),
    (["--vocabSize", 300, "--vocab_file", "x.tiktoken"], ["drop one of them"]),
    (["--vocabSize", 300, "--vocabSampleChars", 0], ["--vocabSampleChars must be at least 1"]),
    (["--vocabSize", 300, "--shard_size", 10**6], ["too small to train a vocabulary of 300 ids"]),
    (["--vocabSize", 20000], ["too small to train a vocabulary of 20,000 ids"]),
])
def testBadVocabularyInputIsOneLineAndWritesNothing(corpus, tmp_path, args, fragments):
    out = tmp_path / "out"
    result = preprocess(out, "--input", corpus["path"], *args, check=False)
    assertOneErrorLine(result, 1, *fragments)
    assert not out.exists()


# ---------------------------------------------------------------- training on it


def runTrainer(data, results, **overrides):
    return trainLmAf.main(tinyFlags(data, results, **overrides))


def testRunTakesItsVocabularyFromTheShardsAndResumesExactly(corpus, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = dict(runName="bpe", saveModelEvery=4, afType="spline;att-spline")
    assert runTrainer(corpus["data"], full, **common) == 0
    log = open(full / "log-bpe.txt", encoding="utf-8").read()
    trained = vocabulary.readTokenizerFile(tokenizerFile(corpus["data"]))
    assert f"Tokenizer: byte-level BPE of {VOCAB} ids, fingerprint {trained.fingerprint.hex()[:12]}" in log
    assert "Vocabulary size: 512 (the tokenizer's 400 ids, rounded up to a multiple of 128)" in log
    assert "  tokenDocSep = 0\n" in log and "Forced: tokenDocSep=0 (<|endoftext|> of the shards' vocabulary)" in log
    checkpoint = torch.load(full / "pt-bpe-step0008.pt", weights_only=True)
    assert checkpoint["tokenizer"] == trained.json and checkpoint["vocabSize"] == 512
    assert checkpoint["hyperparameters"]["tokenDocSep"] == 0
    assert runTrainer(corpus["data"], resumed, **common, resumeFrom=full / "pt-bpe-step0004.pt") == 0

    def finalRows(folder):
        with open(folder / "metrics-bpe.csv", newline="") as f:
            return [(r["split"], r["model"], float(r["loss"])) for r in csv.DictReader(f) if r["step"] == "8"]

    assert finalRows(resumed) == pytest.approx(finalRows(full), abs=1e-6) and finalRows(full)


def testResumeOnShardsOfAnotherVocabularyIsOneLine(corpus, otherCorpus, tmp_path, capsys):
    assert runTrainer(corpus["data"], tmp_path / "a", runName="a", saveModelEvery=4) == 0
    capsys.readouterr()
    code = runTrainer(otherCorpus, tmp_path / "b", runName="a", resumeFrom=tmp_path / "a" / "pt-a-step0004.pt")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "resume on the data the run was trained on" in err
    assert not (tmp_path / "b").exists()


def mixedFolders(corpus, otherCorpus, tmp_path, case):
    """(training data folder, validation data folder) of a mismatch."""
    data = tmp_path / "data"
    shutil.copytree(corpus["data"], data)
    if case == "mixed":
        return data, otherCorpus
    if case == "replacedTokenizer":
        shutil.copy(tokenizerFile(otherCorpus), tokenizerFile(data))
    elif case == "missingTokenizer":
        os.remove(tokenizerFile(data))
    elif case == "corruptTokenizer":
        with open(tokenizerFile(data), "w") as f:
            f.write('{"model": {"vocab": ')
    elif case == "staleTokenizerBesideGpt2":
        for path in shardFiles(data):
            writeShard(path, np.asarray(loadShard(path)))
    return data, data


@pytest.mark.parametrize("case, fragment", [
    ("mixed", "the shards were made with different vocabularies"),
    ("replacedTokenizer", "were made with a BPE of 400 ids"),
    ("missingTokenizer", "tokenizer.json is missing"),
    ("corruptTokenizer", "is not a tokenizer.json of a BPE (corrupted?)"),
    ("staleTokenizerBesideGpt2", "were made with the GPT-2 vocabulary"),
])
def testMismatchedVocabularyIsOneLineBeforeAnythingIsWritten(corpus, otherCorpus, tmp_path, capsys, case, fragment):
    trainData, valData = mixedFolders(corpus, otherCorpus, tmp_path, case)
    results = tmp_path / "results"
    code = runTrainer(trainData, results, filesTokensVa=f"{valData}/fineweb_val_*.bin")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert not results.exists()


def testContradictingTokenDocSepIsOneLine(corpus, tmp_path, capsys):
    code = runTrainer(corpus["data"], tmp_path / "r", tokenDocSep=50256)
    err = capsys.readouterr().err
    assert code == 2 and err == ("error: --tokenDocSep 50256 contradicts the shards' vocabulary "
                                 f"({tokenizerFile(corpus['data'])}), whose <|endoftext|> is id 0; drop the flag or give "
                                 "--tokenDocSep 0 (-1: no separator)\n")
    assert runTrainer(corpus["data"], tmp_path / "ok", tokenDocSep=-1, nSteps=6) == 0


def testPreflightCountsTheTokenizersVocabulary(corpus, capsys):
    assert trainLmAf.main(tinyFlags(corpus["data"], "unused", preflight=1, preflightGpu="h100:9.0:80")) == 0
    assert "vocabulary 512" in capsys.readouterr().out


# ---------------------------------------------------------------- the scripts that read a model


@pytest.fixture(scope="module")
def bpeModel(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpeModel")
    assert runTrainer(corpus["data"], folder, runName="m", saveModelEvery=0, nSteps=6) == 0
    return str(folder / "pt-m-step0006.pt")


def testGenerateDecodesWithTheCheckpointsTokenizer(bpeModel, corpus, capsys):
    """The continuation generate.py prints is the prompt and the decoding of what the model draws, greedily, with
    the corpus tokenizer; the prompt holds characters the corpus never held."""
    prompt = "ROMEO: 東京 ☃"
    assert generate.main(["--device", "cpu", "--modelFile", bpeModel, "--prompt", prompt, "--maxNewTokens", "12",
                          "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "Tokenizer: the checkpoint's byte-level BPE of 400 ids" in captured.err
    trained = checkpoints.loadModel(bpeModel, None, torch.device("cpu"))
    encoding = vocabulary.BpeEncoding(vocabulary.readTokenizerFile(tokenizerFile(corpus["data"])))
    tokens = [0] + encoding.encode_ordinary(prompt)
    new, _ = generate.sampleTokens(trained.model, tokens, 12, 16, 0.0, 0, 0, VOCAB, torch.Generator().manual_seed(0),
                                   torch.device("cpu"))
    assert captured.out == prompt + encoding.decode(new) + "\n"
    assert generate.main(["--device", "cpu", "--modelFile", bpeModel, "--prompt", "x", "--vocab_file", "v.tiktoken"]) == 1
    assert "drop --vocab_file" in capsys.readouterr().err


def testBlimpIsScoredWithTheCheckpointsTokenizer(bpeModel, corpus, capsys):
    from tokenizers import Tokenizer

    trained = checkpoints.loadModel(bpeModel, None, torch.device("cpu"))
    encoding, line = checkpoints.encodingOf(trained, None)
    assert line.startswith("Tokenizer: the checkpoint's byte-level BPE of 400 ids")
    sets = evalBlimp.readLocalSets(BLIMP_SAMPLE, 4)
    library = Tokenizer.from_file(tokenizerFile(corpus["data"]))
    sentences = [sentence for blimpSet in sets for pair in blimpSet.pairs for sentence in pair]
    expected = [[0] + library.encode(sentence, add_special_tokens=False).ids for sentence in sentences]
    assert evalBlimp.tokenizeSets(sets, encoding, trained.vocabSize) == expected
    assert evalBlimp.main(["--device", "cpu", "--modelFile", bpeModel, "--blimpDir", BLIMP_SAMPLE, "--limit", "5"]) == 0
    assert "Tokenizer: the checkpoint's byte-level BPE of 400 ids" in capsys.readouterr().out
