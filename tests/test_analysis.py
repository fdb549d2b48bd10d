"""Routing analysis: each statistic on hand-built routes with known answers, the random baselines against
simulation, recording with hooks against the router run by hand, live decoding, ablation, HTML and the CLI."""
from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixtral.analysis import stats
from mixtral.analysis.ablation import ablate_experts, domain_losses, without_expert
from mixtral.analysis.html import routes_html
from mixtral.analysis.report import analyse, write_report
from mixtral.analysis.routes import RouteRecorder, Routes, record_generation, record_sequences
from mixtral.cli import main
from mixtral.config import ModelConfig
from mixtral.errors import InputError
from mixtral.model import Transformer

CONFIG = ModelConfig(dim=32, n_layers=3, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, context_len=256,
                     vocab_size=128, n_experts=8, top_k=2)


@pytest.fixture(scope="module")
def model():
    # A larger init spread than the default keeps router logits apart, so no top-k choice is a float tie.
    return Transformer(CONFIG).init_weights(0, std=0.2).eval()


def random_routes(n: int, n_experts: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n_experts, k, replace=False) for _ in range(n)])


# ---- statistics on hand-built routes ---------------------------------------------------------------------------

def test_repeat_rates_count_pairs_within_a_sequence_only():
    experts = np.array([[0, 1], [0, 2], [3, 4], [5, 0], [5, 6]])
    sequence = np.array([0, 0, 0, 1, 1])
    # pairs (0,1) (1,2) (3,4): first choices 0=0, 0≠3, 5=5; sets {0,1}&{0,2}, {0,2}&{3,4} none, {5,0}&{5,6}
    assert stats.first_choice_repeat(experts, sequence) == pytest.approx(2 / 3)
    assert stats.topk_repeat(experts, sequence) == pytest.approx(2 / 3)
    # A second choice shared with the first choice of the next token counts for top-k, not for first choice.
    experts = np.array([[1, 2], [2, 3]])
    assert stats.first_choice_repeat(experts, [0, 0]) == 0.0
    assert stats.topk_repeat(experts, [0, 0]) == 1.0
    assert np.isnan(stats.first_choice_repeat(experts, [0, 1]))


def test_expert_shares_count_every_choice():
    shares = stats.expert_shares(np.array([[0, 1], [0, 2], [0, 1]]), 4)
    np.testing.assert_allclose(shares, [3 / 6, 2 / 6, 1 / 6, 0.0])


def test_random_baselines_are_the_papers_and_match_simulation():
    assert stats.random_first_choice_repeat(8) == 0.125
    assert stats.random_topk_repeat(8, 2) == pytest.approx(1 - 15 / 28)  # 46.4%
    for n_experts, k in ((8, 2), (6, 3), (16, 4), (4, 1)):
        experts = random_routes(40000, n_experts, k, seed=n_experts)
        seq = np.zeros(len(experts), dtype=int)
        assert stats.first_choice_repeat(experts, seq) == pytest.approx(1 / n_experts, abs=0.008)
        assert stats.topk_repeat(experts, seq) == pytest.approx(
            1 - comb(n_experts - k, k) / comb(n_experts, k), abs=0.008)
        rates = stats.lru_hit_rates(experts, seq, n_experts)
        for c in range(1, n_experts + 1):
            assert rates[c - 1] == pytest.approx(stats.random_lru_hit_rate(n_experts, k, c), abs=0.01), (n_experts, k, c)
        guesses = random_routes(40000, n_experts, k, seed=99)
        assert stats.prediction_recall(guesses, experts) == pytest.approx(k / n_experts, abs=0.008)


def test_lru_hit_rates_by_hand():
    experts = np.array([[0], [1], [0], [2], [1]])
    seq = np.zeros(5, dtype=int)
    # c=1: nothing repeats back to back. c=2: only the second 0 hits (2 evicts 1). c=3: the second 0 and 1 hit.
    np.testing.assert_allclose(stats.lru_hit_rates(experts, seq, 3), [0.0, 0.2, 0.4])
    # The cache starts cold in each sequence.
    np.testing.assert_allclose(stats.lru_hit_rates(experts, np.array([0, 0, 0, 1, 1]), 3), [0.0, 0.2, 0.2])
    # Within a token, the second expert evicts the first from a cache of one.
    assert stats.lru_hit_rates(np.array([[0, 1], [0, 1]]), np.zeros(2), 2)[0] == 0.0


