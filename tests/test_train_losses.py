"""mixtral.train.losses and the MoE's training options: parity with transformers' load-balancing loss, the
chunked cross-entropy against F.cross_entropy, capacity dropping exactly the overflow, jitter, routing metrics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixtral.config import ModelConfig
from mixtral.model import Transformer
from mixtral.moe import MoE, capacity, capacity_mask, moe_grouped, moe_reference, route
from mixtral.train.losses import cross_entropy, load_balancing_loss, router_metrics, z_loss

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402


def _logits(n_layers=3, batch=4, seq=7, n_experts=8, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch * seq, n_experts, generator=g) * scale for _ in range(n_layers))


@pytest.mark.parametrize("top_k,n_experts", [(2, 8), (1, 4), (3, 5)])
def test_load_balancing_equals_transformers(top_k, n_experts):
    logits = _logits(n_experts=n_experts)
    ours = load_balancing_loss(logits, top_k)
    theirs = load_balancing_loss_func(logits, n_experts, top_k)
    assert abs(ours.item() - theirs.item()) <= 1e-6


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_with_padding_equals_transformers(top_k):
    logits = _logits(batch=4, seq=7)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    ours = load_balancing_loss(logits, top_k, mask)
    theirs = load_balancing_loss_func(logits, 8, top_k, mask)
    assert abs(ours.item() - theirs.item()) <= 1e-6
    # Padding rows really are left out: changing their logits changes nothing.
    changed = tuple(t.clone() for t in logits)
    for t in changed:
        t.view(4, 7, 8)[0, :3] = 100.0 * torch.arange(8.0)
    assert load_balancing_loss(changed, top_k, mask).item() == pytest.approx(ours.item(), abs=1e-7)
    assert load_balancing_loss(changed, top_k).item() != pytest.approx(ours.item(), abs=1e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_per_layer_load_balancing_is_the_mean_of_transformers_per_layer(masked):
    logits = _logits(batch=4, seq=7)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, :2] = 0
    mask = mask if masked else None
    ours = load_balancing_loss(logits, 2, mask, mode="per-layer")
    theirs = sum(load_balancing_loss_func((t,), 8, 2, mask) for t in logits) / len(logits)
    assert abs(ours.item() - theirs.item()) <= 1e-6


def test_pooling_hides_layers_that_each_collapsed():
    # Each layer sends every token to its own pair of experts; pooled over layers, they look balanced.
    layers = []
    for pair in range(4):
        logits = torch.zeros(32, 8)
        logits[:, 2 * pair] = logits[:, 2 * pair + 1] = 5.0
        layers.append(logits)
    pooled = load_balancing_loss(layers, 2, mode="pooled").item()
    per_layer = load_balancing_loss(layers, 2, mode="per-layer").item()
    assert pooled == pytest.approx(2.0, abs=0.05)  # the balanced value
    assert per_layer > 3 * pooled  # each layer alone is badly unbalanced
    with pytest.raises(ValueError, match="mode"):
        load_balancing_loss(layers, 2, mode="mean")


def test_load_balancing_of_a_balanced_router_is_top_k():
    # Every token's probabilities uniform except a tiny tilt that spreads the top-2 choices evenly.
    n_experts, top_k = 8, 2
    rows = torch.arange(64)
    logits = torch.zeros(64, n_experts)
    logits[rows, rows % n_experts] = 1e-4
    logits[rows, (rows + 1) % n_experts] = 1e-4
    assert load_balancing_loss([logits, logits], top_k).item() == pytest.approx(top_k, abs=1e-3)


def test_load_balancing_gradient_reaches_the_router():
    logits = _logits(n_layers=2)
    params = [t.clone().requires_grad_() for t in logits]
    load_balancing_loss(params, 2).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_z_loss_is_mean_squared_logsumexp():
    logits = _logits(n_layers=2, batch=2, seq=3, n_experts=4)
    expected = sum(torch.logsumexp(t, -1).pow(2).mean() for t in logits) / 2
    assert z_loss(logits).item() == pytest.approx(expected.item(), rel=1e-6)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    rows = mask.reshape(-1).bool()
    expected = sum(torch.logsumexp(t[rows], -1).pow(2).mean() for t in logits) / 2
    assert z_loss(logits, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_aux_losses_need_a_router():
    with pytest.raises(ValueError, match="at least one MoE layer"):
        load_balancing_loss([], 2)
    with pytest.raises(ValueError, match="at least one MoE layer"):
        z_loss([])


# ---- cross-entropy ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_chunked_cross_entropy_equals_full(chunk):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, 16, generator=g)
    w = torch.randn(50, 16, generator=g) * 0.5
    targets = torch.randint(0, 50, (2, 9), generator=g)
    targets[1, 3] = -100
    ours_h, ours_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = cross_entropy(ours_h, ours_w, targets, chunk=chunk)
    ref = F.cross_entropy((ref_h @ ref_w.t()).reshape(-1, 50), targets.reshape(-1))
    (3 * ours).backward()
    (3 * ref).backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_h.grad, ref_h.grad)
    torch.testing.assert_close(ours_w.grad, ref_w.grad)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy(h, w, targets, chunk=chunk), ref.detach())


def test_cross_entropy_under_bf16_autocast_is_close():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = (torch.randn(100, 32, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, 100, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cross_entropy(h, w, targets, chunk=16)
    ours.backward()
    assert ours.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    ref = F.cross_entropy(h.detach() @ w.detach().t(), targets)
    assert abs(ours.item() - ref.item()) < 2e-2


# ---- capacity, jitter, metrics ---------------------------------------------------------------------------------

def _expected_kept(experts: torch.Tensor, n_experts: int, limit: int) -> torch.Tensor:
    """The obvious rule: walk first choices in token order, then second choices; an expert keeps the first
    `limit` assignments it receives."""
    kept = torch.zeros_like(experts, dtype=torch.bool)
    used = [0] * n_experts
    for slot in range(experts.shape[1]):
        for token in range(experts.shape[0]):
            e = experts[token, slot].item()
            if used[e] < limit:
                kept[token, slot] = True
                used[e] += 1
    return kept


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_exactly_the_overflow(capacity_factor):
    g = torch.Generator().manual_seed(4)
    n_tokens, n_experts, top_k = 40, 4, 2
    logits = torch.randn(n_tokens, n_experts, generator=g)
    logits[:, 0] += 1.5  # expert 0 is popular and overflows
    _, experts = route(logits, top_k)
    limit = capacity(n_tokens, n_experts, top_k, capacity_factor)
    assert limit == math.ceil(capacity_factor * n_tokens * top_k / n_experts)
    kept = capacity_mask(experts, n_experts, limit)
    assert torch.equal(kept, _expected_kept(experts, n_experts, limit))
    per_expert = torch.bincount(experts[kept], minlength=n_experts)
    wanted = torch.bincount(experts.reshape(-1), minlength=n_experts)
    assert torch.equal(per_expert, wanted.clamp(max=limit))  # exactly the overflow is dropped
    assert (~kept).sum() == (wanted - limit).clamp(min=0).sum()


def test_dropped_assignments_contribute_nothing():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 16, generator=g)
    w13, w2 = torch.randn(4, 24, 16, generator=g) * 0.3, torch.randn(4, 16, 12, generator=g) * 0.3
    logits = torch.randn(30, 4, generator=g)
    logits[:, 1] += 2.0
    weights, experts = route(logits, 2)
    kept = capacity_mask(experts, 4, capacity(30, 4, 2, 1.0))
    assert not kept.all()
    expected = moe_reference(x, w13, w2, weights * kept, experts)  # a dropped assignment has gate weight 0
    for dispatch in (moe_reference, moe_grouped):
        torch.testing.assert_close(dispatch(x, w13, w2, weights, experts, kept), expected)
    # ... and the grouped backward agrees with the reference's
    grads = []
    for dispatch in (moe_reference, moe_grouped):
        params = [t.clone().requires_grad_() for t in (x, w13, w2, weights)]
        dispatch(*params, experts, kept).pow(2).sum().backward()
        grads.append([p.grad for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _moe(seed=0, n_experts=4, top_k=2) -> MoE:
    moe = MoE(16, 24, n_experts, top_k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe


def test_capacity_and_jitter_act_only_in_training():
    moe = _moe()
    moe.capacity_factor, moe.router_jitter = 0.5, 0.1
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(6))
    moe.eval()
    y, routing = moe(x, return_routing=True)
    assert routing.kept is None
    torch.testing.assert_close(routing.logits, moe.router(x.reshape(-1, 16)))
    moe.train()
    torch.manual_seed(0)
    _, routing = moe(x, return_routing=True)
    assert routing.kept is not None and not routing.kept.all()
    flat = x.reshape(-1, 16)
    clean = moe.router(flat)
    assert not torch.allclose(routing.logits, clean)  # jittered ...
    bound = 0.1 * flat.abs() @ moe.router.weight.abs().t()  # ... by x * U(0.9, 1.1)
    assert ((routing.logits - clean).abs() <= bound + 1e-6).all()


def test_router_stays_float32_under_autocast():
    moe = _moe().train()
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, routing = moe(x, return_routing=True)
    assert routing.logits.dtype == torch.float32
    torch.testing.assert_close(routing.logits, moe.router(x))


def test_router_metrics():
    logits = torch.tensor([[5.0, 0.0, 0.0, -5.0]] * 3 + [[1e-4, 0.0, 2e-4, 0.0]])  # the last nearly uniform
    _, experts = route(logits, 2)
    kept = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    from mixtral.moe import Routing
    (m,) = router_metrics([Routing(logits, experts, kept)])
    assert sum(m["load"]) == pytest.approx(1.0)
    assert m["load"][0] == pytest.approx(4 / 8)
    assert m["dropped"] == pytest.approx(1 / 8)
    uniform = math.log(4)
    assert 0 < m["entropy"] < uniform
    (m,) = router_metrics([Routing(logits, experts, None)], attention_mask=torch.tensor([[0, 0, 0, 1]]))
    assert m["entropy"] == pytest.approx(uniform, abs=1e-6) and m["dropped"] == 0.0


def test_model_returns_routing_of_every_moe_layer():
    config = ModelConfig(dim=32, n_layers=3, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=64,
                         n_experts=4, top_k=2)
    model = Transformer(config).init_weights(0)
    ids = torch.randint(0, 64, (2, 5))
    h, routing = model.trunk(ids)
    assert h.shape == (2, 5, 32) and len(routing) == 3
    assert routing[0].logits.shape == (10, 4) and routing[0].experts.shape == (10, 2)
    torch.testing.assert_close(model.output(model.norm(h)), model(ids))
    dense = Transformer(ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2,
                                    vocab_size=64, n_experts=1, top_k=1)).init_weights(0)
    assert dense.trunk(ids)[1] == []


@pytest.mark.parametrize("n_tokens", [1, 64, 300])
def test_grouped_training_path_equals_reference(n_tokens):
    # The training path pads each expert's rows to a multiple of ROW_BUCKET; counts below, at and above it.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n_tokens, 16, generator=g)
    w13, w2 = torch.randn(4, 24, 16, generator=g) * 0.3, torch.randn(4, 16, 12, generator=g) * 0.3
    logits = torch.randn(n_tokens, 4, generator=g)
    logits[:, 3] -= 100  # one expert gets nothing
    weights, experts = route(logits, 2)
    results = []
    for dispatch in (moe_reference, moe_grouped):
        params = [t.clone().requires_grad_() for t in (x, w13, w2, weights)]
        out = dispatch(*params, experts)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [p.grad for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_grouped_training_path_under_bf16_autocast_is_close_to_reference():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(100, 32, generator=g)
    w13, w2 = torch.randn(4, 48, 32, generator=g) * 0.2, torch.randn(4, 32, 24, generator=g) * 0.2
    weights, experts = route(torch.randn(100, 4, generator=g), 2)
    results = []
    for dispatch in (moe_reference, moe_grouped):
        params = [t.clone().requires_grad_() for t in (x, w13, w2, weights)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dispatch(*params, experts)
        out.float().pow(2).sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in params)
        results.append([out.detach().float()] + [p.grad for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0.05 * a.abs().max().item(), rtol=0.05)


def test_every_parameter_gets_a_gradient_when_an_expert_is_idle():
    # A data-parallel all-reduce hangs when ranks disagree on which tensors have gradients.
    moe = _moe(n_experts=4, top_k=1).train()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0], [1.0], [1.0], [-1.0]]).expand(4, 16))
    x = torch.rand(20, 16, generator=torch.Generator().manual_seed(9)) + 0.1  # positive: expert 3 scores lowest
    y, routing = moe(x, return_routing=True)
    assert (routing.experts != 3).all()
    y.pow(2).sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
    assert torch.count_nonzero(moe.w13.grad[3]) == 0 and torch.count_nonzero(moe.w13.grad[:3]) > 0
