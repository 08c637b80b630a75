"""Token shards on disk (the llm.c / modded-nanogpt format) and the training and validation data read from them.

A shard is a header of HEADER_INTS little-endian int32 (MAGIC, VERSION, token count, then zeros)
followed by the tokens as little-endian uint16. A shard made with a corpus vocabulary (preprocessFineweb.py
--vocabSize) records it in slots that readers of the format leave unused: slot 3 its size, slots 4-7 its 16-byte
fingerprint; all zero (GPT-2's shards, llm.c's and modded-nanogpt's) means the GPT-2 vocabulary. Shards are written atomically and every read
checks the header against the file size, so a truncated or foreign file is an error that names
the file and the fix instead of silently feeding garbage to the model.

A training sequence is seqLength+1 consecutive tokens of one shard (inputs, and targets shifted by
one). Sequence j of a shard starts at token j*seqLength; a training stream uses (n-2)//seqLength of
them from a shard of n tokens, as the original (one fewer than fit when n-1 is a multiple of
seqLength), validation all (n-1)//seqLength that fit.
"""
import glob
import os

import numpy as np

from lmafs.atomicFiles import atomicWrite

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = 65535  # the largest id a uint16 can store

# explicit little-endian so that shards move between machines unchanged
HEADER_DTYPE = np.dtype("<i4")
TOKEN_DTYPE = np.dtype("<u2")
MAX_HEADER_COUNT = 2**31 - 1
VOCAB_SIZE_SLOT, FINGERPRINT_SLOTS = 3, slice(4, 8)

# Tags that keep the random streams of one (seed, streamIndex) independent of each other.
RNG_SEQUENCE_ORDER, RNG_TOKEN_ORDER = 1, 2
FIX_HINT = "re-run preprocessFineweb.py"


class ShardError(Exception):
    """A token file is missing, foreign, truncated or too small; the message names the file and the fix."""


