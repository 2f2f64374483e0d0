"""The papers' claims (Llama-2-7B numbers) as comparisons this benchmark can make.

Each comparison is (a, b, claimed): 'better' (a beats b), 'not worse' (a matches or beats b) or
'close' (no difference), judged on final test loss with report.verdict. "LoRA-FA" in the LoRA-FA
rebuttal is its released form: frozen kaiming A with the projected gradient (fa_kaiming_proj).
"""
from __future__ import annotations

from typing import Dict, List

from .report import compare, verdict

CLAIMS = [
    ("1", "LoRA-FA rebuttal (MMLU): Full-FT 57.8, LoRA-Pro 56.6, LoRA-FA 56.2, LoRA-GA 55.9; the three "
          "gradient-approximation methods land close to each other",
     [("full", "lora_pro", "better"), ("lora_pro", "fa_kaiming_proj", "close"), ("lora_pro", "lora_ga", "close"),
      ("fa_kaiming_proj", "lora_ga", "close")]),
    ("2", "LoRA-FA rebuttal, init of the frozen A: kaiming 57.3, EVA 55.3, gaussian 53.7, PiSSA 10.6, OLoRA 3.1 "
          "(inits that rewrite W fail with a frozen A)",
     [("fa_kaiming_proj", "fa_eva_proj", "better"), ("fa_kaiming_proj", "fa_gaussian_proj", "better"),
      ("fa_kaiming_proj", "fa_pissa_proj", "better"), ("fa_kaiming_proj", "fa_olora_proj", "better"),
      ("fa_kaiming", "fa_pissa", "better"), ("fa_kaiming", "fa_olora", "better")]),
    ("3", "LoRA-FA rebuttal: LoRA-FA 57.3, Tied-LoRA TL6 43.3, VeRA 42.9",
     [("fa_kaiming_proj", "tied_tl6", "better"), ("fa_kaiming_proj", "vera", "better")]),
    ("4", "LoRA-DA paper (GSM8K): LoRA 53.1, PiSSA 53.2, MiLoRA 52.9, LoRA-One 53.7, LoRA-DA 55.0; ablations "
          "w/o bias 53.6, w/o variance 53.3; LoRA-FA 41.5 -> 49.4 with a LoRA-DA init; init cost 6% of training",
     [("lora_da", "lora_kaiming", "better"), ("lora_da", "pissa", "better"), ("lora_da", "milora", "better"),
      ("lora_da", "lora_one", "better"), ("lora_da", "lora_da_no_bias", "better"),
      ("lora_da", "lora_da_no_variance", "better"), ("fa_lora_da", "fa_kaiming", "better"),
      ("fa_lora_da_proj", "fa_kaiming_proj", "better")]),
    ("5", "LoRA-SB paper: LoRA-SB matches or beats LoRA with 27-90x fewer trainable parameters, beats LoRA-XS "
          "at the same rank; its init costs about 1.2% of training",
     [("lora_sb_r32", "lora_kaiming", "not worse"), ("lora_sb_r8", "lora_kaiming", "not worse"),
      ("lora_sb_r8", "lora_xs_r8", "better"), ("lora_sb_r32", "lora_xs_r32", "better")]),
]


def judge(summary: Dict[str, dict], pw: dict) -> List[dict]:
    """Every comparison whose two methods ran: Δ loss, Δ metric, z, and the verdict."""
    out = []
    for cid, text, pairs in CLAIMS:
        rows = []
        for a, b, claimed in pairs:
            if a in summary and b in summary:
                c = compare(summary, pw, a, b)
                rows.append({**c, "claimed": claimed, "verdict": verdict(c, claimed)})
        out.append({"claim": cid, "text": text, "comparisons": rows})
    return out


def _untuned(summary: Dict[str, dict], c: dict) -> str:
    """Δ final validation loss of a and b both at LR 3e-3 (the middle of the LoRA grid), seed 0:
    does the ordering hold without tuning? (One seed: judge it against the resolvable difference.)"""
    a, b = (summary[k]["sweep"].get("0.003") for k in (c["a"], c["b"]))
    return "n/a" if a is None or b is None else f"{a - b:+.4f}"


def markdown(judged: List[dict], summary: Dict[str, dict]) -> str:
    lines = []
    for j in judged:
        lines.append(f"**Claim {j['claim']}.** {j['text']}\n")
        if not j["comparisons"]:
            lines.append("(not run in this grid)\n")
            continue
        lines.append("| a | b | claimed | Δ test loss (a−b) ± sd | z | Δ metric (a−b) ± sd | verdict | "
                     "untuned: Δ val loss at LR 3e-3, seed 0 |\n|---|---|---|---|---|---|---|---|")
        for c in j["comparisons"]:
            lo, me = c["loss_final"], c["metric_final"]
            lines.append(f"| {summary[c['a']]['label']} | {summary[c['b']]['label']} | {c['claimed']} | "
                         f"{lo['diff']:+.4f} ± {lo['sd']:.4f} | {lo['z']:+.1f} | "
                         f"{100 * me['diff']:+.1f} ± {100 * me['sd']:.1f} pts | {c['verdict']} | {_untuned(summary, c)} |")
        lines.append("")
    return "\n".join(lines)
