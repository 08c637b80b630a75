"""preprocessFineweb.py end to end on local corpora: exact GPT-2 ids, headers, shard split, formats, reruns, errors."""
import glob
import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import preprocessFineweb
from lmafs.data import vocabulary
from lmafs.data.vocabulary import SHIPPED_VOCAB_FILE
from lmafs.data.tokenShards import HEADER_INTS, MAGIC, VERSION, TokenStream, listShards, loadShard, validationSequences

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "preprocessFineweb.py")
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# written out here rather than taken from the script, so that the test checks the script's constant too
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = 50256
SHARD = 1000
CACHE_NAME = hashlib.sha1(R50K_URL.encode()).hexdigest()


@pytest.fixture(scope="session")
def tiktokenCache(tmp_path_factory):
    """A TIKTOKEN_CACHE_DIR seeded the way tiktoken would have cached its download of r50k_base."""
    folder = tmp_path_factory.mktemp("tiktokenCache")
    with open(SHIPPED_VOCAB_FILE, "rb") as f:
        (folder / CACHE_NAME).write_bytes(f.read())
    return str(folder)


@pytest.fixture(scope="session")
def reference(tiktokenCache, noNetworkEnv):
    """tiktoken's own r50k_base (= GPT-2), loaded from the seeded cache, which tiktoken checks against its own
    sha256 (and, offline, cannot replace by a download): the independent tokenization."""
    import tiktoken

    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**noNetworkEnv, "TIKTOKEN_CACHE_DIR": tiktokenCache}.items():
            patch.setenv(name, value)
        return tiktoken.get_encoding("r50k_base")


def referenceTokens(encoding, documents):
    tokens = []
    for text in documents:
        tokens.append(EOT)
        tokens.extend(encoding.encode_ordinary(text))
    return np.array(tokens, dtype=np.int64)


def makeDocuments(seed=0, n=60):
    """Varied documents: words, digits, punctuation, unicode, whitespace runs, an empty one, a literal separator string, one longer than two shards."""
    rng = random.Random(seed)
    words = ["the", "The", "quick", "brown", "fox", "jumps", "über", "naïve", "café", "东京", "🙂", "1234567",
             "3.14159", "don't", "we'll", "<|endoftext|>", "hello,", "world!", "\n", "\n\n", "  ", "\t", "https://x.org/a?b=c"]
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 120))) for _ in range(n)]
    documents[5] = ""
    documents[9] = " ".join(rng.choice(words) for _ in range(2500))
    return documents


def writeJsonl(path, documents, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(documents):
            f.write(json.dumps({"id": i, field: text}) + "\n")
    return str(path)


def run(outDir, *args, vocabFile=None, env=None, check=True):
    command = [sys.executable, SCRIPT, str(outDir)] + [str(a) for a in args]
    if vocabFile:
        command += ["--vocab_file", vocabFile]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr
    return result


def shardFiles(outDir, name="fineweb"):
    return sorted(glob.glob(os.path.join(outDir, f"{name}_val_*.bin"))) + sorted(glob.glob(os.path.join(outDir, f"{name}_train_*.bin")))


def concatenated(outDir, name="fineweb"):
    return np.concatenate([np.asarray(loadShard(p), dtype=np.int64) for p in shardFiles(outDir, name)])


def assertOneErrorLine(result, *fragments):
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, reference):
    folder = tmp_path_factory.mktemp("corpus")
    documents = makeDocuments()
    return {"path": writeJsonl(folder / "docs.jsonl", documents), "documents": documents,
            "tokens": referenceTokens(reference, documents)}


@pytest.fixture(scope="module")
def cleanRun(tmp_path_factory, corpus, noNetworkEnv):
    """A fresh clone's run: no --vocab_file, nothing in tiktoken's cache, no network."""
    outDir = tmp_path_factory.mktemp("clean")
    result = run(outDir, "--input", corpus["path"], "--shard_size", SHARD, "--num_proc", 2, env=noNetworkEnv)
    return outDir, result


def testShippedVocabularyIsR50kBase():
    with open(SHIPPED_VOCAB_FILE, "rb") as f:
        data = f.read()
    assert len(data) == 835554 and hashlib.sha256(data).hexdigest() == R50K_SHA256
    assert vocabulary.R50K_SHA256 == R50K_SHA256
    assert os.path.dirname(SHIPPED_VOCAB_FILE) == os.path.join(REPO, "vocab")


