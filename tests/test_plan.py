"""mixtral.offload.plan: the budget arithmetic and the choice among precision mixes."""
from mixtral import kernels, quant
from mixtral.config import from_name
from mixtral.offload import plan

MACHINE = plan.Machine(disk_bytes_per_s=1.5e9, memory_bytes_per_s=20e9)
CONFIG = from_name("mixtral-8x7b")
GB = 1e9


def test_expert_bytes_are_the_two_matrices_at_their_precision():
    assert plan.expert_bytes(CONFIG, "bf16") == 3 * 4096 * 14336 * 2
    int4 = plan.expert_bytes(CONFIG, "int4")
    assert int4 == quant.matrix_bytes("int4", 2 * 14336, 4096) + quant.matrix_bytes("int4", 4096, 14336)
    assert plan.expert_bytes(CONFIG, "int3:g128") < plan.expert_bytes(CONFIG, "int3") < int4


def test_every_plan_fits_its_budget_and_more_memory_is_never_slower():
    previous = 0.0
    for budget in (6, 8, 12, 16, 24, 32):
        found = plan.plans(CONFIG, int(budget * GB), MACHINE)
        assert found and all(p.memory_bytes <= budget * GB for p in found)
        assert all(p.slots >= CONFIG.top_k for p in found)
        best = max(p.tokens_per_s for p in found)
        assert best >= previous
        previous = best


def test_a_budget_that_holds_every_expert_is_not_offloaded():
    found = plan.plans(CONFIG, int(24 * GB), MACHINE)
    (int3,) = [p for p in found if (p.experts, p.attention) == ("int3:g128", "int8")]
    assert not int3.offloaded and int3.hit_rate == 1 and int3.io_seconds == 0
    (bf16,) = [p for p in found if (p.experts, p.attention) == ("bf16", "int8")]
    assert bf16.offloaded and bf16.io_seconds > 0 and bf16.tokens_per_s < int3.tokens_per_s


def test_the_quality_floor_puts_mixes_over_it_last(monkeypatch):
    monkeypatch.setattr(plan, "QUALITY", {(e, a): (0.5 if e.startswith("int2") else 0.01)
                                           for e in plan.EXPERT_CHOICES for a in plan.ATTENTION_CHOICES})
    found = plan.plans(CONFIG, int(8 * GB), MACHINE, max_quality_loss=0.05)
    first_bad = next(i for i, p in enumerate(found) if p.experts.startswith("int2"))
    assert all(p.experts.startswith("int2") for p in found[first_bad:])  # over the floor: after every good one
    anything = plan.plans(CONFIG, int(8 * GB), MACHINE, max_quality_loss=None)
    assert anything[0].tokens_per_s == max(p.tokens_per_s for p in found)


def test_an_unmeasured_mix_is_not_chosen_under_a_floor(monkeypatch):
    monkeypatch.setattr(plan, "QUALITY", {("int4", "int8"): 0.01})
    found = plan.plans(CONFIG, int(16 * GB), MACHINE, max_quality_loss=0.05)
    assert (found[0].experts, found[0].attention) == ("int4", "int8")


def test_a_budget_below_the_resident_part_has_no_plan():
    assert plan.plans(CONFIG, int(1 * GB), MACHINE) == []
    tight = plan.plans(CONFIG, int(1.9 * GB), MACHINE)  # only int4 attention leaves room for two experts
    assert tight and {p.attention for p in tight} == {"int4"} and min(p.slots for p in tight) == CONFIG.top_k


def test_compute_counts_each_precisions_kernel_speed():
    by_experts = {p.experts: p for p in plan.plans(CONFIG, int(64 * GB), MACHINE) if p.attention == "int8"}
    # in memory, int3 experts read 28% fewer bytes than int4, through a kernel of its own speed
    ratio = by_experts["int3:g128"].compute_seconds / by_experts["int4"].compute_seconds
    expected = (plan.expert_bytes(CONFIG, "int3:g128") / plan.kernel_speed("int3:g128")) / (
        plan.expert_bytes(CONFIG, "int4") / plan.kernel_speed("int4"))
    assert abs(ratio - expected) < 0.15  # the experts dominate; attention and output are shared
    exact = kernels.policy().with_features(int8_dot=False)
    with kernels.use_policy(exact):  # lowbit.c's exact way, slower
        assert plan.kernel_speed("int3") == plan.EXACT_LOWBIT_SPEED["int3"] < plan.KERNEL_SPEED["int3"]
