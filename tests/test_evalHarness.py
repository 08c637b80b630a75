"""Tests for evalHarness.py, offline: local task YAMLs over local jsonl files run end to end; the harness's BLiMP
accuracy equals evalBlimp.py's on the same pairs; rolling log-likelihood equals the trainer's validation loss on the
same tokens; generate_until equals generate.py's greedy continuation."""
import csv
import json
import math
import os

import pytest
import torch

from conftest import REPO, tinyFlags

pytest.importorskip("lm_eval")

import evalBlimp  # noqa: E402
import evalHarness  # noqa: E402
import generate  # noqa: E402
import trainLmAf  # noqa: E402
from lmafs.run.checkpoints import encodingOf, gpt2Encoding, loadModel  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lmafs.data.tokenShards import writeShard  # noqa: E402

BLIMP_SAMPLE = os.path.join(REPO, "tests", "data", "blimp-sample")
SEQ_LENGTH = 32
TEXT = ("The harness reads our checkpoints and scores every text the way the trainer does, one window of tokens "
        "after another, so the numbers agree with the validation loss that the training log already prints. A text "
        "longer than one sequence is cut into windows of the sequence length, each one predicted after the token "
        "before it, which is exactly how the validation data is cut into sequences.")


@pytest.fixture(autouse=True)
def offlineHub(monkeypatch, offline):
    """No dataset or model download: only the local files the tests write."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


@pytest.fixture(scope="module")
def run(tinyData, tmp_path_factory):
    """A tiny trained model whose validation data is TEXT cut to 2 sequences of SEQ_LENGTH tokens; its final
    checkpoint, validation loss, and the exact text of those tokens."""
    folder = tmp_path_factory.mktemp("harnessRun")
    encoding, _ = gpt2Encoding(None)
    tokens = encoding.encode_ordinary(TEXT)[:2 * SEQ_LENGTH]
    text = encoding.decode(tokens)
    assert len(tokens) == 2 * SEQ_LENGTH and encoding.encode_ordinary(text) == tokens  # the cut text tokenizes back
    writeShard(str(folder / "fineweb_val_000000.bin"), [encoding.eot_token] + tokens)
    flags = tinyFlags(tinyData, folder, runName="harness", nSteps=6, nStepsWarmup=1, nStepsCooldown=2, valEvery=0,
                      plotEvery=100, saveModelEvery=0, seqLength=SEQ_LENGTH, contextSize=16,
                      filesTokensVa=str(folder / "fineweb_val_*.bin"), nTokensVa=2 * SEQ_LENGTH)
    assert trainLmAf.main(flags) == 0
    with open(folder / "metrics-harness.csv", newline="") as f:
        lossVa = [float(row["loss"]) for row in csv.DictReader(f) if row["split"] == "val" and row["step"] == "6"]
    assert len(lossVa) == 1
    return {"modelFile": str(folder / "pt-harness-step0006.pt"), "lossVa": lossVa[0], "text": text,
            "nTokens": len(tokens), "folder": folder}


def writeTasks(folder, run):
    """Local task YAMLs: one BLiMP task per sample set (the sentence alone as the continuation, as evalBlimp.py
    scores it) and one rolling log-likelihood task over a jsonl holding the run's validation text."""
    folder.mkdir(exist_ok=True)
    names = []
    for fileName in sorted(os.listdir(BLIMP_SAMPLE)):
        uid = fileName[:-len(".jsonl")]
        names.append(f"lmafs_blimp_{uid}")
        (folder / f"{uid}.yaml").write_text(f"""task: lmafs_blimp_{uid}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {os.path.join(BLIMP_SAMPLE, fileName)}
validation_split: train
output_type: multiple_choice
doc_to_text: ""
target_delimiter: ""
doc_to_target: 0
doc_to_choice: "{{{{[sentence_good, sentence_bad]}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    (folder / "rolling.jsonl").write_text(json.dumps({"text": run["text"]}) + "\n")
    (folder / "rolling.yaml").write_text(f"""task: lmafs_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'rolling.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
metadata:
  version: 1.0
""")
    return names


@pytest.fixture(scope="module")
def bpeRun(tmp_path_factory):
    """A tiny model trained on shards of a corpus vocabulary (preprocessFineweb.py --vocabSize): its checkpoint."""
    import preprocessFineweb

    folder = tmp_path_factory.mktemp("harnessBpe")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(f"{TEXT} Paragraph {i} ends here." for i in range(60)))
    assert preprocessFineweb.main([str(folder / "data"), "--input", str(corpus), "--shard_size", "2000",
                                   "--vocabSize", "300", "--num_proc", "1"]) == 0
    # BLiMP sentences take more ids of a 300-id vocabulary than of GPT-2's: a longer sequence holds them
    flags = tinyFlags(folder / "data", folder, runName="bpe", nSteps=6, nStepsWarmup=1, nStepsCooldown=2, valEvery=0,
                      plotEvery=100, saveModelEvery=0, seqLength=96)
    assert trainLmAf.main(flags) == 0
    return {"modelFile": str(folder / "pt-bpe-step0006.pt"), "text": TEXT, "folder": folder}


@pytest.mark.parametrize("which", ["gpt2", "corpusVocabulary"])
def test_blimpAccuracyEqualsEvalBlimpsOnTheSamePairs(run, bpeRun, capsys, which):
    run = run if which == "gpt2" else bpeRun
    limit = 25
    names = writeTasks(run["folder"] / "tasks", run)
    args = evalHarness.parseArgs(["--device", "cpu", "--modelFile", run["modelFile"], "--tasks", ",".join(names),
                                  "--include_path", str(run["folder"] / "tasks"), "--limit", str(limit)])
    results = evalHarness.evaluate(args)
    table = capsys.readouterr().out
    assert all(name in table for name in names) and "acc" in table

    trained = loadModel(run["modelFile"], None, torch.device("cpu"))
    encoding, line = encodingOf(trained, None)
    assert line.startswith("GPT-2 vocabulary" if which == "gpt2" else "Tokenizer: the checkpoint's byte-level BPE")
    assert (trained.vocabSize == 384) == (which == "corpusVocabulary")
    sets = evalBlimp.readLocalSets(BLIMP_SAMPLE, limit)
    scores = evalBlimp.sentenceLogProbs(trained.model, evalBlimp.tokenizeSets(sets, encoding, trained.vocabSize), 8,
                                        torch.device("cpu"))
    setRows, _, _ = evalBlimp.aggregate(sets, evalBlimp.pairsCorrect(scores))
    harness = {name[len("lmafs_blimp_"):]: 100 * results["results"][name]["acc,none"] for name in names}
    ours = {row["UID"]: row["accuracy"] for row in setRows}
    assert harness == pytest.approx(ours, abs=1e-9)
    assert all(row["nPairs"] == limit for row in setRows)


def test_rollingLogLikelihoodEqualsTheValidationLoss(run):
    model = evalHarness.LmAfsModel(run["modelFile"], device="cpu")
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(run["text"],), idx=0)
    # two windows of SEQ_LENGTH predicted tokens: the trainer's two validation sequences
    (logLikelihood,) = model.loglikelihood_rolling([request])
    assert -logLikelihood / run["nTokens"] == pytest.approx(run["lossVa"], abs=2e-6)
    # with a window of both sequences the text is one pass, whose later tokens see more context: another number
    model.maxLength = 2 * SEQ_LENGTH
    (onePass,) = model.loglikelihood_rolling([request])
    assert onePass != pytest.approx(logLikelihood, abs=1e-3)


def test_localRollingTaskRunsEndToEndByItsRegisteredName(run):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    assert get_model("lmafs") is evalHarness.LmAfsModel
    writeTasks(run["folder"] / "tasks", run)
    results = lm_eval.simple_evaluate(model="lmafs", model_args={"modelFile": run["modelFile"], "device": "cpu"},
                                      tasks=["lmafs_rolling"],
                                      task_manager=TaskManager(include_path=str(run["folder"] / "tasks")))
    bitsPerByte = results["results"]["lmafs_rolling"]["bits_per_byte,none"]
    nBytes = len(run["text"].encode("utf-8"))
    assert bitsPerByte == pytest.approx(run["lossVa"] * run["nTokens"] / (nBytes * math.log(2)), rel=1e-5)


def test_loglikelihoodOfAContinuationIsTheDifferenceOfTwoSentenceScores(run):
    model = evalHarness.LmAfsModel(run["modelFile"], device="cpu")
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=("The harness reads", " our checkpoints"),
                         idx=0),
                Instance(request_type="loglikelihood", doc={}, arguments=("", "The harness"), idx=1)]
    (pair, greedyPair), (alone, _) = model.loglikelihood(requests)
    encoding, eot = model.encoding, model.eot_token_id
    whole, prefix, short = evalBlimp.sentenceLogProbs(model.trained.model, [
        [eot] + encoding.encode_ordinary("The harness reads our checkpoints"),
        [eot] + encoding.encode_ordinary("The harness reads"), [eot] + encoding.encode_ordinary("The harness")],
        3, torch.device("cpu")).tolist()
    assert pair == pytest.approx(whole - prefix, abs=1e-4)
    assert alone == pytest.approx(short, abs=1e-4)
    assert isinstance(greedyPair, bool)


def test_generateUntilIsGreedyTextCutAtTheStopString(run):
    model = evalHarness.LmAfsModel(run["modelFile"], device="cpu")
    context = "The harness reads"
    trained = model.trained
    tokens = [model.eot_token_id] + model.encoding.encode_ordinary(context)
    new, _ = generate.sampleTokens(trained.model, tokens, 12, 16, 0.0, 0, model.eot_token_id,
                                   min(trained.vocabSize, model.encoding.n_vocab), None, torch.device("cpu"))
    greedy = model.encoding.decode(new)
    (free,) = model.generate_until([Instance(request_type="generate_until", doc={},
                                             arguments=(context, {"until": ["\x00"], "max_gen_toks": 12}), idx=0)])
    assert free == greedy and len(greedy) > 0
    stop = model.encoding.decode(new[3:5])
    (cut,) = model.generate_until([Instance(request_type="generate_until", doc={},
                                            arguments=(context, {"until": [stop], "max_gen_toks": 12}), idx=0)])
    assert cut == greedy.split(stop)[0] and len(cut) < len(greedy)


def test_unknownTaskIsOneErrorLine(run, capsys):
    assert evalHarness.main(["--device", "cpu", "--modelFile", run["modelFile"], "--tasks", "no_such_task_anywhere"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tasks: unknown task(s) no_such_task_anywhere") and "\n" not in err
