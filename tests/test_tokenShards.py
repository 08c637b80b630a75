"""Token shards: the on-disk format, every ShardError case, TokenStream order/determinism/resume, validation sequences."""
import os

import numpy as np
import pytest

from lmafs.data.tokenShards import (HEADER_INTS, MAGIC, VERSION, ShardError, TokenStream, listShards, loadShard, maxTokenId,
                         readShardHeader, validationSequences, writeShard)


def rawShard(path, header, tokens):
    """A shard written byte by byte, so that broken ones can be made."""
    full = np.zeros(HEADER_INTS, dtype="<i4")
    full[:len(header)] = header
    with open(path, "wb") as f:
        f.write(full.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())
    return str(path)


def labelledShards(folder, sizes):
    """Shards whose token k of shard s is s*10000 + k, so every window tells where it came from."""
    paths = []
    for s, size in enumerate(sizes):
        path = str(folder / f"data_train_{s:06d}.bin")
        writeShard(path, s * 10000 + np.arange(size))
        paths.append(path)
    return paths


def origin(sequence):
    """(shard, sequence index) of a window of labelled tokens, for seqLength 10."""
    shard, offset = divmod(int(sequence[0]), 10000)
    assert offset % 10 == 0
    np.testing.assert_array_equal(sequence, sequence[0] + np.arange(len(sequence)))
    return shard, offset // 10


# ---------------------------------------------------------------- format

def testRoundTripAndExactHeader(tmp_path):
    path = str(tmp_path / "a.bin")
    tokens = np.array([0, 1, 50256, 65535, 7])
    writeShard(path, tokens)
    assert os.listdir(tmp_path) == ["a.bin"]  # no temporary file left behind
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    assert header[:3].tolist() == [MAGIC, VERSION, 5] and not header[3:].any()
    assert os.path.getsize(path) == HEADER_INTS * 4 + 2 * 5
    assert readShardHeader(path) == 5
    loaded = loadShard(path)
    assert loaded.dtype == np.uint16 and loaded.tolist() == tokens.tolist()
    with pytest.raises(ValueError):
        loaded[0] = 3  # read-only


@pytest.mark.parametrize("bad", [[1, -1], [65536], [0.5]])
def testWriteShardRejectsIdsOutsideUint16(tmp_path, bad):
    path = str(tmp_path / "a.bin")
    with pytest.raises(ShardError, match="a.bin"):
        writeShard(path, bad)
    assert os.listdir(tmp_path) == []


def testWriteShardReplacesAtomically(tmp_path):
    path = str(tmp_path / "a.bin")
    writeShard(path, [1, 2, 3])
    writeShard(path, [4, 5])
    assert loadShard(path).tolist() == [4, 5]
    assert os.listdir(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("short", "less than the 1024-byte header"),
    ("magic", "magic number 12345"),
    ("version", "format version 7"),
    ("truncated", "header says 1000 tokens but the file holds 800; re-run preprocessFineweb.py"),
    ("longer", "header says 10 tokens but the file holds 12"),
])
def testReadShardHeaderErrors(tmp_path, case, message):
    path = str(tmp_path / "x.bin")
    if case == "short":
        with open(path, "wb") as f:
            f.write(b"\0" * 10)
    elif case == "magic":
        rawShard(path, [12345, VERSION, 3], [1, 2, 3])
    elif case == "version":
        rawShard(path, [MAGIC, 7, 3], [1, 2, 3])
    elif case == "truncated":
        rawShard(path, [MAGIC, VERSION, 1000], np.zeros(800))
    elif case == "longer":
        rawShard(path, [MAGIC, VERSION, 10], np.zeros(12))
    with pytest.raises(ShardError, match=message) as error:
        readShardHeader(path)
    assert path in str(error.value) and "\n" not in str(error.value)
    if case != "missing":
        with pytest.raises(ShardError):
            loadShard(path)


