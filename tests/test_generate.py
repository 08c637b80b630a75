"""Tests for generate.py: token picking, the context window, stopping at the separator, determinism under a
seed, and the error lines for bad model files."""
import os

import pytest
import torch

from test_evalBlimp import badModelFiles, trainTinyRun

import generate
from lmafs.run.checkpoints import LoadError, checkTokensFit
from lmafs.data.vocabulary import SHIPPED_VOCAB_FILE


@pytest.fixture(scope="module")
def runs(tinyData, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generateRuns")
    single = trainTinyRun(tinyData, folder, "tiny")
    return {"single": single, "bad": badModelFiles(folder / "bad", single)}


class CountingModel:
    """Stands in for a GPT: records every context it is fed and always favours `favourite(last token)`."""

    def __init__(self, vocabSize, favourite):
        self.vocabSize, self.favourite, self.contexts = vocabSize, favourite, []

    def logits(self, tokens):
        self.contexts.append(tokens[0, 0].tolist())
        logits = torch.zeros(1, 1, tokens.shape[-1], self.vocabSize)
        logits[..., self.favourite(int(tokens[0, 0, -1]))] = 100.0
        return logits


def testPickTokenGreedyAndTopK():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert generate.pickToken(logits, 0.0, 0, generator) == 1
    assert {generate.pickToken(logits, 5.0, 1, generator) for _ in range(50)} == {1}
    assert {generate.pickToken(logits, 50.0, 2, generator) for _ in range(200)} == {1, 2}
    assert {generate.pickToken(logits, 50.0, 0, generator) for _ in range(400)} == {0, 1, 2, 3}


def testContextIsTheLastWindowTokensAndSamplingStopsAtTheSeparator():
    model = CountingModel(20, favourite=lambda last: last + 1)
    prompt = [9, 0, 1, 2, 3, 4, 5]
    new, stopped = generate.sampleTokens(model, prompt, maxNewTokens=50, window=4, temperature=0.0, topK=0,
                                         stopToken=12, nUsable=20, generator=None, device=torch.device("cpu"))
    assert new == [6, 7, 8, 9, 10, 11] and stopped
    assert model.contexts[0] == [2, 3, 4, 5] and model.contexts[-1] == [8, 9, 10, 11]
    assert max(len(c) for c in model.contexts) == 4


def testTokensTheTokenizerCannotDecodeAreNeverDrawn():
    model = CountingModel(20, favourite=lambda last: 17)  # a padded vocabulary entry: beyond nUsable = 15
    generator = torch.Generator().manual_seed(0)
    new, stopped = generate.sampleTokens(model, [0], maxNewTokens=30, window=8, temperature=1.0, topK=3,
                                         stopToken=19, nUsable=15, generator=generator, device=torch.device("cpu"))
    assert len(new) == 30 and not stopped and max(new) < 15


def testPromptBeyondTheModelVocabularyIsAClearError():
    checkTokensFit([0, 11, 511], 512, "--prompt")
    with pytest.raises(LoadError, match="--prompt holds token id 50256, but the model knows only ids below 512"):
        checkTokensFit([50256, 11], 512, "--prompt")


def runGenerate(capsys, modelFile, *flags):
    code = generate.main(["--device", "cpu", "--modelFile", modelFile, *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def testSameSeedSameTextOtherSeedOtherText(runs, capsys, offline):
    flags = ("--prompt", "The city", "--maxNewTokens", "30", "--temperature", "1.0", "--topK", "0")
    code, first, err = runGenerate(capsys, runs["single"], *flags, "--seed", "3")
    assert code == 0 and first.startswith("The city") and len(first) > len("The city\n")
    assert "model 0 of 1" in err and "tokens, stopped at" in err
    assert f"GPT-2 vocabulary: shipped copy {SHIPPED_VOCAB_FILE}\n" in err  # no flag, no cache, no network
    assert runGenerate(capsys, runs["single"], *flags, "--seed", "3")[1] == first
    assert runGenerate(capsys, runs["single"], *flags, "--seed", "4")[1] != first


def testVocabFileGivesTheSameText(runs, capsys, offline, tmp_path):
    copy = tmp_path / "gpt2.tiktoken"
    copy.write_bytes(open(SHIPPED_VOCAB_FILE, "rb").read())
    flags = ("--prompt", "The city", "--maxNewTokens", "20", "--temperature", "1.0", "--seed", "5")
    code, shipped, _ = runGenerate(capsys, runs["single"], *flags)
    assert code == 0
    code, given, err = runGenerate(capsys, runs["single"], *flags, "--vocab_file", str(copy))
    assert code == 0 and given == shipped and f"GPT-2 vocabulary: --vocab_file {copy}\n" in err


def testContextWindowComesFromTheCheckpoint(runs, capsys, monkeypatch, offline):
    windows = []
    original = generate.sampleTokens

    def recordingSampleTokens(model, tokens, maxNewTokens, window, *rest):
        windows.append((len(tokens), window))
        return original(model, tokens, maxNewTokens, window, *rest)

    monkeypatch.setattr(generate, "sampleTokens", recordingSampleTokens)
    code, out, _ = runGenerate(capsys, runs["single"], "--prompt", " ".join(["word"] * 40),
                                 "--maxNewTokens", "5")
    # The tiny run has contextSize 16 < seqLength 32; the prompt (41 tokens with <|endoftext|>) is longer.
    assert code == 0 and windows == [(41, 16)]
    assert out.startswith(" ".join(["word"] * 40))


@pytest.mark.parametrize("case", ["ptAf", "damaged", "missing", "trapped", "foreign"])
def testBadModelFileIsOneErrorLine(runs, capsys, case):
    path, words, marker = runs["bad"][case]
    code, out, err = runGenerate(capsys, path, "--prompt", "Hello")
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(word in err for word in words), err
    assert marker is None or not os.path.exists(marker)


@pytest.mark.parametrize("flags, message", [
    (["--maxNewTokens", "0"], "--maxNewTokens must be at least 1, got 0"),
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--topK", "-5"], "--topK must be >= 0, got -5"),
])
def testBadFlagsAreOneErrorLine(capsys, flags, message):
    with pytest.raises(SystemExit) as exited:
        generate.main(["--device", "cpu", "--modelFile", "pt-x-step0001.pt"] + flags)
    assert exited.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
