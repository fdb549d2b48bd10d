"""The offloading engine (mixtral.offload): offloaded logits are bitwise the resident model's for every policy, batch
and precision; the statistics add up; wrong predictions cost loads, not correctness; errors are clear; threads
stop; a full pool does not deadlock."""
from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time

import pytest
import torch

from mixtral import offload, quant
from mixtral.cache import KVCache
from mixtral.config import PRESETS
from mixtral.errors import CheckpointError, InputError
from mixtral.generate import decode_step, generate, prefill
from mixtral.io.experts import ExpertFile
from mixtral.model import random_model

# 8 experts, top-2, 3 layers: enough experts for a pool of a few slots to miss, evict and run in rounds.
CONFIG = dataclasses.replace(PRESETS["tiny"], n_layers=3, n_experts=8, top_k=2)
PROMPTS = [[1, 5, 9, 13, 17, 21, 25], [7, 3, 11]]  # batch 2 of different lengths
SETTINGS = [("none", "before"), ("lru", "before"), ("lru+predict", "before"), ("lru+predict", "after")]


def _model(precision, config=CONFIG):
    model = random_model(config, seed=7)
    with torch.no_grad():  # routers with spread-out logits, so tokens route to different experts
        for layer in model.layers:
            layer.moe.router.weight.normal_(0, 0.5)
    return quant.quantize(model, {"experts": precision}) if precision else model


@pytest.fixture(scope="module", params=["int4", "int8", None], ids=["int4", "int8", "float32"])
def resident(request, tmp_path_factory):
    """(resident model, its expert files' paths)."""
    model = _model(request.param)
    return model, offload.write_expert_files(model, tmp_path_factory.mktemp("experts"))


def _offloaded(model, paths, slots: int, **kwargs):
    """A copy of `model` without its experts and an engine serving them from `paths` with `slots` slots."""
    stripped = offload.strip_experts(copy.deepcopy(model))
    files = offload.open_expert_files(paths)
    return stripped, offload.attach(stripped, files, slots * files[0].record_bytes, **kwargs)


