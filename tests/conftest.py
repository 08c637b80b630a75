"""Shared fixtures: tiny token shards, a helper to run trainLmAf.py at tiny sizes, and a machine without network."""
import os
import socket
import subprocess
import sys

# Tiny models run faster on one thread, and it keeps timings sane when other processes share the cores;
# set before torch is imported so the subprocesses the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = os.path.join(REPO, "results-fineweb10B", "upstream")  # the original authors' files
sys.path.insert(0, REPO)

from lmafs.data.tokenShards import writeShard  # noqa: E402

SEP = 50256
# tests/pretendCuda makes torch claim a GPU that is not there: the CUDA tests cannot run then
PRETENDED_CUDA = os.environ.get("LMAFS_PRETENDED_CUDA") == "1"
requiresCuda = pytest.mark.skipif(PRETENDED_CUDA or not torch.cuda.is_available(), reason="needs a CUDA GPU")


def randomDocuments(rng, nTokens, vocab=500):
    """Token ids with a separator before each document of random length."""
    tokens = []
    while len(tokens) < nTokens:
        tokens.append(SEP)
        tokens.extend(rng.integers(0, vocab, rng.integers(5, 60)).tolist())
    return np.array(tokens[:nTokens])


@pytest.fixture(scope="session")
def tinyData(tmp_path_factory):
    """A folder with one validation and two training shards of random documents."""
    folder = tmp_path_factory.mktemp("tinyData")
    rng = np.random.default_rng(0)
    writeShard(str(folder / "fineweb_val_000000.bin"), randomDocuments(rng, 3000))
    writeShard(str(folder / "fineweb_train_000001.bin"), randomDocuments(rng, 6000))
    writeShard(str(folder / "fineweb_train_000002.bin"), randomDocuments(rng, 5000))
    return folder


@pytest.fixture(scope="session")
def noNetworkEnv(tmp_path_factory):
    """Environment variables of a fresh machine without network: tiktoken's cache is empty and every HTTP(S)
    request goes to a closed local port, so it fails at once (as tiktoken's download does offline)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closedPort = probe.getsockname()[1]
    proxy = f"http://127.0.0.1:{closedPort}"
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path_factory.mktemp("emptyTiktokenCache")), "NO_PROXY": "", "no_proxy": ""}
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env[name] = proxy
    return env


@pytest.fixture
def offline(monkeypatch, noNetworkEnv):
    """noNetworkEnv in this process, for the test's duration."""
    for name, value in noNetworkEnv.items():
        monkeypatch.setenv(name, value)


def tinyFlags(dataDir, resultsDir, **overrides):
    """Flags of a tiny run (2 layers x 32) on the tiny shards, on the CPU also where a GPU exists (the CUDA path
    has its own tests, marked requiresCuda); overrides replace or add flags."""
    flags = {"filesTokensTr": f"{dataDir}/fineweb_train_*.bin", "filesTokensVa": f"{dataDir}/fineweb_val_*.bin",
             "dirResults": str(resultsDir), "nLayers": 2, "nHeads": 2, "dimEmb": 32, "seqLength": 32,
             "contextSize": 16, "nSteps": 8, "nStepsWarmup": 2, "nStepsCooldown": 3, "valEvery": 4, "plotEvery": 4,
             "nTokensVa": 256, "plottingLevel": 0, "device": "cpu"}
    flags.update(overrides)
    argv = []
    for name, value in flags.items():
        argv += [f"--{name}", str(value)]
    return argv


def runTrainer(argv, timeout=300):
    """Run trainLmAf.py in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(REPO, "trainLmAf.py")] + argv, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