def testReferenceIsGpt2(reference):
    assert reference.encode_ordinary("Hello world") == [15496, 995]
    assert reference.encode("<|endoftext|>", allowed_special="all") == [EOT]


def testJsonlShardsEqualIndependentTokenization(cleanRun, corpus):
    outDir, result = cleanRun
    expected = corpus["tokens"]
    files = shardFiles(outDir)
    nShards = -(-len(expected) // SHARD)
    assert [os.path.basename(f) for f in files] == ["fineweb_val_000000.bin"] + [
        f"fineweb_train_{i:06d}.bin" for i in range(1, nShards)]
    for index, path in enumerate(files):
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
        count = SHARD if index < nShards - 1 else len(expected) - SHARD * (nShards - 1)
        assert header[:3].tolist() == [MAGIC, VERSION, count] and not header[3:].any()
        assert os.path.getsize(path) == 4 * HEADER_INTS + 2 * count
    np.testing.assert_array_equal(concatenated(outDir), expected)
    assert f"GPT-2 vocabulary: shipped copy {SHIPPED_VOCAB_FILE}\n" in result.stdout and "wrote" in result.stdout


def testSeparatorBeforeEveryDocumentAndSpills(cleanRun, corpus, reference):
    outDir, _ = cleanRun
    tokens = concatenated(outDir)
    starts = np.cumsum([0] + [1 + len(reference.encode_ordinary(d)) for d in corpus["documents"][:-1]])
    assert np.flatnonzero(tokens == EOT).tolist() == starts.tolist()  # the literal "<|endoftext|>" text is not a separator
    # the long document alone covers more than two shards, so documents spill over shard boundaries
    assert len(reference.encode_ordinary(corpus["documents"][9])) > 2 * SHARD
    shardStartsWithDocument = [loadShard(p)[0] == EOT for p in shardFiles(outDir)]
    assert not all(shardStartsWithDocument)


def testOneAndTwoProcessesGiveTheSameBytes(cleanRun, corpus, noNetworkEnv, tmp_path):
    outDir, _ = cleanRun
    run(tmp_path, "--input", corpus["path"], "--shard_size", SHARD, "--num_proc", 1, env=noNetworkEnv)
    for a, b in zip(shardFiles(outDir), shardFiles(tmp_path), strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()


def testNShardsCapsTheOutput(corpus, noNetworkEnv, tmp_path):
    run(tmp_path, "--input", corpus["path"], "--shard_size", SHARD, "--n_shards", 3, "--num_proc", 2, env=noNetworkEnv)
    assert len(shardFiles(tmp_path)) == 3
    np.testing.assert_array_equal(concatenated(tmp_path), corpus["tokens"][:3 * SHARD])


def testTiktokenCacheGivesTheSameIdsAsTheShippedCopy(cleanRun, corpus, tiktokenCache, noNetworkEnv, tmp_path):
    outDir, _ = cleanRun
    result = run(tmp_path, "--input", corpus["path"], "--shard_size", SHARD, "--num_proc", 1,
                 env={**noNetworkEnv, "TIKTOKEN_CACHE_DIR": tiktokenCache})
    assert f"GPT-2 vocabulary: tiktoken cache {os.path.join(tiktokenCache, CACHE_NAME)}\n" in result.stdout
    np.testing.assert_array_equal(concatenated(tmp_path), concatenated(outDir))


def testVocabFileGivesTheSameIdsAsTheShippedCopy(cleanRun, corpus, noNetworkEnv, tmp_path):
    outDir, _ = cleanRun
    copy = tmp_path / "gpt2.tiktoken"
    copy.write_bytes(open(SHIPPED_VOCAB_FILE, "rb").read())
    result = run(tmp_path / "out", "--input", corpus["path"], "--shard_size", SHARD, "--num_proc", 1,
                 vocabFile=str(copy), env=noNetworkEnv)
    assert f"GPT-2 vocabulary: --vocab_file {copy}\n" in result.stdout
    np.testing.assert_array_equal(concatenated(tmp_path / "out"), concatenated(outDir))


def testDamagedTiktokenCacheFallsBackToTheShippedCopy(cleanRun, corpus, noNetworkEnv, tmp_path):
    # offline, tiktoken would delete the damaged entry and fail to download a new one
    outDir, _ = cleanRun
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / CACHE_NAME).write_bytes(open(SHIPPED_VOCAB_FILE, "rb").read()[:-100])
    result = run(tmp_path / "out", "--input", corpus["path"], "--shard_size", SHARD, "--num_proc", 1,
                 env={**noNetworkEnv, "TIKTOKEN_CACHE_DIR": str(cache)})
    assert f"GPT-2 vocabulary: shipped copy {SHIPPED_VOCAB_FILE}\n" in result.stdout
    np.testing.assert_array_equal(concatenated(tmp_path / "out"), concatenated(outDir))


@pytest.mark.parametrize("case, fragment", [("missing", "No such file"), ("damaged", "is not the GPT-2 vocabulary")])
def testUnusableShippedCopyWithoutNetworkIsAnError(case, fragment, offline, monkeypatch, tmp_path):
    shipped = tmp_path / "r50k_base.tiktoken"
    if case == "damaged":  # e.g. a checkout that converted its line endings
        shipped.write_bytes(open(SHIPPED_VOCAB_FILE, "rb").read().replace(b"\n", b"\r\n"))
    monkeypatch.setattr(vocabulary, "SHIPPED_VOCAB_FILE", str(shipped))
    with pytest.raises(vocabulary.VocabularyError) as caught:
        vocabulary.loadGpt2Vocabulary(None)
    message = str(caught.value)
    assert message.startswith("cannot get the GPT-2 vocabulary: ") and f"shipped copy {shipped}" in message
    assert fragment in message and "tiktoken cannot download it" in message and "--vocab_file" in message


def testTxtJsonAndParquetInputs(reference, noNetworkEnv, tmp_path):
    documents = makeDocuments(seed=1, n=12)
    corpusDir = tmp_path / "in"
    corpusDir.mkdir()
    # .txt: one document per file, read in sorted order; names chosen so that sorting matters
    for i, text in enumerate(documents[:4]):
        (corpusDir / f"part{3 - i}.txt").write_text(text, encoding="utf-8")
    txtOrder = [documents[3], documents[2], documents[1], documents[0]]
    (corpusDir / "array.json").write_text(json.dumps([{"body": t} for t in documents[4:8]]), encoding="utf-8")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"body": documents[8:], "n": list(range(4))}), str(corpusDir / "z.parquet"))
    run(tmp_path / "txt", "--input", str(corpusDir / "*.txt"), "--shard_size", 50, "--name", "mine", "--num_proc", 2, env=noNetworkEnv)
    np.testing.assert_array_equal(concatenated(tmp_path / "txt", "mine"), referenceTokens(reference, txtOrder))
    assert shardFiles(tmp_path / "txt", "mine")[0].endswith("mine_val_000000.bin")
    run(tmp_path / "mixed", "--input", str(corpusDir / "array.json"), "--input", str(corpusDir / "z.parquet"), "--text_field", "body",
        "--shard_size", 50, "--num_proc", 1, env=noNetworkEnv)
    np.testing.assert_array_equal(concatenated(tmp_path / "mixed"), referenceTokens(reference, documents[4:]))


