from lora_dist.engine.plan import OwnerPlan, Unit


def _units(costs):
    return [Unit(name=f"l{i}", modules=[f"l{i}"], cost=c) for i, c in enumerate(costs)]


def test_lpt_is_balanced_deterministic_and_independent_of_input_order():
    costs = [9, 7, 6, 5, 5, 4, 3, 3, 2, 1]
    a = OwnerPlan.build(_units(costs), 3)
    b = OwnerPlan.build(list(reversed(_units(costs))), 3)
    assert a.owner == b.owner and a.load == b.load
    assert sum(a.load) == sum(costs)
    assert max(a.load) - min(a.load) <= max(costs)  # LPT bound
    assert a.balance() < 1.1


def test_rounds_give_each_rank_at_most_one_unit_and_cover_everything():
    p = OwnerPlan.build(_units([4, 4, 3, 3, 2, 1, 1]), 2)
    seen = []
    for rd in p.rounds():
        assert set(rd) == {0, 1}
        seen += [u for u in rd.values() if u]
    assert sorted(seen) == sorted(u.name for u in p.units)
    assert p.n_rounds == 4


def test_groups_slice_rounds():
    p = OwnerPlan.build(_units([1] * 8), 2)
    assert p.groups(None) == [[0, 1, 2, 3]]
    assert p.groups(2) == [[0, 1], [2, 3]]
    assert p.groups(10) == [[0], [1], [2], [3]]


def test_world_size_one_and_printable():
    p = OwnerPlan.build([Unit("q", ["q", "k", "v"], 3.0), Unit("o", ["o"], 1.0)], 1)
    assert p.owner_of("k") == 0 and p.rounds() == [{0: "q"}, {0: "o"}]
    text = str(p)
    assert "rank 0" in text and "q  [3 module(s)" in text
    assert p.to_dict()["owner"] == {"q": 0, "o": 0}