def writeShard(path, tokens, vocabulary=None):
    """Write tokens as a shard at path, atomically (atomicFiles);
    vocabulary: None (GPT-2) or the (size, 16-byte fingerprint) of the corpus vocabulary that made them."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ShardError(f"data file {path}: nothing to write (expected a non-empty 1-D sequence of token ids)")
    if tokens.size > MAX_HEADER_COUNT:
        raise ShardError(f"data file {path}: {tokens.size} tokens do not fit one shard (at most {MAX_HEADER_COUNT}); use a smaller --shard_size")
    if tokens.dtype != TOKEN_DTYPE:
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ShardError(f"data file {path}: token ids must be integers, got dtype {tokens.dtype}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high > MAX_TOKEN_ID:
            raise ShardError(f"data file {path}: token id {low if low < 0 else high} does not fit uint16 [0, {MAX_TOKEN_ID}]; use a tokenizer with at most 65536 tokens")
        tokens = tokens.astype(TOKEN_DTYPE)
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[:3] = (MAGIC, VERSION, tokens.size)
    if vocabulary is not None:
        size, print16 = vocabulary
        header[VOCAB_SIZE_SLOT] = size
        header[FINGERPRINT_SLOTS] = np.frombuffer(print16, dtype=HEADER_DTYPE)
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.tobytes())

    atomicWrite(path, write)


def readShardHeader(path):
    """Check the header of the shard at path against its size and return its token count."""
    try:
        fileBytes = os.path.getsize(path)
        with open(path, "rb") as f:
            headerBytes = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"data file {path} does not exist; {FIX_HINT}") from None
    except IsADirectoryError:
        raise ShardError(f"data file {path} is a folder, not a token file; check the file pattern") from None
    except OSError as e:
        raise ShardError(f"data file {path} cannot be read ({e.strerror}); check its permissions") from None
    if len(headerBytes) < HEADER_BYTES:
        raise ShardError(f"data file {path} holds {fileBytes} bytes, less than the {HEADER_BYTES}-byte header (truncated or not a token file); {FIX_HINT}")
    magic, version, count = (int(v) for v in np.frombuffer(headerBytes, dtype=HEADER_DTYPE)[:3])
    if magic != MAGIC:
        raise ShardError(f"data file {path} is not a token shard (magic number {magic}, expected {MAGIC}); {FIX_HINT}")
    if version != VERSION:
        raise ShardError(f"data file {path} has shard format version {version}, this program reads version {VERSION}; {FIX_HINT}")
    heldBytes = fileBytes - HEADER_BYTES
    if heldBytes != count * TOKEN_DTYPE.itemsize:
        raise ShardError(f"data file {path}: header says {count} tokens but the file holds {heldBytes // TOKEN_DTYPE.itemsize}; {FIX_HINT}")
    return count


def readShardVocabulary(path):
    """None for a shard of the GPT-2 vocabulary, else the (size, 16-byte fingerprint) its header records."""
    readShardHeader(path)
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype=HEADER_DTYPE)
    size, print16 = int(header[VOCAB_SIZE_SLOT]), header[FINGERPRINT_SLOTS].tobytes()
    if size == 0 and not any(print16):
        return None
    return size, print16


def loadShard(path):
    """Return the tokens of the shard at path as a read-only uint16 array (a memory map), after checking the header."""
    count = readShardHeader(path)
    if count == 0:
        # mmap cannot map zero bytes
        empty = np.empty(0, dtype=TOKEN_DTYPE)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def listShards(pattern, flag=""):
    """Sorted paths matching the glob pattern, each with a valid non-empty header; flag (e.g. '--filesTokensTr') names the option in errors."""
    origin = f" ({flag})" if flag else ""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ShardError(f"no token files match '{pattern}'{origin}; run preprocessFineweb.py first or fix the pattern")
    for path in paths:
        if readShardHeader(path) == 0:
            raise ShardError(f"data file {path}{origin} holds no tokens; {FIX_HINT} or remove the file")
    return paths


def maxTokenId(files, chunkTokens=1 << 24):
    """Largest token id in the files (-1 when they hold no tokens), read in chunks so memory stays bounded."""
    largest = -1
    for path in files:
        tokens = loadShard(path)
        for start in range(0, tokens.size, chunkTokens):
            largest = max(largest, int(tokens[start:start + chunkTokens].max()))
    return largest


def sequencesInShard(nTokens, seqLength):
    """How many sequences of seqLength+1 tokens, starting at multiples of seqLength, fit in nTokens tokens."""
    return max(nTokens - 1, 0) // seqLength


def trainingSequencesInShard(nTokens, seqLength):
    """How many sequences a training stream reads from a shard of nTokens tokens: the original's count."""
    return max(nTokens - 2, 0) // seqLength


def checkSeqLength(seqLength):
    if int(seqLength) != seqLength or seqLength < 1:
        raise ValueError(f"seqLength must be a positive integer, got {seqLength!r}")
    return int(seqLength)


def nonNegativeSeed(seed):
    # SeedSequence takes non-negative integers only; wrapping keeps negative seeds usable and distinct
    return int(seed) % 2**64


