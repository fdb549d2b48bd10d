"""The batch-invariant mode: a row's logits bitwise those it gets alone, whatever else is in the batch.

Each check generates greedily for 16 prompts of different lengths in one batch and for each prompt alone, and
compares every forward's logits of a row (the last real token of each prefill chunk, then each decode step) with
torch.equal. The model is small and random (4 experts, top-2, 4 query heads on 2 key/value heads), in bf16 and
float32, on the paths this CPU takes and on the fallbacks every CPU has.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import threading

import pytest
import torch
import torch.nn.functional as F

from mixtral import kernels, offload, quant
from mixtral.batch_invariant import attend_by_query, batch_invariant, by_row, is_batch_invariant
from mixtral.config import ModelConfig
from mixtral.kernels import CpuPolicy
from mixtral.model import random_model

CONFIG = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, context_len=256,
                     vocab_size=256, n_experts=4, top_k=2)
# The module, not the function the package exports under the same name: `run` wraps its `prefill`.
generation = importlib.import_module("mixtral.generate")
LENGTHS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 14, 16, 19, 23, 29)  # 16 prompts


def prompts(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, CONFIG.vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def bf16_model():
    # Weights of std 0.2, not 0.02: larger activations make every rounding difference reach the logits.
    return random_model(CONFIG, seed=1, dtype=torch.bfloat16, std=0.2)


@pytest.fixture(scope="module")
def fp32_model():
    return random_model(CONFIG, seed=1, dtype=torch.float32, std=0.2)


def run(monkeypatch, model, batch: list[list[int]], new_tokens: int = 6, **kwargs):
    """generate(batch) with every forward's logits recorded: (tokens per row, per row the logits of each forward
    that fed it a real token)."""
    seen: list[tuple[list[bool], torch.Tensor]] = []
    forward = generation.prefill

    def recording(model, cache, ids, n_new=None):
        logits = forward(model, cache, ids, n_new)
        real = [True] * len(ids) if n_new is None else [int(n) > 0 for n in n_new]
        seen.append((real, logits.clone()))
        return logits

    monkeypatch.setattr(generation, "prefill", recording)  # decode_step calls it too
    tokens = generation.generate(model, batch, new_tokens, eos_id=None, **kwargs)
    monkeypatch.setattr(generation, "prefill", forward)
    rows = [[logits[r] for real, logits in seen if real[r]] for r in range(len(batch))]
    return tokens, rows


def assert_batch_equals_alone(monkeypatch, model, batch: list[list[int]], **kwargs) -> None:
    tokens, logits = run(monkeypatch, model, batch, batch_invariant=True, **kwargs)
    for r, prompt in enumerate(batch):
        alone_tokens, alone_logits = run(monkeypatch, model, [prompt], batch_invariant=True, **kwargs)
        assert tokens[r] == alone_tokens[0], f"row {r} ({len(prompt)} prompt tokens): tokens differ"
        assert len(logits[r]) == len(alone_logits[0])
        for step, (got, want) in enumerate(zip(logits[r], alone_logits[0])):
            assert torch.equal(got, want), (f"row {r} ({len(prompt)} prompt tokens), forward {step}: logits differ "
                                            f"by up to {(got - want).abs().max().item()}")


# ---- batched == alone, bitwise ---------------------------------------------------------------------------------

def test_bf16_rows_equal_alone(monkeypatch, bf16_model):
    assert_batch_equals_alone(monkeypatch, bf16_model, prompts())


def test_fp32_rows_equal_alone(monkeypatch, fp32_model):
    assert_batch_equals_alone(monkeypatch, fp32_model, prompts())


def test_bf16_rows_equal_alone_without_the_gemv_kernel(monkeypatch, bf16_model):
    # The path of CPUs without AVX512-BF16 (or a C compiler): every product one row at a time through torch.
    with kernels.use_policy(kernels.policy().with_features(avx512_bf16=False)):
        assert_batch_equals_alone(monkeypatch, bf16_model, prompts())


def test_long_prompt_in_chunks_batched_with_short_ones(monkeypatch, bf16_model):
    # Batched prefill pads every row to the chunk of the longest; the 37-token prompt goes in chunks of 8, 8, 8, 8,
    # 5 alone and batched, while the short rows' padding runs beside it.
    assert_batch_equals_alone(monkeypatch, bf16_model, prompts((37, 2, 5, 9, 16)), prefill_chunk=8)


def test_sliding_window_rolling_cache(monkeypatch):
    # Prompts past the window of 6 with chunks of 4: the rolling buffer wraps, and alone a short prompt would get a
    # smaller buffer (window + chunk - 1 slots) than beside a long one, were the slots not fixed by prefill_chunk.
    model = random_model(dataclasses.replace(CONFIG, sliding_window=6), seed=1, dtype=torch.bfloat16, std=0.2)
    assert_batch_equals_alone(monkeypatch, model, prompts((1, 3, 5, 9, 14)), new_tokens=8, prefill_chunk=4)


@pytest.mark.parametrize("variant", ["dense", "reference dispatch"])
def test_dense_model_and_reference_dispatch_rows_equal_alone(monkeypatch, variant):
    config = dataclasses.replace(CONFIG, n_experts=1, top_k=1) if variant == "dense" else CONFIG
    model = random_model(config, seed=1, dtype=torch.bfloat16, std=0.2)
    if variant == "reference dispatch":
        for layer in model.layers:
            layer.moe.dispatch = "reference"
    assert_batch_equals_alone(monkeypatch, model, prompts(LENGTHS[::2]))


@pytest.mark.parametrize("mode", ["int8", "int4", "int3"])
def test_quantized_rows_equal_alone(monkeypatch, mode):
    model = quant.quantize(random_model(CONFIG, seed=1, dtype=torch.bfloat16, std=0.2), mode,
                           group_size=None if mode == "int8" else 32)
    assert_batch_equals_alone(monkeypatch, model, prompts(LENGTHS[::2]))


@pytest.mark.parametrize("precision", [None, "int4"], ids=["bf16", "int4"])
def test_offloaded_experts_rows_equal_alone_and_resident(monkeypatch, tmp_path, precision):
    # The offloading engine runs the experts through the same backend (3 slots for 8 experts: in rounds).
    model = random_model(dataclasses.replace(CONFIG, n_experts=8), seed=7, dtype=torch.bfloat16, std=0.2)
    if precision:
        quant.quantize(model, {"experts": precision})
    files = offload.open_expert_files(offload.write_expert_files(model, tmp_path))
    stripped = offload.strip_experts(copy.deepcopy(model))
    with offload.attach(stripped, files, 3 * files[0].record_bytes, policy="lru"):
        batch = prompts(LENGTHS[::2])
        assert_batch_equals_alone(monkeypatch, stripped, batch)
        offloaded = run(monkeypatch, stripped, batch, batch_invariant=True)[1]
    resident = run(monkeypatch, model, batch, batch_invariant=True)[1]
    assert all(torch.equal(a, b) for row_a, row_b in zip(offloaded, resident) for a, b in zip(row_a, row_b))


def test_engine_thread_batched_equals_caller_thread_alone(bf16_model):
    # A serving engine runs its forwards inside `with batch_invariant():` on its own thread.
    batch = prompts()
    result = {}

    def engine():
        with batch_invariant():
            result["tokens"] = generation.generate(bf16_model, batch, 6, eos_id=None)

    thread = threading.Thread(target=engine)
    thread.start()
    thread.join()
    alone = [generation.generate(bf16_model, [p], 6, eos_id=None, batch_invariant=True)[0] for p in batch]
    assert result["tokens"] == alone


def test_full_forward_rows_equal_alone(bf16_model):
    # Without a cache (causal mask): a right-padded row's logits at its real positions are those it has alone.
    batch = prompts((3, 11, 17))
    ids = torch.zeros(len(batch), 17, dtype=torch.long)
    for r, p in enumerate(batch):
        ids[r, :len(p)] = torch.tensor(p)
    with batch_invariant(), torch.inference_mode():
        together = bf16_model(ids)
        for r, p in enumerate(batch):
            assert torch.equal(together[r, :len(p)], bf16_model(torch.tensor([p]))[0])


# ---- the mode computes the same function -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_mode_computes_what_the_default_path_computes(dtype, tolerance):
    model = random_model(CONFIG, seed=2, dtype=dtype)
    ids = torch.tensor(prompts((12, 12)))
    with torch.inference_mode():
        want = model(ids).float()
        with batch_invariant():
            got = model(ids).float()
    assert ((got - want).norm() / want.norm()).item() < tolerance


def test_attend_by_query_ignores_masked_keys_and_other_rows():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, n, 16, generator=generator).bfloat16() for h, n in ((4, 5), (2, 40), (2, 40)))
    mask = torch.zeros(3, 1, 5, 40, dtype=torch.bool)
    mask[0, :, :, :7] = torch.ones(5, 7, dtype=torch.bool).tril(2)  # row 0: 7 keys, causal over its 5 queries
    mask[1:, :, :, :30] = True
    together = attend_by_query(q, k, v, mask)
    alone = attend_by_query(q[:1], k[:1, :, :7], v[:1, :, :7], mask[:1, :, :, :7])
    assert torch.equal(together[:1], alone)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert torch.allclose(together.float(), reference, atol=2e-2)


def test_by_row_keeps_leading_dimensions():
    x = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(by_row(lambda row: row.sum(-1, keepdim=True), x), x.sum(-1, keepdim=True))
    assert by_row(lambda row: row[:, :2], x[:0]).shape == (0, 3, 2)


# ---- the switch ------------------------------------------------------------------------------------------------

def test_mode_is_off_by_default_and_thread_local():
    assert not is_batch_invariant()
    seen = {}

    def other(name):
        seen[name] = is_batch_invariant()

    with batch_invariant():
        assert is_batch_invariant()
        thread = threading.Thread(target=other, args=("other thread",))
        thread.start()
        thread.join()
        with batch_invariant(False):
            assert not is_batch_invariant()
        assert is_batch_invariant()
    assert not is_batch_invariant() and seen == {"other thread": False}

    def enables():
        with batch_invariant():
            seen["inside"] = is_batch_invariant()
            other("main while a thread has it")

    thread = threading.Thread(target=enables)
    thread.start()
    thread.join()
    assert seen["inside"] and not is_batch_invariant()

    with pytest.raises(RuntimeError), batch_invariant():
        raise RuntimeError
    assert not is_batch_invariant()


def test_stream_leaves_the_mode_off_between_tokens(bf16_model):
    states = [is_batch_invariant() for _ in generation.stream(bf16_model, prompts((3, 5)), 4, batch_invariant=True)]
    assert states == [False] * 4


def test_policy_chooses_no_kernel_by_rows_in_the_mode():
    xeon = CpuPolicy.for_cpu(library=True, avx512_bf16=True, amx=True, amx_kernel=True)
    for rows in (1, 16, 256):
        assert xeon.linear_path("bf16", rows, invariant=True) == "gemv"
        assert xeon.expert_path("bf16", rows, invariant=True) == "linear"
        for kind in ("int8", "int4", "int3", "float32"):
            assert xeon.linear_path(kind, rows, invariant=True) == "by_row"
    assert xeon.linear_path("bf16", 16, fits=False, invariant=True) == "by_row"
    assert CpuPolicy.for_cpu().linear_path("bf16", 1, invariant=True) == "by_row"  # no gemv.c there
    assert xeon.linear_path("bf16", 16) == "transposed" and xeon.expert_path("bf16", 16) == "amx"  # mode off


# ---- the benchmark ---------------------------------------------------------------------------------------------

def test_benchmark_on_the_tiny_preset(capsys):
    from mixtral.bench import batch_invariant as bench
    from mixtral.cli import main

    result = bench.run(preset="tiny", layers=1, rows=[1, 3], prompt_tokens=5, steps=2, prefill_tokens=8, repeats=1)
    assert [r["phase"] for r in result["rows"]] == ["decode, 1 row", "decode, 3 rows", "prefill, 8 tokens"]
    assert all(r["off_tokens_per_s"] > 0 and r["on_tokens_per_s"] > 0 for r in result["rows"])
    assert result["equal_alone"]["on"] == result["equal_alone"]["rows"] == 3
    assert "whose logits equal the row alone" in capsys.readouterr().out
    assert main(["bench", "batch-invariant", "--help"]) == 0
    assert main(["bench", "batch-invariant", "--rows", "0"]) == 1