@torch.inference_mode()
def _steps(model, n_decode: int = 4) -> list[torch.Tensor]:
    """The logits of a chunked prefill of PROMPTS, then of `n_decode` greedy decode steps."""
    cache = KVCache(model.config, len(PROMPTS), 32, max_chunk=4)
    ids = torch.zeros(len(PROMPTS), 8, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    logits = [prefill(model, cache, ids[:, s:s + 4], (lengths - s).clamp(0, 4)) for s in (0, 4)]
    for _ in range(n_decode):
        logits.append(decode_step(model, cache, logits[-1].argmax(-1).tolist()))
    return logits


@pytest.mark.parametrize("policy, predict", SETTINGS)
def test_offloaded_logits_are_bitwise_the_resident_ones(resident, policy, predict):
    model, paths = resident
    want = _steps(model)
    single = generate(model, [PROMPTS[1]], 5)
    stripped, engine = _offloaded(model, paths, CONFIG.top_k, policy=policy, predict=predict)
    with engine:
        got = _steps(stripped)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert generate(stripped, [PROMPTS[1]], 5) == single  # batch 1
        stats = engine.stats()
    assert stats["rounds"] > stats["steps"] * CONFIG.n_layers  # the prefill chunks needed more experts than slots
    assert stats["hits"] + stats["prefetch_hits"] + stats["demand_loads"] == stats["needed"]


@pytest.mark.parametrize("policy, predict", [("lru", "before"), ("lru+predict", "before"), ("lru+predict", "after")])
def test_staged_reads_give_the_resident_logits(resident, policy, predict):
    # The GPU's path (disk -> each reader's host buffer -> a slot on the model's device), run on the CPU.
    model, paths = resident
    want = _steps(model)
    stripped, engine = _offloaded(model, paths, CONFIG.top_k + 1, policy=policy, predict=predict, staged=True,
                                  loaders=2)
    with engine:
        assert engine.staged and engine.device.type == "cpu"
        got = _steps(stripped)
        stats = engine.stats()
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert stats["demand_loads"] > 0 and stats["bytes_read"] > 0


def _synchronous_prefetch(engine) -> None:
    """Make each prediction's reads finish before the model goes on: how many prefetches hit is then decided by the
    predictions alone, not by how busy the machine is."""
    queue = engine.prefetch

    def prefetch_and_wait(layer, experts):
        queue(layer, experts)
        engine.drain()
    engine.prefetch = prefetch_and_wait


def _needed(model, run) -> int:
    """Distinct experts summed over every MoE call of the resident model during `run()`."""
    count = [0]

    def hook(module, args, output):
        count[0] += len(torch.unique(output[1].experts))
    handles = [layer.register_forward_hook(hook) for layer in model.layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return count[0]


def test_stats_add_up(resident):
    model, paths = resident
    needed = _needed(model, lambda: _steps(model))
    record = ExpertFile(paths[0]).record_bytes
    for policy, predict in SETTINGS:
        stripped, engine = _offloaded(model, paths, 6, policy=policy, predict=predict)
        _synchronous_prefetch(engine)
        with engine:
            _steps(stripped)
            engine.drain()
            s = engine.stats()
        assert s["needed"] == needed
        assert s["hits"] + s["prefetch_hits"] + s["demand_loads"] == needed
        assert s["bytes_read"] == (s["demand_loads"] + s["prefetch_loads"]) * record
        assert s["prefetch_hits"] + s["loads_in_vain"] <= s["prefetch_loads"]
        assert s["steps"] == 2 + 4 and s["tokens"] == 2 * 4 * 2 + 4 * 2
        if policy == "none":
            assert s["hits"] == 0 and s["demand_loads"] == needed
        if policy != "lru+predict":
            assert s["prefetch_loads"] == s["prefetch_hits"] == s["loads_in_vain"] == 0
        else:
            assert s["prefetch_hits"] > 0
    # Every expert fits: each is read once, the first time it is needed, and hits from then on.
    stripped, engine = _offloaded(model, paths, CONFIG.n_layers * CONFIG.n_experts, policy="lru")
    with engine:
        _steps(stripped)
        s = engine.stats()
        engine.reset_stats()
        assert engine.stats()["needed"] == 0
    assert s["demand_loads"] <= CONFIG.n_layers * CONFIG.n_experts and s["hits"] == needed - s["demand_loads"]


def test_wrong_predictions_cost_loads_not_correctness(resident, monkeypatch):
    model, paths = resident
    want = _steps(model)
    stripped, engine = _offloaded(model, paths, 4, policy="lru+predict", predict="after")
    real_guess = engine.guess

    def wrong(layer, h):
        return [e for e in range(CONFIG.n_experts) if e not in real_guess(layer, h)][:2]
    monkeypatch.setattr(engine, "guess", wrong)
    _synchronous_prefetch(engine)
    with engine:
        assert all(torch.equal(g, w) for g, w in zip(_steps(stripped), want))
        s = engine.stats()
    assert s["prefetch_loads"] > 0 and s["loads_in_vain"] > 0


def test_budget_too_small_names_the_sizes(resident):
    model, paths = resident
    files = offload.open_expert_files(paths)
    record = files[0].record_bytes
    with pytest.raises(InputError) as info:
        offload.attach(offload.strip_experts(copy.deepcopy(model)), files, 2 * record - 1)
    message = str(info.value)
    assert f"{2 * record - 1} bytes" in message and f"{record} bytes" in message and f"{2 * record} bytes" in message
    for f in files:
        f.close()


def test_bad_arguments(resident, tmp_path):
    model, paths = resident
    for kwargs, message in [(dict(policy="fifo"), "unknown offloading policy"),
                            (dict(predict="during"), "unknown prediction point")]:
        with pytest.raises(InputError, match=message):
            offload.attach(model, offload.open_expert_files(paths), 1 << 30, **kwargs)
    with pytest.raises(InputError, match="one expert file per layer: 3 layers, 2 files"):
        offload.attach(model, offload.open_expert_files(paths[:2]), 1 << 30)
    with pytest.raises(CheckpointError, match="holds layer 1, given as layer 0"):
        offload.attach(model, offload.open_expert_files([paths[1], paths[0], paths[2]]), 1 << 30)
    with pytest.raises(InputError, match="dense"):
        offload.attach(random_model(PRESETS["tiny-dense"]), [], 1 << 30)
    with pytest.raises(InputError, match="stripped"):
        offload.write_expert_files(offload.strip_experts(copy.deepcopy(model)), tmp_path)


def test_missing_and_damaged_files_give_checkpoint_errors(resident, tmp_path):
    model, paths = resident
    with pytest.raises(CheckpointError, match="not found"):
        offload.open_expert_files([tmp_path / "nowhere.experts"])
    bad = tmp_path / "bad.experts"
    bad.write_bytes(paths[0].read_bytes()[:100])
    with pytest.raises(CheckpointError, match="bad.experts"):
        offload.open_expert_files([paths[1], bad])


def test_a_read_failing_mid_run_raises_instead_of_answering(resident, tmp_path):
    model, paths = resident
    copies = []
    for p in paths:
        copies.append(tmp_path / p.name)
        copies[-1].write_bytes(p.read_bytes())
    stripped, engine = _offloaded(model, copies, CONFIG.top_k, policy="lru")
    with engine:
        os.truncate(copies[1], ExpertFile(paths[1]).data_offset)  # layer 1's records are gone
        with pytest.raises(CheckpointError, match="short read"):
            _steps(stripped)
        assert all(slot.pins == 0 for slot in engine._slots)


def test_close_stops_the_threads_and_detaches(resident):
    model, paths = resident
    stripped, engine = _offloaded(model, paths, 4, loaders=2)
    threads = engine.threads
    assert len(threads) == 2 and all(t.is_alive() for t in threads)
    engine.close()
    engine.close()
    assert not any(t.is_alive() for t in threads)
    assert all(layer.moe.offload is None for layer in stripped.layers)
    assert all(f._fd is None for f in engine.files)


@pytest.mark.parametrize("predict", ["before", "after"])
def test_no_deadlock_when_a_layer_needs_more_than_the_free_slots(resident, monkeypatch, predict):
    """Slow reads, a pool of top_k slots filled by prefetches in flight, and prefill chunks whose layers need up to
    all 8 experts: every layer must still finish, in rounds."""
    model, paths = resident
    want = _steps(model, n_decode=2)
    read = ExpertFile.read_into

    def slow(self, e, buffer):
        time.sleep(0.002)
        read(self, e, buffer)
    monkeypatch.setattr(ExpertFile, "read_into", slow)
    stripped, engine = _offloaded(model, paths, CONFIG.top_k, policy="lru+predict", predict=predict, loaders=2,
                                  prefetch_limit=CONFIG.n_experts)
    result = {}
    worker = threading.Thread(target=lambda: result.update(got=_steps(stripped, n_decode=2)), daemon=True)
    with engine:
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "the offloaded forward is stuck"
        assert all(torch.equal(g, w) for g, w in zip(result["got"], want))
        s = engine.stats()
        assert s["prefetch_loads"] + s["prefetches_dropped"] > 0


def test_rounds_keep_the_sum_order_for_top_3():
    """With three experts per token the float sums depend on the order: rounds must keep the resident order."""
    config = dataclasses.replace(CONFIG, top_k=3)
    model = _model(None, config)
    with torch.inference_mode():
        ids = torch.randint(0, 1000, (3, 9))
        want = model(ids)
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        paths = offload.write_expert_files(model, directory)
        stripped, engine = _offloaded(model, paths, 3, policy="lru")
        with engine, torch.inference_mode():
            assert torch.equal(stripped(ids), want)
            assert engine.stats()["rounds"] > config.n_layers
