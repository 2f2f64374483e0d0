"""The pass planner (lora_dist/engine/passes.py) on hand-made units: fewest passes (against an
exhaustive search), budget respected, the error names the unit, bytes and cost balanced."""
import itertools
import random

import pytest

from lora_dist.engine.passes import UnitCost, assign_owners, plan_passes
from lora_dist.errors import ConfigError


def _units(seed, n=8):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        b = rng.randint(10, 200)
        out.append(UnitCost(f"u{i}", stats_bytes=b, workspace_bytes=rng.randint(0, b), weight_bytes=rng.choice([0, 7]),
                            inflight_bytes=rng.randint(5, 9), wire_bytes=rng.randint(1, 50),
                            solve_cost=float(rng.randint(1, 100)), send_bytes=rng.randint(1, 4)))
    return out


def _peak(units, inflight):
    """The peak formula written out: owned statistics + one exchange + one solve."""
    return sum(u.stats_bytes for u in units) + inflight + max((u.workspace_bytes + u.weight_bytes for u in units),
                                                             default=0)


def _min_passes(units, owner, world, budget):
    """Exhaustive: the fewest k such that every rank's units split into k passes under budget (with
    the conservative in-flight term, the largest of all units, as the planner packs with)."""
    inflight = max(u.inflight_bytes for u in units)
    need = 1
    for r in range(world):
        mine = [u for u in units if owner[u.name] == r]
        for k in range(1, len(mine) + 1):
            if any(all(_peak([u for u, b in zip(mine, a) if b == p], inflight) <= budget for p in range(k))
                   for a in itertools.product(range(k), repeat=len(mine))):
                need = max(need, k)
                break
    return need


@pytest.mark.parametrize("seed", range(6))
def test_fewest_passes_and_budget(seed):
    units = _units(seed)
    world = 2 + seed % 2
    lo = max(u.stats_bytes + u.workspace_bytes + u.weight_bytes for u in units) + max(u.inflight_bytes for u in units)
    for budget in (lo, lo + 60, int(lo * 1.7), 10 ** 6):
        plan = plan_passes(units, world, budget)
        assert plan.n_passes == _min_passes(units, plan.owner, world, budget)
        assert plan.max_peak() <= budget
        seen = sorted(n for ps in plan.passes for names in ps.values() for n in names)
        assert seen == sorted(u.name for u in units)                     # every unit once
        byname = {u.name: u for u in units}
        for p, ps in enumerate(plan.passes):
            send = max(byname[n].send_bytes for names in ps.values() for n in names)
            for r in range(world):
                own = [byname[n] for n in ps.get(r, [])]
                assert all(plan.owner[u.name] == r for u in own)
                # in flight: its own units' exchange (receiving + products), or sending its rows
                inflight = max([send] + [u.inflight_bytes for u in own])
                assert plan.peak[p][r] == _peak(own, inflight)
                assert plan.collect_peak[p][r] == sum(u.stats_bytes for u in own) + inflight
                assert plan.wire_recv[p][r] == sum(u.wire_bytes for u in own) * (world - 1)
    assert plan_passes(units, world, 10 ** 6).n_passes == 1


def test_error_names_the_unit_and_bytes():
    units = _units(0)
    big = max(units, key=lambda u: u.stats_bytes + u.workspace_bytes + u.weight_bytes)
    need = big.stats_bytes + big.workspace_bytes + big.weight_bytes + max(u.inflight_bytes for u in units)
    with pytest.raises(ConfigError, match=rf"unit '{big.name}': it needs {need} B"):
        plan_passes(units, 2, need - 1)
    plan_passes(units, 2, need)  # exactly enough: fine
    with pytest.raises(ConfigError, match="world size"):
        plan_passes(units, 0, 10 ** 6)


def test_bytes_and_cost_balanced():
    # 64 units of two kinds: byte-heavy/cheap and light/expensive; LPT on cost alone would pile
    # the bytes up, LPT on bytes alone the cost.
    units = [UnitCost(f"a{i}", stats_bytes=100, solve_cost=1.0) for i in range(32)]
    units += [UnitCost(f"b{i}", stats_bytes=1, solve_cost=100.0) for i in range(32)]
    world = 8
    owner = assign_owners(units, world)
    b = [sum(u.stats_bytes for u in units if owner[u.name] == r) for r in range(world)]
    c = [sum(u.solve_cost for u in units if owner[u.name] == r) for r in range(world)]
    assert max(b) <= sum(b) / world + 100 and max(c) <= sum(c) / world + 100
    # independent of the order the units are given in
    assert assign_owners(list(reversed(units)), world) == owner


def test_plan_prints_and_serializes():
    plan = plan_passes(_units(1), 2, 400)
    d = plan.to_dict()
    assert d["passes"] == plan.n_passes == len(d["units_per_pass"])
    assert d["stats_bytes_total"] == sum(u.stats_bytes for u in _units(1))
    text = str(plan)
    assert f"{plan.n_passes} pass(es)" in text and "rank 0" in text


def test_unit_costs_written_out():
    from lora_dist.engine.methods import get_method
    from lora_dist.engine.passes import unit_costs
    mods = [("q", 6, 4, "q"), ("k", 2, 4, "q"), ("v", 2, 4, "q"), ("down", 4, 10, "down")]
    kw = dict(world=3, tokens_per_step=5, steps_per_rank=7, stats_itemsize=8, solve_itemsize=8, compute_itemsize=2)
    da = get_method("lora_da")
    qkv, down = unit_costs(mods, da, da.resolve_options({}), 2, **kw)
    # LoRA-DA: Σxᵀx + Σx once per group, g and diag G per module, float64
    assert qkv.stats_bytes == 8 * ((16 + 4) + (6 * 4 + 6) + 2 * (2 * 4 + 2))
    assert down.stats_bytes == 8 * ((100 + 10) + (4 * 10 + 4))
    assert qkv.workspace_bytes == 8 * (2 * 16 + 2 * 4 * 6)             # the widest module's solve
    row = 4 + 6 + 2 + 2                                                  # x and the three δ
    assert qkv.wire_bytes == 7 * 5 * (2 * row + 9) and qkv.send_bytes == 5 * (2 * row + 9)
    # rows of the owner and its 3 peers, plus one chunk (5 positions) of product temporaries in
    # float64: x and, for diag G of the widest module (q, d_out 6), δ and its masked rows twice
    assert qkv.inflight_bytes == 4 * 5 * (2 * row + 9) + 5 * 8 * (4 + 3 * 6)
    one = unit_costs(mods, da, da.resolve_options({}), 2, **{**kw, "world": 1})[0]  # local sums: no rows
    assert one.inflight_bytes == 5 * 8 * (4 + 3 * 6)
    assert qkv.hook_flops_per_token == 2 * (16 + 6 * 4 + 6 + 2 * (2 * 4 + 2))
    assert qkv.weight_bytes == 0 and qkv.solve_cost == sum(da.cost(o, 4, 2) for _, o, _, _ in mods[:3])
    eva = get_method("eva")                                              # forward-only: x rows, no δ
    qkv, down = unit_costs(mods, eva, eva.resolve_options({}), 2, **kw)
    assert qkv.stats_bytes == 8 * (16 + 4) and qkv.wire_bytes == 7 * 5 * 2 * 4
    pissa = get_method("pissa")                                          # weight-only: W, no rows
    qkv, down = unit_costs(mods, pissa, pissa.resolve_options({}), 2, **kw)
    assert qkv.stats_bytes == qkv.wire_bytes == qkv.inflight_bytes == 0
    assert qkv.weight_bytes == 8 * (6 + 2 + 2) * 4
