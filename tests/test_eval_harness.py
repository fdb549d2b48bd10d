"""mixtral.eval.harness: the lm-evaluation-harness model "mixtral" against direct computations with the model
(loglikelihood, rolling windows, greedy generation with stop strings), and whole runs of lm_eval on local tasks."""
from __future__ import annotations

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mixtral.config import PRESETS  # noqa: E402
from mixtral.errors import InputError  # noqa: E402
from mixtral.eval.harness import MixtralLM, generation_settings, run_lm_eval  # noqa: E402
from mixtral.generate import find_stop, generate  # noqa: E402
from mixtral.io.loading import load_tokenizer  # noqa: E402
from mixtral.model import random_model  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    # std 0.2: logits far enough from uniform that a token scored with the wrong context shows.
    return random_model(PRESETS["tiny"], seed=7, std=0.2)


def make_lm(model, tokenizer, **kwargs) -> MixtralLM:
    return MixtralLM(model, tokenizer, **kwargs)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def direct(model, ids: list[int], n: int) -> tuple[float, bool]:
    """(log p of the last n tokens of ids given the rest, all of them argmax) from one plain forward: the oracle."""
    logits = model(torch.tensor([ids[:-1]]))[0, -n:].float()
    targets = torch.tensor(ids[-n:])
    logprobs = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    return float(logprobs.double().sum()), bool((logits.argmax(-1) == targets).all())


