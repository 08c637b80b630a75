"""The token vocabulary: a byte-level BPE trained on the corpus (tokenizer.json beside its shards), its fingerprint in
the shard headers, and which vocabulary a set of shards was made with. GPT-2's (tiktoken r50k_base) is the one a
shard without a fingerprint was made with.

A corpus BPE is Hugging Face `tokenizers`' standard file: byte-level (every byte is a token, so any text encodes),
GPT-2's pre-tokenizing regex, <|endoftext|> a special token (id 0) that separates documents. Its fingerprint is the
first 16 bytes of the SHA-256 of what decides the ids (normalizer, pre-tokenizer, model, added tokens), so the same
vocabulary saved with other formatting keeps its fingerprint.
"""
import hashlib
import json
import os
from dataclasses import dataclass

import tokenShards

TOKENIZER_FILE = "tokenizer.json"
EOT_TEXT = "<|endoftext|>"
N_BYTES = 256
MIN_VOCAB_SIZE = N_BYTES + 1  # every byte and <|endoftext|>
MAX_VOCAB_SIZE = tokenShards.MAX_TOKEN_ID  # shards store ids as uint16
GPT2_NAME = "GPT-2 (r50k_base)"


class VocabularyError(tokenShards.ShardError):
    """A missing, damaged or mismatched tokenizer.json, or shards of different vocabularies; one line."""


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