class TokenStream:
    """An endless, reproducible stream of training sequences over a list of shards.

    The sequence handed out at a given position is a pure function of (files, seqLength, seed,
    streamIndex, shuffle, position), so resuming only needs `position` (see state_dict).
    As the original, shards are read in file order, wrapping around, starting at shard streamIndex mod
    nShards (shuffle 0) or (streamIndex + seed) mod nShards (shuffle 1, 2); an epoch is one pass over all
    shards. shuffle = 0: sequences in order; 1: per shard and epoch e the order of its sequences comes
    from a generator seeded with (seed, streamIndex, e, slot) (the original's is drawn unseeded); 2: as 1
    and the seqLength+1 tokens of each sequence are permuted too (a control experiment without word
    order). Only the current shard's order is kept and only the current shard is mapped (a memory map
    holds a file descriptor, and 20 streams over 100 shards would otherwise hold 2000 of them).
    nShards counts only shards that hold at least one sequence.
    """

    def __init__(self, files, seqLength, seed, streamIndex, shuffle):
        if shuffle not in (0, 1, 2):
            raise ValueError(f"shuffle must be 0, 1 or 2, got {shuffle!r}")
        if not files:
            raise ShardError("no training token files given; run preprocessFineweb.py first")
        self.seqLength = checkSeqLength(seqLength)
        self.seed = nonNegativeSeed(seed)
        self.streamIndex = int(streamIndex)
        self.firstShard = self.streamIndex + (int(seed) if shuffle else 0)  # modulo the number of shards
        self.shuffle = shuffle
        sizes = [readShardHeader(path) for path in files]
        self.nTokens = sum(sizes)
        counts = [trainingSequencesInShard(size, self.seqLength) for size in sizes]
        self.files = [path for path, count in zip(files, counts) if count > 0]
        self.sizes = [size for size, count in zip(sizes, counts) if count > 0]
        self.shardSequences = np.array([count for count in counts if count > 0], dtype=np.int64)
        if not self.files:
            raise ShardError(f"the training data is shorter than seqLength+2 = {self.seqLength + 2} tokens in every file (largest file: {max(sizes)} tokens); lower --seqLength or use more data per shard")
        self.sequencesPerEpoch = int(self.shardSequences.sum())
        self.position = 0
        self.order = np.roll(np.arange(len(self.files)), -(self.firstShard % len(self.files)))  # every epoch's
        self.cumulative = np.cumsum(self.shardSequences[self.order])
        self.cachedSlot = self.permutation = None  # (epoch, slot) and the sequence order of that shard
        self.mappedShard = self.tokens = None  # index (into self.files) of the mapped shard, its tokens

    def sequenceIndex(self, epoch, slot, local):
        """Index inside its shard of the local-th sequence read in `epoch` from the shard at `slot` of the order."""
        if self.shuffle == 0:
            return local
        if self.cachedSlot != (epoch, slot):
            rng = np.random.default_rng([self.seed, self.streamIndex, RNG_SEQUENCE_ORDER, epoch, slot])
            self.permutation = rng.permutation(int(self.shardSequences[self.order[slot]]))
            self.cachedSlot = (epoch, slot)
        return int(self.permutation[local])

    def next(self):
        """The next sequence: int64 array of seqLength+1 consecutive tokens of one shard."""
        epoch, offset = divmod(self.position, self.sequencesPerEpoch)
        order, cumulative = self.order, self.cumulative
        slot = int(np.searchsorted(cumulative, offset, side="right"))
        local = offset - (int(cumulative[slot - 1]) if slot > 0 else 0)
        start = self.sequenceIndex(epoch, slot, local) * self.seqLength
        if self.mappedShard != order[slot]:
            self.tokens = loadShard(self.files[order[slot]])
            self.mappedShard = order[slot]
            if self.tokens.size != self.sizes[self.mappedShard]:
                raise ShardError(f"data file {self.files[self.mappedShard]} changed while in use ({self.sizes[self.mappedShard]} tokens at the start, {self.tokens.size} now); restart the run once the data is final")
        sequence = np.array(self.tokens[start:start + self.seqLength + 1], dtype=np.int64)
        if self.shuffle == 2:
            rng = np.random.default_rng([self.seed, self.streamIndex, RNG_TOKEN_ORDER, self.position])
            sequence = rng.permutation(sequence)
        self.position += 1
        return sequence

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"stream position must be >= 0, got {position}")
        self.position = position


def validationSequences(files, seqLength, nTokens):
    """The first nTokens // seqLength sequences of the files (in file order) as int64 [nSeq, seqLength+1], with
    stride seqLength (so they cover the first nTokens + 1 tokens, as the original), none crossing a file boundary."""
    seqLength = checkSeqLength(seqLength)
    if int(nTokens) < 1:
        raise ValueError(f"nTokens must be a positive integer, got {nTokens!r}")
    wanted = int(nTokens) // seqLength
    pieces = []
    for path in files:
        if wanted == 0:
            break
        tokens = loadShard(path)
        nSeq = min(sequencesInShard(int(tokens.size), seqLength), wanted)
        wanted -= nSeq
        if nSeq:
            # overlapping windows as a view (no copy) of which every seqLength-th is a sequence
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:nSeq * seqLength + 1], seqLength + 1)
            pieces.append(windows[::seqLength][:nSeq].astype(np.int64))
    if not pieces:
        raise ShardError(f"{int(nTokens)} validation tokens of {len(files)} file(s) hold no sequence of seqLength+1 = {seqLength + 1} tokens; raise --nTokensVa, lower --seqLength or use more validation data")
    return np.concatenate(pieces)