def test_stack_distances_agree_with_a_direct_lru_simulation():
    experts = random_routes(3000, 8, 2, seed=3)
    experts[1000:1500] = experts[1000]  # a stretch of perfect locality
    seq = np.repeat(np.arange(6), 500)
    rates = stats.lru_hit_rates(experts, seq, 8)
    for c in range(1, 9):
        assert rates[c - 1] == pytest.approx(stats.prefetch_lru(experts, None, seq, c)["hit_rate"])


def test_prediction_recall_by_hand():
    assert stats.prediction_recall(np.array([[0, 1], [2, 3]]), np.array([[1, 0], [2, 4]])) == pytest.approx(0.75)


def test_prefetch_counts_hits_and_loads_in_vain():
    seq = np.zeros(2, dtype=int)
    right = stats.prefetch_lru(np.array([[0], [1]]), np.array([[0], [1]]), seq, 2)
    assert right == {"hit_rate": 1.0, "demand_loads": 0.0, "prefetch_loads": 1.0, "wasted_loads": 0.0}
    wrong = stats.prefetch_lru(np.array([[0], [1]]), np.array([[5], [6]]), seq, 2)
    assert wrong == {"hit_rate": 0.0, "demand_loads": 1.0, "prefetch_loads": 1.0, "wasted_loads": 1.0}
    # A guess already cached costs nothing; one half right loads one expert in vain.
    half = stats.prefetch_lru(np.array([[0, 1], [0, 2]]), np.array([[0, 1], [0, 3]]), seq, 4)
    assert half["prefetch_loads"] == 1.5 and half["wasted_loads"] == 0.5 and half["hit_rate"] == 0.75


def test_token_consistency_by_hand():
    tokens = np.array([7] * 5 + [8] * 5 + [9])
    first = np.array([1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 0])
    result = stats.token_consistency(tokens, first, min_count=5)
    assert result["consistency"] == pytest.approx(0.9)
    assert (result["token_ids"], result["occurrences"]) == (2, 10)
    assert result["shuffled"] <= 1.0


# ---- recording -------------------------------------------------------------------------------------------------

def routes_by_hand(model: Transformer, ids: list[int]):
    """Each layer's top-k experts and gate weights, and the next-layer guesses, by running the blocks by hand."""
    x = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    from mixtral.model import rope_tables

    cos, sin = rope_tables(positions, CONFIG.head_dim, CONFIG.rope_theta, torch.float32)
    h = model.tok_embeddings(x)
    experts, weights, before, after = [], [], [], []
    for i, block in enumerate(model.layers):
        h = h + block.attention(block.attention_norm(h), cos, sin, None)
        normed = block.ffn_norm(h)[0]
        top, chosen = torch.topk(normed @ block.moe.router.weight.T, CONFIG.top_k)
        experts.append(chosen)
        weights.append(torch.softmax(top, -1))
        guess = lambda state: torch.topk(model.layers[i + 1].ffn_norm(state)[0] @  # noqa: E731
                                         model.layers[i + 1].moe.router.weight.T, CONFIG.top_k)[1]
        if i + 1 < CONFIG.n_layers:
            before.append(guess(h))
        h = h + block.moe(block.ffn_norm(h))
        if i + 1 < CONFIG.n_layers:
            after.append(guess(h))
    return torch.stack(experts), torch.stack(weights), torch.stack(before), torch.stack(after)


def test_recording_with_hooks_equals_the_router_run_by_hand(model):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 128, n).tolist() for n in (40, 17, 64)]
    with torch.inference_mode():
        routes = record_sequences(model, sequences, [0, 1, 0], ["a", "b"], batch_size=2)
        assert len(routes.tokens) == 40 + 17 + 64
        for i, ids in enumerate(sequences):
            mine = routes.sequence == i
            experts, weights, before, after = routes_by_hand(model, ids)
            np.testing.assert_array_equal(routes.experts[:, mine], experts.numpy())
            np.testing.assert_allclose(routes.weights[:, mine], weights.numpy(), atol=1e-5)
            np.testing.assert_array_equal(routes.predicted["before"][:, mine], before.numpy())
            np.testing.assert_array_equal(routes.predicted["after"][:, mine], after.numpy())
            np.testing.assert_array_equal(routes.tokens[mine], ids)
            np.testing.assert_array_equal(routes.positions[mine], np.arange(len(ids)))
        assert routes.domains == ["a", "b"] and set(routes.domain[routes.sequence == 1]) == {1}