def testInterruptedRunIsCompletedByARerun(cleanRun, corpus, noNetworkEnv, tmp_path):
    outDir, _ = cleanRun
    for path in shardFiles(outDir):
        (tmp_path / os.path.basename(path)).write_bytes(open(path, "rb").read())
    os.remove(tmp_path / "fineweb_train_000002.bin")
    with open(tmp_path / "fineweb_train_000003.bin", "r+b") as f:  # cut short by a crash
        f.truncate(4 * HEADER_INTS + 300)
    (tmp_path / "fineweb_train_000004.bin.12345.tmp").write_bytes(b"partial")
    (tmp_path / "fineweb_train_000005.bin").write_bytes(open(tmp_path / "fineweb_train_000006.bin", "rb").read())  # stale
    result = run(tmp_path, "--input", corpus["path"], "--shard_size", SHARD, "--num_proc", 2, env=noNetworkEnv)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in shardFiles(outDir))
    for a, b in zip(shardFiles(outDir), shardFiles(tmp_path), strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()
    written = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("wrote")]
    assert sorted(os.path.basename(p) for p in written) == ["fineweb_train_000002.bin", "fineweb_train_000003.bin", "fineweb_train_000005.bin"]
    again = run(tmp_path, "--input", corpus["path"], "--shard_size", SHARD, "--num_proc", 1, "--overwrite", env=noNetworkEnv)
    assert sum(line.startswith("wrote") for line in again.stdout.splitlines()) == len(shardFiles(outDir))


