"""The token vocabulary: a byte-level BPE trained on the corpus (tokenizer.json beside its shards), its fingerprint in
the shard headers, and which vocabulary a set of shards was made with. GPT-2's (tiktoken r50k_base) is the one a
shard without a fingerprint was made with.

A corpus BPE is Hugging Face `tokenizers`' standard file: byte-level (every byte is a token, so any text encodes),
GPT-2's pre-tokenizing regex, <|endoftext|> a special token (id 0) that separates documents. Its fingerprint is the
first 16 bytes of the SHA-256 of what decides the ids (normalizer, pre-tokenizer, model, added tokens), so the same
vocabulary saved with other formatting keeps its fingerprint.
"""
import base64
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import tiktoken_ext.openai_public as openaiPublic

from lmafs.data import tokenShards
from lmafs.cliErrors import describeError

TOKENIZER_FILE = "tokenizer.json"
EOT_TEXT = "<|endoftext|>"
N_BYTES = 256
MIN_VOCAB_SIZE = N_BYTES + 1  # every byte and <|endoftext|>
MAX_VOCAB_SIZE = tokenShards.MAX_TOKEN_ID  # shards store ids as uint16
GPT2_NAME = "GPT-2 (r50k_base)"
GPT2_EOT_ID = 50256  # <|endoftext|>, the document separator
# tiktoken downloads r50k_base (the GPT-2 vocabulary) from this address and caches it under the sha1 of it
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# The same file, committed with the code (vocab/README.md: origin, licence), so that no network is needed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_VOCAB_FILE = os.path.join(REPO, "vocab", "r50k_base.tiktoken")


class VocabularyError(tokenShards.ShardError):
    """A missing, damaged or mismatched tokenizer.json, or shards of different vocabularies; one line."""


# ----------------------------------------------------------------------------------------------
# GPT-2's vocabulary (tiktoken r50k_base)


def tiktokenCachePath():
    """Where tiktoken caches its download of r50k_base, computed as tiktoken.load does; None when its cache is off."""
    cacheDir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cacheDir == "":  # tiktoken reads "" as "no cache"
        return None
    return os.path.join(cacheDir or os.path.join(tempfile.gettempdir(), "data-gym-cache"), hashlib.sha1(R50K_URL.encode()).hexdigest())