def test_recording_leaves_no_hooks_behind(model):
    with RouteRecorder(model):
        pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_live_decoding_routes_equal_the_full_forward_routes(model):
    prompt = list(range(1, 21))
    live, (new,) = record_generation(model, [prompt], [0], ["generated"], 12, eos_id=None)
    assert len(new) == 12 and len(live.tokens) == 20 + 11  # the last new token is never fed back
    np.testing.assert_array_equal(live.tokens, prompt + new[:-1])
    with torch.inference_mode():
        full = record_sequences(model, [prompt + new[:-1]], [0], ["generated"])
    np.testing.assert_array_equal(live.experts, full.experts)
    np.testing.assert_allclose(live.weights, full.weights, atol=1e-5)
    np.testing.assert_array_equal(live.positions, np.arange(31))


def test_routes_file_round_trip_and_errors(tmp_path, model):
    with torch.inference_mode():
        routes = record_sequences(model, [[1, 2, 3, 4], [5, 6]], [0, 1], ["x", "y"], meta={"model": "test"})
    routes.save(tmp_path / "r.npz")
    back = Routes.load(tmp_path / "r.npz")
    for name in ("tokens", "positions", "sequence", "domain", "experts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(routes, name))
    np.testing.assert_allclose(back.weights, routes.weights, atol=1e-3)  # stored as float16
    assert back.domains == ["x", "y"] and back.meta["model"] == "test" and set(back.predicted) == {"before", "after"}
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(InputError, match="other.npz"):
        Routes.load(tmp_path / "other.npz")
    with pytest.raises(InputError, match="sequence 0 has 0 tokens"):
        record_sequences(model, [[]], [0], ["x"])


def test_a_dense_model_has_no_routes():
    dense = Transformer(ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2,
                                    vocab_size=64, n_experts=1, top_k=1)).init_weights(0)
    with pytest.raises(InputError, match="dense"):
        RouteRecorder(dense)


# ---- ablation, report, html ------------------------------------------------------------------------------------