def testListShards(tmp_path):
    for name in ["d_train_000002.bin", "d_train_000001.bin", "d_val_000000.bin"]:
        writeShard(str(tmp_path / name), [1, 2])
    assert [os.path.basename(p) for p in listShards(str(tmp_path / "d_train_*.bin"))] == [
        "d_train_000001.bin", "d_train_000002.bin"]
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(ShardError, match=r"no token files match '.*nothing_\*\.bin' \(--filesTokensTr\); run preprocessFineweb.py"):
        listShards(pattern, "--filesTokensTr")
    rawShard(tmp_path / "d_train_000003.bin", [MAGIC, VERSION, 0], [])
    with pytest.raises(ShardError, match="d_train_000003.bin.*holds no tokens"):
        listShards(str(tmp_path / "d_train_*.bin"))
    rawShard(tmp_path / "d_train_000003.bin", [MAGIC, VERSION, 5], [1])
    with pytest.raises(ShardError, match="header says 5 tokens"):
        listShards(str(tmp_path / "d_train_*.bin"))


def testMaxTokenIdReadsInChunks(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 1000, 777), rng.integers(0, 50000, 1001)
    writeShard(str(tmp_path / "a.bin"), a)
    writeShard(str(tmp_path / "b.bin"), b)
    files = [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    assert maxTokenId(files, chunkTokens=100) == max(a.max(), b.max())
    assert maxTokenId(files[:1]) == a.max()


# ---------------------------------------------------------------- training stream

def testShuffle0ReadsInOrderFromTheStreamsShardWhateverTheSeed(tmp_path):
    files = labelledShards(tmp_path, [45, 31, 5, 21])  # (n-2)//10: 4, 2, 0 (skipped), 1 sequences of 10+1 tokens
    for seed in (0, 1, 7):
        stream = TokenStream(files, 10, seed=seed, streamIndex=1, shuffle=0)
        assert stream.sequencesPerEpoch == 7 and stream.nTokens == 102
        seen = [origin(stream.next()) for _ in range(14)]
        epoch = [(1, 0), (1, 1), (3, 0), (0, 0), (0, 1), (0, 2), (0, 3)]
        assert seen == epoch + epoch
        assert stream.position == 14


@pytest.mark.parametrize("seqLength", [1, 3, 10])
def testSequencesPerShardAreTheOriginalsCount(tmp_path, seqLength):
    for n in range(1, 40):
        files = labelledShards(tmp_path, [n])
        count = (n - 2) // seqLength if n >= 2 else 0  # one fewer than fit when n - 1 is a multiple of seqLength
        if count == 0:
            with pytest.raises(ShardError, match="shorter than"):
                TokenStream(files, seqLength, seed=0, streamIndex=0, shuffle=0)
            continue
        stream = TokenStream(files, seqLength, seed=0, streamIndex=0, shuffle=0)
        assert stream.sequencesPerEpoch == count, n
        assert [int(stream.next()[0]) for _ in range(count + 1)] == [j * seqLength for j in range(count)] + [0]


@pytest.mark.parametrize("shuffle", [0, 1])
def testEveryEpochReadsEverySequenceOnceWithTheShardsInFileOrder(tmp_path, shuffle):
    files = labelledShards(tmp_path, [101, 57, 11, 9, 40])  # (n-2)//10: 9, 5, 0, 0, 3 sequences
    stream = TokenStream(files, 10, seed=3, streamIndex=2, shuffle=shuffle)
    expected = sorted((s, j) for s, n in enumerate([9, 5, 0, 0, 3]) for j in range(n))
    epochs = [[origin(stream.next()) for _ in range(stream.sequencesPerEpoch)] for _ in range(3)]
    # of the 3 shards holding sequences, the stream starts at (2 + seed*shuffle) mod 3, then wraps around in file order
    first = [0, 1, 4][(2 + 3 * shuffle) % 3]
    order = [first] + [s for s in (0, 1, 4) if s > first] + [s for s in (0, 1, 4) if s < first]
    for epoch in epochs:
        assert sorted(epoch) == expected
        assert [s for s, _ in epoch] == [s for s in order for _ in range({0: 9, 1: 5, 4: 3}[s])]
    if shuffle:  # the sequences inside a shard come in another order every epoch
        assert epochs[0] != epochs[1] != epochs[2]
    else:
        assert epochs[0] == sorted(epochs[0], key=lambda o: (order.index(o[0]), o[1]))


def testStreamsDifferAndAreReproducible(tmp_path):
    files = labelledShards(tmp_path, [61, 61, 61])

    def firstSequences(seed, streamIndex, n=12):
        stream = TokenStream(files, 10, seed=seed, streamIndex=streamIndex, shuffle=1)
        return [origin(stream.next()) for _ in range(n)]

    assert firstSequences(5, 0) == firstSequences(5, 0)
    # stream i starts at shard (i + seed) mod nShards, as the original's model i
    assert [firstSequences(5, i)[0][0] for i in range(3)] == [2, 0, 1]
    assert [firstSequences(7, i)[0][0] for i in range(4)] == [1, 2, 0, 1]
    assert firstSequences(5, 0) != firstSequences(5, 3)  # same starting shard, other order
    assert firstSequences(5, 0) != firstSequences(6, 0)


@pytest.mark.parametrize("shuffle", [0, 1, 2])
def testResumeFromPosition(tmp_path, shuffle):
    files = labelledShards(tmp_path, [95, 41, 23])
    original = TokenStream(files, 10, seed=1, streamIndex=4, shuffle=shuffle)
    for _ in range(17):  # past the end of the first epoch (14 sequences)
        original.next()
    state = original.state_dict()
    assert state == {"position": 17}
    resumed = TokenStream(files, 10, seed=1, streamIndex=4, shuffle=shuffle)
    resumed.load_state_dict(state)
    for _ in range(30):
        np.testing.assert_array_equal(resumed.next(), original.next())
    # a fresh stream that jumps there gives the same as one that walked there
    jumped = TokenStream(files, 10, seed=1, streamIndex=4, shuffle=shuffle)
    jumped.position = 5
    walked = TokenStream(files, 10, seed=1, streamIndex=4, shuffle=shuffle)
    for _ in range(5):
        walked.next()
    np.testing.assert_array_equal(jumped.next(), walked.next())


def testShuffle2PermutesTokensInsideEachSequence(tmp_path):
    files = labelledShards(tmp_path, [95, 41])
    ordered = TokenStream(files, 10, seed=2, streamIndex=0, shuffle=1)
    scrambled = TokenStream(files, 10, seed=2, streamIndex=0, shuffle=2)
    for _ in range(6):
        a, b = ordered.next(), scrambled.next()
        assert b.dtype == np.int64 and b.shape == (11,)
        assert sorted(a.tolist()) == sorted(b.tolist()) and a.tolist() != b.tolist()


def testStreamTooShortData(tmp_path):
    files = labelledShards(tmp_path, [8, 11])
    with pytest.raises(ShardError, match=r"shorter than seqLength\+2 = 12 tokens.*lower --seqLength"):
        TokenStream(files, 10, seed=0, streamIndex=0, shuffle=1)
    assert TokenStream(files, 9, seed=0, streamIndex=0, shuffle=1).sequencesPerEpoch == 1


# ---------------------------------------------------------------- validation

def testValidationSequencesUseTheFirstTokensOnly(tmp_path):
    files = labelledShards(tmp_path, [100, 55, 80])
    sequences = validationSequences(files, 10, 130)  # 130 // 10 sequences: the 9 of shard 0, then 4 of shard 1
    assert sequences.dtype == np.int64 and sequences.shape == (13, 11)
    assert [origin(s) for s in sequences] == [(0, j) for j in range(9)] + [(1, j) for j in range(4)]
    assert validationSequences(files, 10, 10**6).shape == (9 + 5 + 7, 11)
    assert validationSequences(files, 10, 10).shape == (1, 11)  # nTokens // seqLength, the +1 target token extra
    with pytest.raises(ShardError, match=r"9 validation tokens.*seqLength\+1 = 11"):
        validationSequences(files, 10, 9)


def testStreamNoticesAShardRewrittenWhileInUse(tmp_path):
    files = labelledShards(tmp_path, [41, 41])
    stream = TokenStream(files, 10, seed=0, streamIndex=0, shuffle=0)
    stream.next()
    writeShard(files[1], np.arange(30))
    with pytest.raises(ShardError, match="changed while in use"):
        for _ in range(8):
            stream.next()