def isGpt2Vocabulary(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == R50K_SHA256
    except OSError:
        return False


def gpt2VocabularyFromFile(path, origin):
    """Encoding arguments from a .tiktoken file, refused unless it is byte for byte GPT-2's."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise VocabularyError(f"cannot read {origin} {path} ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != R50K_SHA256:
        raise VocabularyError(f"{origin} {path} is not the GPT-2 vocabulary (its sha256 is not r50k_base's {R50K_SHA256[:8]}...)")
    # the .tiktoken format: one "base64(token bytes) rank" per line
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return {"name": "r50k_base", "pat_str": openaiPublic.r50k_pat_str, "mergeable_ranks": ranks,
            "special_tokens": {"<|endoftext|>": GPT2_EOT_ID}, "explicit_n_vocab": GPT2_EOT_ID + 1}


def loadGpt2Vocabulary(vocabFile):
    """Constructor arguments of the GPT-2 tiktoken Encoding and a line saying where the vocabulary came from.

    In order: --vocab_file; tiktoken's cache; the copy shipped in vocab/ (no network needed); tiktoken's
    download, the last resort for a checkout whose copy is missing or damaged.
    """
    if vocabFile:
        try:
            return gpt2VocabularyFromFile(vocabFile, "--vocab_file"), f"--vocab_file {vocabFile}"
        except VocabularyError as e:
            raise VocabularyError(f"{e}; give a copy of r50k_base.tiktoken (gpt2.tiktoken), or leave out --vocab_file to use {SHIPPED_VOCAB_FILE}") from None
    cachePath = tiktokenCachePath()
    # only a correct cache entry: tiktoken would delete a damaged one and download, which needs the network
    if cachePath and isGpt2Vocabulary(cachePath):
        return openaiPublic.r50k_base(), f"tiktoken cache {cachePath}"
    try:
        return gpt2VocabularyFromFile(SHIPPED_VOCAB_FILE, "shipped copy"), f"shipped copy {SHIPPED_VOCAB_FILE}"
    except VocabularyError as e:
        shippedProblem = e
    try:
        params = openaiPublic.r50k_base()
    except Exception as e:
        raise VocabularyError(f"cannot get the GPT-2 vocabulary: {shippedProblem}, and tiktoken cannot download it ({describeError(e)}); restore the shipped copy (git checkout -- vocab/r50k_base.tiktoken) or pass --vocab_file PATH to a copy of r50k_base.tiktoken") from None
    return params, f"downloaded by tiktoken from {R50K_URL} (the shipped copy is unusable: {shippedProblem})"


# ----------------------------------------------------------------------------------------------
# A corpus BPE (tokenizer.json)


def fingerprint(tokenizerJson):
    """16 bytes identifying the vocabulary of a tokenizer.json text (independent of its formatting)."""
    spec = json.loads(tokenizerJson)
    decisive = {key: spec.get(key) for key in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, separators=(",", ":")).encode()).digest()[:16]


def describeFingerprint(print16):
    return print16.hex()[:12]


@dataclass(frozen=True)
class CorpusVocabulary:
    """A corpus BPE as the trainer and the checkpoint see it: its JSON text and what follows from it."""
    json: str
    size: int  # ids 0 .. size-1
    eotId: int
    fingerprint: bytes
    origin: str  # where it was read, for messages

    @property
    def name(self):
        return f"byte-level BPE of {self.size:,} ids, fingerprint {describeFingerprint(self.fingerprint)}"


def fromJson(text, origin):
    """The CorpusVocabulary of a tokenizer.json text; VocabularyError when it is not one."""
    try:
        spec = json.loads(text)
        vocab = spec["model"]["vocab"]
        specials = {token["content"]: token["id"] for token in spec.get("added_tokens") or []}
    except (ValueError, KeyError, TypeError):
        raise VocabularyError(f"{origin} is not a tokenizer.json of a BPE (corrupted?); re-run preprocessFineweb.py "
                              "--vocabSize N to write it again") from None
    if EOT_TEXT not in specials:
        raise VocabularyError(f"{origin} has no {EOT_TEXT} token, which separates documents; re-run "
                              "preprocessFineweb.py --vocabSize N")
    size = max(max(vocab.values(), default=-1), max(specials.values())) + 1
    return CorpusVocabulary(text, size, specials[EOT_TEXT], fingerprint(text), origin)


def readTokenizerFile(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise VocabularyError(f"{path} is missing, but the shards beside it were made with a corpus vocabulary; "
                              "re-run preprocessFineweb.py --vocabSize N into that folder") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VocabularyError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}); re-run "
                              "preprocessFineweb.py --vocabSize N") from None
    return fromJson(text, path)


def ofShards(files):
    """The vocabulary the shards were made with: None for GPT-2, else the CorpusVocabulary of the tokenizer.json
    beside them. VocabularyError when the shards disagree, or disagree with the tokenizer.json beside them."""
    marks = [(path, tokenShards.readShardVocabulary(path)) for path in files]
    odd = next(((path, mark) for path, mark in marks if mark != marks[0][1]), None)
    if odd:
        raise VocabularyError(f"the shards were made with different vocabularies: {marks[0][0]} with "
                              f"{shardVocabularyName(marks[0][1])}, {odd[0]} with {shardVocabularyName(odd[1])}; "
                              "preprocess training and validation data in one preprocessFineweb.py run")
    mark = marks[0][1] if marks else None
    folders = sorted({os.path.dirname(os.path.abspath(path)) for path in files})
    if mark is None:
        for folder in folders:
            beside = os.path.join(folder, TOKENIZER_FILE)
            if os.path.exists(beside):
                raise VocabularyError(f"the shards in {folder} were made with the GPT-2 vocabulary, but {beside} "
                                      "beside them is a corpus vocabulary; re-run preprocessFineweb.py, or delete "
                                      f"the stale {TOKENIZER_FILE}")
        return None
    vocabulary = None
    for folder in folders:
        found = readTokenizerFile(os.path.join(folder, TOKENIZER_FILE))
        if (found.size, found.fingerprint) != mark:
            raise VocabularyError(f"the shards in {folder} were made with {shardVocabularyName(mark)}, but "
                                  f"{found.origin} is {found.name}; re-run preprocessFineweb.py --vocabSize N into "
                                  "that folder")
        vocabulary = vocabulary or found
    return vocabulary


def shardVocabularyName(mark):
    return GPT2_NAME if mark is None else f"a BPE of {mark[0]:,} ids, fingerprint {describeFingerprint(mark[1])}"


class BpeEncoding:
    """A corpus BPE with the part of tiktoken's Encoding interface that the scripts reading a model use."""

    def __init__(self, vocabulary):
        from tokenizers import Tokenizer  # imported here: GPT-2 runs never need it

        self.tokenizer = Tokenizer.from_str(vocabulary.json)
        # "<|endoftext|>" written in a prompt or sentence is text, as tiktoken's encode_ordinary treats it
        self.tokenizer.encode_special_tokens = True
        self.eot_token = vocabulary.eotId
        self.n_vocab = vocabulary.size

    def encode_ordinary(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, tokens):
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)


def trainBpe(texts, vocabSize, showProgress):
    """A byte-level BPE of vocabSize ids (<|endoftext|> = 0, then the 256 bytes, then merges) trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocabSize, special_tokens=[EOT_TEXT], show_progress=showProgress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Bytes per token: bits per byte, a loss that vocabularies share


def byteLevelAlphabet():
    """{character: byte} of the byte-level BPEs (GPT-2's and the corpus BPE): the printable bytes stand for
    themselves, every other byte for the next unused character from U+0100 on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(N_BYTES) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(N_BYTES + i): b for i, b in enumerate(others)}}


def tokenByteCounts(corpusVocabulary):
    """UTF-8 bytes of the text each token id stands for, as an int64 array over every id a shard can hold (uint16):
    a corpus BPE's from its tokenizer.json, GPT-2's from its .tiktoken file (corpusVocabulary None). Special tokens
    (<|endoftext|>, put between documents by the preprocessing, no part of the text) count 0, as do ids no
    vocabulary holds."""
    counts = np.zeros(tokenShards.MAX_TOKEN_ID + 1, dtype=np.int64)
    if corpusVocabulary is None:
        params, _ = loadGpt2Vocabulary(None)
        for token, rank in params["mergeable_ranks"].items():
            counts[rank] = len(token)
        return counts
    alphabet = byteLevelAlphabet()
    spec = json.loads(corpusVocabulary.json)
    for token, tokenId in spec["model"]["vocab"].items():
        counts[tokenId] = len(token) if all(c in alphabet for c in token) else len(token.encode("utf-8"))
    for special in spec.get("added_tokens") or []:
        counts[special["id"]] = 0
    return counts


def bitsPerByte(loss, nTokens, nBytes):
    """Mean loss in nats per token over nTokens predicted tokens that decode to nBytes bytes, in bits per byte."""
    return loss * nTokens / (nBytes * math.log(2))