def direct_pair(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    if not context:  # lm_eval conditions an empty context on the prefix token, BOS for this model
        continuation_ids = tokenizer.encode(continuation, bos=False)
        return direct(model, [tokenizer.bos_id] + continuation_ids, len(continuation_ids))
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return direct(model, whole, len(whole) - len(head))


def test_registered_as_mixtral():
    assert get_model("mixtral") is MixtralLM
    assert issubclass(MixtralLM, lm_eval.api.model.LM)


def test_loglikelihood_equals_direct_computation(model, tokenizer):
    pairs = [("The capital of France is", " Paris"), ("", "Hello world"),
             ("Mixtral routes each token to", " two of eight experts, chosen by a router."),
             ("Two plus two is", " four")]
    expected = [direct_pair(model, tokenizer, c, x) for c, x in pairs]
    for batch_size in (1, 3):
        lm = make_lm(model, tokenizer, batch_size=batch_size)
        got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
        for (lp, greedy), (want_lp, want_greedy) in zip(got, expected):
            assert lp == pytest.approx(want_lp, rel=1e-5) and greedy == want_greedy
    # A trailing space of the context belongs to the continuation, as in lm_eval's own models.
    lm = make_lm(model, tokenizer)
    (moved, _), = lm.loglikelihood([request("loglikelihood", "Two plus two is ", "four")], disable_tqdm=True)
    assert moved == pytest.approx(expected[3][0], rel=1e-5)


def test_is_greedy_and_truncation(model, tokenizer):
    lm = make_lm(model, tokenizer, max_length=6)
    context = tokenizer.encode("A long context that is longer than six tokens, by some margin")
    # A row keeps its last max_length + 1 = 7 tokens: the last 5 of the context, then the 2 scored.
    greedy = generate(model, [context[-5:]], 2, eos_id=None)[0]
    other = [(greedy[0] + 1) % 32000] + greedy[1:]
    (lp, is_greedy), (_, not_greedy) = lm.score([(context, greedy), (context, other)], disable_tqdm=True)
    assert is_greedy and not not_greedy
    assert lp == pytest.approx(direct(model, (context + greedy)[-7:], 2)[0], rel=1e-5)
    assert lm.score([(context, [])], disable_tqdm=True) == [(0.0, True)]


def test_loglikelihood_rolling_scores_each_token_once_with_lm_eval_windows(model, tokenizer):
    text = "The mixture of experts layer sends every token to two experts."
    tokens = tokenizer.encode(text, bos=False)
    length = 5
    assert len(tokens) > 2 * length
    expected = 0.0
    for p in range(len(tokens)):  # the windows of lm_eval's LM.loglikelihood_rolling docstring
        if p < length:
            context = [tokenizer.bos_id] + tokens[:p]
        else:
            end = min(length + ((p - length) // length + 1) * length, len(tokens))
            context = tokens[end - length - 1:p]
        expected += direct(model, context + [tokens[p]], 1)[0]
    requests = [request("loglikelihood_rolling", text), request("loglikelihood_rolling", "Short.")]
    got = make_lm(model, tokenizer, max_length=length, batch_size=3).loglikelihood_rolling(requests, True)
    assert got[0] == pytest.approx(expected, rel=1e-5)
    short = tokenizer.encode("Short.")
    assert got[1] == pytest.approx(direct(model, short, len(short) - 1)[0], rel=1e-5)


def direct_generation(model, tokenizer, context: str, n: int, until: list[str]) -> str:
    prompt = tokenizer.encode(context)
    ids = generate(model, [prompt], n, eos_id=tokenizer.eos_id)[0]
    ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids
    text = tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]
    cut = find_stop(text, until)
    return text[:cut] if cut >= 0 else text


def test_generate_until_equals_greedy_generation_cut_at_stop(model, tokenizer):
    contexts = ["Q: What is 6 * 7?\nA:", "Once upon a time, in a land far away, there lived", "Hi"]
    free = [direct_generation(model, tokenizer, c, 6, []) for c in contexts]
    stop = free[1][2:4]
    assert stop and stop in free[1]
    gen_kwargs = {"until": [stop], "max_gen_toks": 6, "do_sample": False, "temperature": 0.0}
    # Greedy decoding does not depend on the stop strings, so the oracle is the free text cut at the first one.
    expected = [text[:find_stop(text, [stop])] if find_stop(text, [stop]) >= 0 else text for text in free]
    assert expected[1] == free[1][:free[1].find(stop)]
    lm = make_lm(model, tokenizer, batch_size=2)  # a batch of two rows of different lengths, then one alone
    assert lm.generate_until([request("generate_until", c, gen_kwargs) for c in contexts], True) == expected


def test_sampling_is_seeded_and_options_are_checked(model, tokenizer):
    lm = make_lm(model, tokenizer)
    kwargs = {"until": [], "max_gen_toks": 5, "do_sample": True, "temperature": 1.0, "seed": 3}
    first = lm.generate_until([request("generate_until", "Hello", kwargs)], True)
    assert first == lm.generate_until([request("generate_until", "Hello", kwargs)], True)
    with pytest.raises(InputError, match="not supported by the mixtral model: length_penalty"):
        generation_settings({"until": [], "length_penalty": 2.0}, 2)
    with pytest.raises(InputError, match="beam search"):
        generation_settings({"num_beams": 4}, 2)
    assert generation_settings({"until": "\n"}, 2)["until"] == ["\n"]


def test_constructor_arguments(model, tokenizer):
    with pytest.raises(InputError, match="max_length"):
        make_lm(model, tokenizer, max_length=100000)
    with pytest.raises(InputError, match="batch_size"):
        make_lm(model, tokenizer, batch_size="many")
    with pytest.raises(InputError, match="Tokenizer object"):
        MixtralLM(model, "mixtral")
    lm = MixtralLM.create_from_arg_string("pretrained=tiny,max_length=64,batch_size=auto",
                                          {"batch_size": None, "max_batch_size": None, "device": None})
    assert (lm.max_length, lm.batch_size, lm.model.config) == (64, 16, PRESETS["tiny"])


# ---- whole runs on local tasks ---------------------------------------------------------------------------------

MC_DOCS = [{"question": "The capital of France is", "choices": ["Paris", "Berlin", "a small town"], "gold": 0},
           {"question": "Two plus two is", "choices": ["four", "five"], "gold": 1},
           {"question": "Experts per token:", "choices": ["two", "eight", "one"], "gold": 2}]
GEN_DOCS = [{"question": "Q: What is 6 * 7?\nA:", "answer": "42"}, {"question": "Q: Name a colour.\nA:",
                                                                      "answer": "red"}]


def write_tasks(directory) -> None:
    """A multiple-choice task and a generate_until task whose data are local JSONL files (no dataset hub)."""
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"dataset_path: json\ntest_split: test\ndoc_to_text: \"{{{{question}}}}\"\n"
    (directory / "mc.yaml").write_text(
        f"task: mixtral_test_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{gold}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (directory / "gen.yaml").write_text(
        f"task: mixtral_test_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \"Q:\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_simple_evaluate_on_local_tasks(model, tokenizer, tmp_path, offline):
    write_tasks(tmp_path)
    lm = make_lm(model, tokenizer, batch_size=4)
    results = lm_eval.simple_evaluate(model=lm, tasks=["mixtral_test_mc", "mixtral_test_gen"], bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                      log_samples=True)
    correct = 0
    samples = sorted(results["samples"]["mixtral_test_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC_DOCS)
    for sample, doc in zip(samples, MC_DOCS):
        scores = [direct_pair(model, tokenizer, context, continuation) for context, continuation in
                  sample["arguments"]]
        assert [c for _, c in sample["arguments"]] == [" " + choice for choice in doc["choices"]]
        for (got, _), (want, _) in zip(sample["filtered_resps"], scores):
            assert got == pytest.approx(want, rel=1e-5)
        correct += max(range(len(scores)), key=lambda i: scores[i][0]) == doc["gold"]
    assert results["results"]["mixtral_test_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))
    for sample in results["samples"]["mixtral_test_gen"]:
        context = sample["arguments"][0][0]
        assert sample["resps"] == [[direct_generation(model, tokenizer, context, 6, ["\n", "Q:"])]]
    assert not math.isnan(results["results"]["mixtral_test_gen"]["exact_match,none"])


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_registered_model(tmp_path, offline, capsys):
    # lm_eval's command line indexes every built-in task (about 20 s) before it reads --include_path.
    write_tasks(tmp_path)
    out = tmp_path / "out"
    assert run_lm_eval(["--model", "mixtral", "--model_args", "pretrained=tiny,max_length=64",
                        "--tasks", "mixtral_test_mc", "--include_path", str(tmp_path), "--limit", "2",
                        "--output_path", str(out)]) == 0
    assert "mixtral_test_mc" in capsys.readouterr().out
    assert list(out.rglob("results_*.json"))