def test_an_ablated_expert_is_never_chosen_and_the_loss_is_computed_plainly(model):
    ids = torch.randint(0, 128, (3, 33), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with without_expert(model, 1, 5):
            routes = record_sequences(model, ids.tolist(), [0, 0, 0], ["x"])
        assert 5 not in routes.experts[1] and 5 in np.concatenate([routes.experts[0], routes.experts[2]])
        losses = domain_losses(model, {"x": ids})
        want = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()
    assert losses["x"] == pytest.approx(want, rel=1e-5) and losses["all"] == pytest.approx(want, rel=1e-5)
    assert all(not m._forward_hooks for m in model.modules())
    result = ablate_experts(model, {"x": ids}, layers=[0])
    assert len(result["ablated"]) == 1 and len(result["ablated"][0]) == CONFIG.n_experts
    assert any(r["x"] != pytest.approx(result["base"]["x"]) for r in result["ablated"][0])
    with pytest.raises(InputError, match="no expert 9 in layer 0"):
        with without_expert(model, 0, 9):
            pass


def test_report_has_both_repeat_measures_per_layer_and_domain(tmp_path, model):
    with torch.inference_mode():
        rng = np.random.default_rng(2)
        routes = record_sequences(model, [rng.integers(0, 128, 50).tolist() for _ in range(4)], [0, 1, 0, 1],
                                  ["code", "en"])
    result = write_report(routes, tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["layers"][0]["first_choice_repeat"].keys() == {"code", "en", "all"}
    for layer in on_disk["layers"]:
        assert layer["first_choice_repeat"]["all"] == pytest.approx(
            stats.first_choice_repeat(routes.experts[layer["layer"]], routes.sequence))
        assert layer["top2_repeat"]["all"] == pytest.approx(
            stats.topk_repeat(routes.experts[layer["layer"]], routes.sequence))
    assert "prediction_recall" not in result["layers"][0] and "prediction_recall" in result["layers"][1]
    assert result["baselines"]["top2_repeat"] == pytest.approx(1 - 15 / 28)
    for name in ("expert_distribution.png", "locality.png", "lru.png", "prediction.png", "results.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert analyse(routes)["tokens"] == 200


def test_html_colours_each_token_and_escapes_text():
    experts = np.array([[[0, 1], [3, 2], [0, 2]]])
    weights = np.full((1, 3, 2), 0.5)
    page = routes_html(["<b>", " x", " &"], experts, weights, [0], "t <test>", [("fr", [0, 1, 2])], [5, 6, 7],
                       [0, 1, 2])
    assert page.count('class="t"') == 3 and "&lt;b&gt;" in page and "<b>" not in page.split("</h1>")[1]
    assert page.count("background:#E69F00") >= 2  # expert 0 twice in the text (and in the legend)
    assert "token 6 at 1; layer 0: experts 3 (0.50), 2 (0.50)" in page


# ---- the command -----------------------------------------------------------------------------------------------

def test_routes_commands_end_to_end(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    (tmp_path / "b.txt").write_text("La commande permet de lire les fichiers. " * 20)
    src = ["--source", f"code={tmp_path}/a.txt", "--source", f"fr={tmp_path}/b.txt", "--tokens-per-domain", "120",
           "--seq-len", "64"]
    routes = str(tmp_path / "r.npz")
    assert main(["routes", "record", "--model", "tiny", *src, "--out", routes]) == 0
    assert main(["routes", "report", routes, "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["domains"] == {"code": 120, "fr": 120}
    assert main(["routes", "html", routes, "--out", str(tmp_path / "p.html"), "--layers", "0,1"]) == 0
    assert "<h2>fr</h2>" in (tmp_path / "p.html").read_text()
    assert main(["routes", "ablate", "--model", "tiny", *src, "--layers", "1",
                 "--out", str(tmp_path / "abl.json")]) == 0
    assert len(json.loads((tmp_path / "abl.json").read_text())["ablated"][0]) == 4
    assert main(["routes", "record", "--model", "tiny", *src, "--generate", "4", "--prompt-len", "8",
                 "--prompts-per-domain", "1", "--out", str(tmp_path / "live.npz")]) == 0
    assert len(Routes.load(tmp_path / "live.npz").tokens) == 2 * (8 + 3)
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["routes", "record", "--model", "tiny"], "--corpus DIR"),
    (["routes", "html", "missing.npz"], "missing.npz"),
    (["routes", "record", "--model", "tiny-dense", "--source", "x=README.md"], "dense"),
])
def test_routes_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_pooled_lru_by_hand_and_against_per_layer_caches():
    seq = np.zeros(3, dtype=int)
    # 2 layers, top-1; tokens use (layer 0, layer 1) = (0, 5), (0, 6), (0, 5)
    experts = np.array([[[0], [0], [0]], [[5], [6], [5]]])
    # one shared slot pair: layer 0's 0 and layer 1's current expert; 5 is evicted by 6, then missed again
    assert stats.pooled_lru(experts, seq, 2) == {"hit_rate": 2 / 6, "demand_loads": 4 / 3, "prefetch_loads": 0.0}
    # three shared slots hold everything after the first use
    assert stats.pooled_lru(experts, seq, 3)["hit_rate"] == pytest.approx(3 / 6)
    # quotas [1, 2]: layer 1 keeps both its experts
    assert stats.pooled_lru(experts, seq, [1, 2])["hit_rate"] == pytest.approx(3 / 6)
    # quotas [2, 1]: layer 0 wastes its second slot, layer 1 thrashes
    assert stats.pooled_lru(experts, seq, [2, 1])["hit_rate"] == pytest.approx(2 / 6)
    # per-layer quotas are independent LRUs: the same as prefetch_lru layer by layer
    routes = np.stack([random_routes(800, 8, 2, seed=s) for s in (1, 2)])
    seq = np.repeat(np.arange(4), 200)
    pooled = stats.pooled_lru(routes, seq, [3, 5])["hit_rate"]
    alone = [stats.prefetch_lru(routes[layer], None, seq, c)["hit_rate"] for layer, c in enumerate((3, 5))]
    assert pooled == pytest.approx(np.mean(alone))
    # a right guess for layer 1 turns its miss into a prefetch
    guessed = stats.pooled_lru(experts, np.zeros(3, dtype=int), 2, predicted=experts[1:])
    assert guessed["demand_loads"] == pytest.approx(1 / 3) and guessed["prefetch_loads"] == pytest.approx(3 / 3)
