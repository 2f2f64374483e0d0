"""From cached runs to the results: per-method summaries, the power analysis, claim verdicts, plot.

The yardstick is the seed spread. For methods a, b with n seeds each and test-loss sds s_a, s_b,
the difference of means has sd_Δ = sqrt((s_a² + s_b²)/n), floored at the benchmark's typical
sqrt(2/n)·median(s) (three seeds can agree by chance; the floor keeps such a pair from looking
sharper than the benchmark is). A difference is resolved when |Δ| > 3·sd_Δ; the smallest difference
the benchmark resolves is 3·sqrt(2/n)·median(s). Accuracy-like metrics are handled the same way.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional

from .grid import Grid, best_lr, final_val

Z = 3.0


def _ms(values: List[float]):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return (math.nan, math.nan)
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan)


def _at(row: dict, fraction: float) -> dict:
    step = max(1, round(fraction * row["steps"]))
    return next((e for e in row["evals"] if e["step"] == step), {})


def summarize(grid: Grid, methods: Dict, chosen: Dict[str, float], seeds: int,
              leaders: Optional[Dict[str, str]] = None) -> Dict[str, dict]:
    out = {}
    for name, m in methods.items():
        lr, leader = chosen[name], (leaders or {}).get(name, name)
        runs = sorted(grid.rows(name, lr=lr), key=lambda r: r["seed"])[:seeds]
        _, tried = best_lr(grid, leader)
        s = {"label": m.label, "family": m.family, "lr": lr, "lrs": tried, "edge": lr in (tried[0], tried[-1]),
             "lr_from": leader,
             "n": len(runs), "trainable": runs[0]["trainable"],
             "sweep": {f"{r['lr']:.3g}": final_val(r) for r in sorted(grid.rows(leader, seed=0), key=lambda r: r["lr"])},
             "init_frac": _ms([r["init_s"] / r["train_s"] for r in runs])[0],
             "init_s": _ms([r["init_s"] for r in runs])[0], "train_s": _ms([r["train_s"] for r in runs])[0],
             "init_peak_mib": max(r["init_peak_bytes"] for r in runs) / 2 ** 20,
             "train_peak_mib": max(r["train_peak_bytes"] for r in runs) / 2 ** 20,
             "diverged": sum(bool(r.get("diverged")) for r in runs),
             "init_loss": _ms([r["train_loss"][0] for r in runs])[0]}  # step 1's batch, before any update
        for tag, frac in (("half", 0.5), ("final", 1.0)):
            s[f"loss_{tag}"] = _ms([_at(r, frac).get("test_loss") for r in runs])
            s[f"metric_{tag}"] = _ms([_at(r, frac).get("test_metric") for r in runs])
        s["curve"] = _mean_curve([r["train_loss"] for r in runs])
        s["test_curve"] = [(e["step"], _ms([_at(r, e["step"] / r["steps"]).get("test_loss") for r in runs])[0])
                           for e in runs[0]["evals"]]
        out[name] = s
    return out


def _mean_curve(curves: List[List[float]]) -> List[float]:
    n = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def power(summary: Dict[str, dict], n: int) -> dict:
    """The typical seed sd, the smallest resolvable difference, and the positive control."""
    out = {"n": n}
    for key in ("loss_final", "metric_final"):
        sds = [s[key][1] for s in summary.values() if math.isfinite(s[key][1])]
        med = statistics.median(sds) if sds else math.nan
        out[key] = {"median_sd": med, "floor_sd_diff": math.sqrt(2 / n) * med, "resolvable": Z * math.sqrt(2 / n) * med}
    if "full" in summary and "lora_r1" in summary:
        out["control"] = compare(summary, out, "full", "lora_r1")
    return out


def compare(summary: Dict[str, dict], pw: dict, a: str, b: str) -> dict:
    """a against b on final test loss and metric: Δ = a − b, its sd, and Δ/sd (z)."""
    res = {"a": a, "b": b}
    for key in ("loss_final", "metric_final"):
        (ma, sa), (mb, sb) = summary[a][key], summary[b][key]
        n = pw["n"]
        sd = math.sqrt(((sa if math.isfinite(sa) else 0) ** 2 + (sb if math.isfinite(sb) else 0) ** 2) / n)
        sd = max(sd, pw[key]["floor_sd_diff"])
        res[key] = {"diff": ma - mb, "sd": sd, "z": (ma - mb) / sd if sd > 0 else math.nan}
    return res


def verdict(c: dict, claimed: str) -> str:
    """claimed: 'better' (a beats b), 'not worse' (a matches or beats b), 'close' (no difference).
    Judged on test loss (lower is better); z > 3 in the claimed direction supports."""
    z = -c["loss_final"]["z"]  # > 0: a has the lower loss
    if claimed == "close":
        return "consistent (no resolved difference)" if abs(z) <= Z else ("contradicts: a better" if z > 0 else "contradicts: b better")
    if z > Z:
        return "supports"
    if z < -Z:
        return "contradicts"
    return "consistent (no resolved difference)" if claimed == "not worse" else "undecided"


def fmt_ms(ms, digits: int = 3, pct: bool = False) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "n/a"
    k = 100.0 if pct else 1.0
    return f"{m * k:.{digits}f} ± {s * k:.{digits}f}" if math.isfinite(s) else f"{m * k:.{digits}f}"


def table(summary: Dict[str, dict], metric_name: str) -> str:
    head = (f"| method | trainable | LR (tried) | train loss at init | test loss, ½ steps | test loss, end | {metric_name} % , ½ | "
            f"{metric_name} %, end | init / train time | init peak MiB | train peak MiB |\n|" + "---|" * 11)
    lines = [head]
    order = sorted(summary, key=lambda k: (summary[k]["family"], summary[k]["loss_final"][0]))
    for k in order:
        s = summary[k]
        tried = ", ".join(f"{x:.2g}" for x in s["lrs"])
        edge = " (edge)" if s["edge"] else ""
        if s.get("lr_from", k) != k:
            edge += f", {summary[s['lr_from']]['label'] if s['lr_from'] in summary else s['lr_from']}'s sweep"
        div = f" ({s['diverged']} diverged)" if s["diverged"] else ""
        lines.append(f"| {s['label']}{div} | {s['trainable']:,} | {s['lr']:.2g}{edge} ({tried}) | {s['init_loss']:.3f} | "
                     f"{fmt_ms(s['loss_half'])} | "
                     f"{fmt_ms(s['loss_final'])} | {fmt_ms(s['metric_half'], 1, True)} | {fmt_ms(s['metric_final'], 1, True)} | "
                     f"{100 * s['init_frac']:.2f}% | {s['init_peak_mib']:.2f} | {s['train_peak_mib']:.2f} |")
    return "\n".join(lines)


def plot(summary: Dict[str, dict], names: List[str], path: str, title: str, smooth: int = 10) -> Optional[str]:
    """Training loss (moving average over `smooth` steps) and test loss at the eval points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for i, k in enumerate([n for n in names if n in summary]):
        s = summary[k]
        c = s["curve"]
        ma = [statistics.fmean(c[max(0, j - smooth + 1):j + 1]) for j in range(len(c))]
        style = dict(color=plt.cm.tab10(i % 10), ls="-" if i < 10 else "--", lw=1.2, label=s["label"])
        ax1.plot(range(1, len(ma) + 1), ma, **style)
        xs, ys = zip(*s["test_curve"])
        ax2.plot(xs, ys, marker="o", **style)
    ax1.set(xlabel="optimizer step", ylabel=f"training loss (moving average, {smooth} steps)", title=title, yscale="log")
    ax2.set(xlabel="optimizer step", ylabel="test loss (mean over seeds)", title="held-out test loss", yscale="log")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
