"""launch/rules_bench.py in its quick mode (tiny-llama, 2 ZeRO-3 ranks, 3 interleaved rounds): the
printed rows are consistent with each other and with the memory tool's LoRA-Pro accounting."""
import json
import os
import statistics
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
import rules_bench  # noqa: E402

MiB = 2 ** 20


@pytest.mark.slow
def test_rules_bench_quick_rows_are_consistent(capsys):
    from lora_dist.memory.activations import TrainSpec, load_preset
    from lora_dist.memory.budget import update_rule_states

    assert rules_bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out.splitlines()[-1][len("JSON "):])
    rows, world = data["rules"], data["world"]
    assert list(rows) == list(rules_bench.RULES) and world == 2
    labels = {v[0] for v in rules_bench.RULES.values()}
    table = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if cells and cells[0] in labels:  # drop the per-round column "median [min, max]" here
            table[cells[0]] = [float(c) for c in cells[1:3] + cells[4:]]
    plain_ms, plain_mib = table["plain LoRA"][0], table["plain LoRA"][2]
    for name, (label, *_rest) in rules_bench.RULES.items():
        ms, ratio, mib, mratio, master, adam, rule = table[label]
        r = rows[name]
        assert len(data["times"][name]) == 3 and r["median_step_s"] == statistics.median(data["times"][name])
        assert ms == pytest.approx(1e3 * r["median_step_s"], abs=0.051)
        assert ratio == pytest.approx(ms / plain_ms, abs=2e-3)      # the ratio is of the printed medians
        assert mratio == pytest.approx(mib / plain_mib, abs=2e-3)
        paired = sorted(t / t0 for t, t0 in zip(data["times"][name], data["times"]["plain"]))
        assert (r["paired_ratio_min"], r["paired_ratio_median"], r["paired_ratio_max"]) == tuple(paired)
        assert mib == pytest.approx(max(sum(m[name].values()) for m in data["memory_by_rank"]) / MiB, abs=1e-4)
    # memory, per rank: Adam keeps m and v of the fp32 master; LoRA-Pro's inner SGD keeps nothing, and
    # its moments are what the memory tool accounts for this preset on 2 ranks
    spec = TrainSpec(mode="lora", r=data["r"], target_modules=tuple(rules_bench.ALL))
    acc = update_rule_states(load_preset("tiny-llama"), spec, world, "lora_pro")
    moments = [m["lora_pro"]["rule_state"] for m in data["memory_by_rank"]]
    assert sum(moments) == acc["moment_bytes_total"] and max(moments) == acc["moment_bytes_per_rank"] > 0
    for m in data["memory_by_rank"]:
        plain, pro = m["plain"], m["lora_pro"]
        assert plain["optimizer"] == 2 * plain["master"] > 0 and plain["rule_state"] == 0
        assert pro["optimizer"] == 0 and pro["master"] == plain["master"]
        assert sum(pro.values()) - sum(plain.values()) == pro["rule_state"] - plain["optimizer"]
        assert m["lora_pro_light"] == plain and m["loraplus"] == plain
        # LoRA-FA: no A to train; G_A and P_A, r×r float64, per adapted layer (4 layers x 7)
        assert m["lora_fa"]["rule_state"] == 4 * 7 * 2 * data["r"] ** 2 * 8
    assert rows["lora_pro"]["memory_bytes"] > rows["plain"]["memory_bytes"]
    # the 70B row: 2 fp32 moments of every adapted matrix, written out from Llama-2-70B's shapes
    h, kv, f = 8192, 1024, 28672
    assert data["moments"][2]["total"] == 80 * (2 * h * h + 2 * kv * h + 3 * f * h) * 2 * 4