def testTrainerReadsWhatThePreprocessorWrote(cleanRun, corpus):
    outDir, _ = cleanRun
    expected = corpus["tokens"]
    trainFiles = listShards(os.path.join(outDir, "fineweb_train_*.bin"))
    stream = TokenStream(trainFiles, 64, seed=0, streamIndex=0, shuffle=0)
    offset = SHARD  # the training shards follow the validation shard in the token stream
    for path in trainFiles:
        size = len(loadShard(path))
        for j in range((size - 1) // 64):
            np.testing.assert_array_equal(stream.next(), expected[offset + 64 * j:offset + 64 * j + 65])
        offset += size
    assert stream.position == stream.sequencesPerEpoch
    val = validationSequences(listShards(os.path.join(outDir, "fineweb_val_*.bin")), 64, 500)
    assert val.shape == (7, 65)
    np.testing.assert_array_equal(val[1], expected[64:129])


@pytest.mark.parametrize("case, fragments", [
    ("field", ["line 1", "no field 'text'", "--text_field"]),
    ("json", ["line 2 is not valid JSON"]),
    ("nomatch", ["no files match --input"]),
    ("type", ["unsupported type"]),
    ("vocab", ["is not the GPT-2 vocabulary", "leave out --vocab_file"]),
    ("shardSize", ["--shard_size must be between"]),
])
def testInputErrorsAreOneLine(case, fragments, noNetworkEnv, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "a"}\n', encoding="utf-8")
    args = ["--input", str(path)]
    vocab = None
    if case == "json":
        path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    elif case == "nomatch":
        args = ["--input", str(tmp_path / "none*.jsonl")]
    elif case == "type":
        (tmp_path / "docs.csv").write_text("text\na\n")
        args = ["--input", str(tmp_path / "docs.csv")]
    elif case == "vocab":
        vocab = str(path)
    elif case == "shardSize":
        args += ["--shard_size", "0"]
    result = run(tmp_path / "out", *args, vocabFile=vocab, env=noNetworkEnv, check=False)
    assertOneErrorLine(result, *fragments)
    assert not glob.glob(str(tmp_path / "out" / "*.bin"))


@pytest.mark.parametrize("args, fragment", [
    (["--num_proc", "1"], "cannot open HuggingFaceFW/fineweb"),
    (["--from_hub", "--n_shards", "2"], "cannot download fineweb_val_000000.bin"),
])
def testUnreachableHubIsOneLine(args, fragment, noNetworkEnv, tmp_path):
    # offline mode makes the hub clients fail at once, as an unreachable network does after its retries
    result = run(tmp_path, *args, env={**noNetworkEnv, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, check=False)
    assertOneErrorLine(result, fragment, "check the network")


def testFromHubDownloadsChecksAndSkips(tmp_path, monkeypatch):
    """--from_hub with the hub replaced by a local fake: file names, header checks, skipping complete files."""
    import huggingface_hub

    from lmafs.data.tokenShards import ShardError, writeShard

    calls = []

    def fakeDownload(repoId, filename, repo_type, local_dir, force_download):
        calls.append(filename)
        assert (repoId, repo_type) == ("kjj0/fineweb10B-gpt2", "dataset")
        path = os.path.join(local_dir, filename)
        writeShard(path, np.arange(100 + len(calls)))
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fakeDownload)
    args = preprocessFineweb.parseArgs([str(tmp_path), "--from_hub", "--n_shards", "3"])
    preprocessFineweb.downloadFromHub(args)
    assert calls == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    with open(tmp_path / "fineweb_train_000001.bin", "r+b") as f:
        f.truncate(4 * HEADER_INTS + 10)
    preprocessFineweb.downloadFromHub(args)
    assert calls[3:] == ["fineweb_train_000001.bin"]  # only the broken file is fetched again

    def brokenDownload(repoId, filename, repo_type, local_dir, force_download):
        path = os.path.join(local_dir, filename)
        with open(path, "wb") as f:
            f.write(b"<html>not a shard</html>")
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", brokenDownload)
    os.remove(tmp_path / "fineweb_val_000000.bin")
    with pytest.raises(ShardError, match="fineweb_val_000000.bin"):
        preprocessFineweb.downloadFromHub(args)
