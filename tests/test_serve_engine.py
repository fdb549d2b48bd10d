"""The continuous-batching engine in-process, stepped by hand so that arrivals land on chosen steps.

Oracle: `mixtral.generate` on each prompt alone. Whatever joins and leaves the batch around it (arrivals at every
step, prompts prefilled over several steps, rows moving as others finish, a queue longer than the pool, a
sliding-window model's rolling cache), a sequence gets exactly the tokens it gets alone.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import mixtral
from mixtral.errors import ContextLengthError, InputError
from mixtral.serve import engine as engine_module
from mixtral.serve.engine import Engine, QueueFullError, SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    return mixtral.load_tokenizer()


@pytest.fixture(scope="module", params=["tiny", "tiny-dense"])
def model(request):
    # tiny-dense has a sliding window of 32: prompts and rows longer than it run through the rolling buffer.
    torch.set_num_threads(1)
    return mixtral.load(request.param)


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 32000, (n - 1,), generator=generator).tolist() for n in lengths]


def run(engine: Engine, jobs: list[tuple[list[int], SamplingParams]], arrive_every: int = 1) -> list[list]:
    """Submit job i at step i * arrive_every and step until all are done; the events of each job."""
    events: list[list] = [[] for _ in jobs]
    generations, step = [], 0
    while len(generations) < len(jobs) or engine.rows or engine.waiting:
        if len(generations) < len(jobs) and step % arrive_every == 0:
            i = len(generations)
            generations += engine.submit([(jobs[i][0], jobs[i][1], events[i].append)])
        with torch.inference_mode():
            engine.step()
        step += 1
        assert step < 2000
    return events


def wait_for(engine: Engine, prompt: list[int], params: SamplingParams) -> list:
    """Submit one sequence to a started engine and wait for all its events."""
    done, events = threading.Event(), []

    def on_event(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    engine.submit([(prompt, params, on_event)])
    assert done.wait(30)
    return events


def tokens(events) -> list[int]:
    return [e.token for e in events if e.token is not None]


LENGTHS = [1, 5, 40, 9, 17, 3, 33, 2, 12, 25]
MAX_TOKENS = [6, 20, 9, 14, 3, 30, 8, 12, 1, 16]  # sequences leave at different steps: rows move


def test_each_sequence_gets_what_it_gets_alone_greedy(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=80, prefill_chunk=8)
    prompts = prompts_of(LENGTHS)
    jobs = [(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)) for p, n in zip(prompts, MAX_TOKENS)]
    got = [tokens(e) for e in run(engine, jobs)]
    alone = [mixtral.generate(model, [p], n, eos_id=None)[0] for p, n in zip(prompts, MAX_TOKENS)]
    assert got == alone
    assert engine.counts["finished_length"] == len(jobs) and engine.rows == [] and engine.kv_tokens == 0
    assert engine.counts["prompt_tokens"] == sum(LENGTHS)
    assert max(b for b, c in zip(engine.batch_sizes.bounds, engine.batch_sizes.counts) if c) >= 4


def test_each_sequence_gets_what_it_gets_alone_sampling(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=3, max_seq_len=80, prefill_chunk=16)
    prompts = prompts_of(LENGTHS, seed=1)
    settings = dict(temperature=0.8, top_k=50, top_p=0.9)
    jobs = [(p, SamplingParams(max_tokens=n, seed=100 + i, ignore_eos=True, **settings))
            for i, (p, n) in enumerate(zip(prompts, MAX_TOKENS))]
    got = [tokens(e) for e in run(engine, jobs, arrive_every=2)]
    alone = [mixtral.generate(model, [p], n, seed=100 + i, eos_id=None, **settings)[0]
             for i, (p, n) in enumerate(zip(prompts, MAX_TOKENS))]
    assert got == alone


def test_events_carry_text_logprobs_and_the_finish_reason(tokenizer):
    model = mixtral.load("tiny")
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=64)
    prompt = tokenizer.encode("Hello there")
    (events,) = run(engine, [(prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=3, ignore_eos=True))])
    ids = tokens(events)
    assert "".join(e.text for e in events) == tokenizer.decode(ids)
    assert [e.finish_reason for e in events] == [None] * 7 + ["length"]
    for e in events:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0] == (e.token, pytest.approx(e.logprob))
    # A stop string ends the sequence in the step that completes it, and its text stops before it.
    text = tokenizer.decode(ids)
    stop = text[4:7]
    (events,) = run(engine, [(prompt, SamplingParams(max_tokens=8, temperature=0.0, stop=(stop,)))])
    assert "".join(e.text for e in events) == text[: text.index(stop)]
    assert events[-1].finish_reason == "stop" and len(tokens(events)) < 8


def test_cancelled_sequences_leave_at_the_next_step(tokenizer):
    model = mixtral.load("tiny")
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=64, max_queue=4)
    prompts = prompts_of([4, 7, 3])
    events: list[list] = [[], [], []]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    gens = [g for p, e in zip(prompts, events) for g in engine.submit([(p, params, e.append)])]
    with torch.inference_mode():
        for _ in range(3):
            engine.step()
        assert len(engine.rows) == 2 and len(engine.waiting) == 1
        engine.cancel(gens[0])  # running
        engine.cancel(gens[2])  # waiting
        engine.step()
        assert engine.rows == [gens[1]] and not engine.waiting
        assert engine.counts["finished_cancelled"] == 2
        assert events[0][-1].finish_reason == "cancelled" and events[2] == [events[2][-1]]
        while engine.rows:
            engine.step()
    # The one left decoded on, undisturbed by the row that left under it.
    assert tokens(events[1]) == mixtral.generate(model, [prompts[1]], 30, eos_id=None)[0]


def test_limits(tokenizer):
    model = mixtral.load("tiny")
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=32, max_queue=2)
    ok = SamplingParams(max_tokens=4)
    engine.submit([([1, 2], ok, print)] * 2)
    with pytest.raises(QueueFullError, match="limit 2"):
        engine.submit([([1, 2], ok, print)])
    assert engine.counts["rejected"] == 1
    with pytest.raises(InputError, match="limit of 2"):
        engine.submit([([1, 2], ok, print)] * 3)
    for prompt, params, error, match in [
        ([1] * 32, ok, ContextLengthError, "the prompt has 32 tokens"),
        ([1] * 20, SamplingParams(max_tokens=13), ContextLengthError, "at most 12 new tokens"),
        ([1, 32000], ok, InputError, "outside the vocabulary"),
        ([], ok, InputError, "empty"),
        ([1], SamplingParams(max_tokens=0), InputError, "max_tokens"),
        ([1], SamplingParams(max_tokens=1, temperature=-1), InputError, "temperature"),
    ]:
        with pytest.raises(error, match=match):
            engine.check(prompt, params)
    with pytest.raises(InputError, match="exceeds the model's context"):
        Engine(model, tokenizer, max_seq_len=100_000)
    with pytest.raises(InputError, match="max_batch must be at least 1"):
        Engine(model, tokenizer, max_batch=0)


def test_a_failure_fails_its_sequences_only_and_the_engine_goes_on(tokenizer, monkeypatch):
    model = mixtral.load("tiny")
    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=64)
    real_sample = engine_module.sample

    def sample(logits, temperature, *args):
        if temperature == 0.5:
            raise RuntimeError("broken sampler")
        return real_sample(logits, temperature, *args)

    monkeypatch.setattr(engine_module, "sample", sample)
    prompts = prompts_of([3, 6, 2])
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    jobs = [(prompts[0], greedy), (prompts[1], SamplingParams(max_tokens=10, temperature=0.5)), (prompts[2], greedy)]
    events = run(engine, jobs, arrive_every=1)
    assert events[1] == [events[1][0]] and events[1][0].finish_reason == "error"
    assert "broken sampler" in events[1][0].error
    for i in (0, 2):
        assert tokens(events[i]) == mixtral.generate(model, [prompts[i]], 10, eos_id=None)[0]

    # A forward that fails fails the sequences in it; the thread of a started engine survives it.
    real_forward = model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("broken forward")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)

    def broken_decode():
        raise RuntimeError("broken step")

    engine.start()
    try:
        failed = wait_for(engine, prompts[0], greedy)
        assert failed[-1].finish_reason == "error" and "broken forward" in failed[-1].error
        assert tokens(wait_for(engine, prompts[0], greedy)) == mixtral.generate(model, [prompts[0]], 10,
                                                                                eos_id=None)[0]
        # A bug anywhere else in a step: what ran fails, the pool is emptied, the next request runs as ever.
        real_decode = engine._decode
        monkeypatch.setattr(engine, "_decode", broken_decode)
        failed = wait_for(engine, prompts[1], greedy)
        assert failed[-1].finish_reason == "error" and "broken step" in failed[-1].error
        monkeypatch.setattr(engine, "_decode", real_decode)
        assert tokens(wait_for(engine, prompts[1], greedy)) == mixtral.generate(model, [prompts[1]], 10,
                                                                                eos_id=None)[0]
        assert engine.is_alive()
    finally:
        engine.stop()
    assert not engine.is_alive()


def test_stop_cancels_what_is_left(tokenizer):
    engine = Engine(mixtral.load("tiny"), tokenizer, max_batch=1, max_seq_len=512)
    events: list = []
    for _ in range(2):
        engine.submit([([1], SamplingParams(max_tokens=500, ignore_eos=True), events.append)])
    engine.start()
    engine.stop()
    assert [e.finish_reason for e in events].count("cancelled") >= 1
    assert engine.counts["finished_cancelled"] + engine.counts["finished_length"] == 2


def test_batch_invariant_mode_16_concurrent_equal_one_at_a_time_bitwise(tokenizer):
    # bf16, where the kernels for 1 row and for 16 rows round differently: in the mode, every sequence's tokens and
    # log-probabilities (floats compared exactly) are the same whether it ran alone or among 15 others.
    model = mixtral.load("tiny", dtype=torch.bfloat16)
    prompts = prompts_of([3, 17, 40, 9, 25, 1, 33, 12, 6, 28, 19, 2, 45, 11, 30, 8], seed=13)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)

    def outputs(events):
        return [(e.token, e.logprob, e.top_logprobs) for e in events if e.token is not None]

    engine = Engine(model, tokenizer, max_batch=16, max_seq_len=80, prefill_chunk=16, batch_invariant=True)
    together: list[list] = [[] for _ in prompts]
    engine.submit([(p, params, e.append) for p, e in zip(prompts, together)])
    with torch.inference_mode():
        while engine.rows or engine.waiting:
            engine.step()
    assert max(b for b, c in zip(engine.batch_sizes.bounds, engine.batch_sizes.counts) if c) >= 16
    alone = [run(Engine(model, tokenizer, max_batch=16, max_seq_len=80, prefill_chunk=16, batch_invariant=True),
                 [(p, params)])[0] for p in prompts]
    assert [outputs(e) for e in together] == [outputs(e) for e in alone]


@pytest.mark.slow
def test_serve_batch_invariant_16_concurrent_requests_equal_one_at_a_time_bitwise(tmp_path):
    # Through HTTP and `mixtral serve --batch-invariant` in bf16: the text and every log-probability (as the JSON
    # floats they are sent as) of 16 concurrent greedy requests equal those of each sent alone.
    import httpx

    from mixtral.serve.metrics import parse
    from test_serve import start_server, stop_servers, wait_for_url

    log = tmp_path / "server.log"
    process = start_server(["--model", "tiny", "--dtype", "bfloat16", "--batch-invariant", "--max-batch", "16",
                            "--max-seq-len", "96", "--prefill-chunk", "16"], log)
    try:
        url = wait_for_url(process, log)
        prompts = prompts_of([3, 17, 40, 9, 25, 1, 33, 12, 6, 28, 19, 2, 45, 11, 30, 8], seed=14)

        async def complete(client, prompt):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                    "logprobs": 2}
            choice = (await client.post(f"{url}/v1/completions", json=body)).json()["choices"][0]
            return choice["text"], choice["logprobs"]

        async def alone_then_together():
            async with httpx.AsyncClient(timeout=120) as client:
                alone = [await complete(client, p) for p in prompts]
                together = await asyncio.gather(*(complete(client, p) for p in prompts))
            return alone, list(together)

        alone, together = asyncio.run(alone_then_together())
        assert together == alone
        assert "batch-invariant" in log.read_text()
        values = parse(httpx.get(f"{url}/metrics").text)
        batched = values["mixtral_decode_batch_size_count"] - values['mixtral_decode_batch_size_bucket{le="8"}']
        assert batched > 0, "no decode step ran more than 8 rows: the requests were not batched"
    finally:
        stop_servers(process)
