"""Every method of the comparison: an AdapterConfig (kind, init, rank, update rule) and an LR grid.

All LoRA-family methods adapt the same modules at r = 8, alpha = 16 (s = 2) unless the method is
about rank (LoRA-XS / LoRA-SB at two ranks, LoRA at r = 1 as the positive control, VeRA's shared
r = 64 factors). The optimizer is AdamW (weight decay 0) for every method but LoRA-Pro's full rule,
whose inner step is SGD on its Adam-like adjusted gradients (lora_dist.update_rules.LoRAPro).

`lrs` is the first sweep; the grid extends it by one half-decade step past an edge that wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

LORA_LRS = (1e-3, 3e-3, 1e-2)
FULL_LRS = (1e-4, 3e-4, 1e-3)
SMALL_LRS = (3e-3, 1e-2, 3e-2)  # methods with few trainable parameters


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: str = "lora"
    init: Optional[str] = None
    r: int = 8
    alpha: Optional[float] = None           # None = 2r
    use_rslora: bool = False
    rule: str = "plain"
    update_options: dict = field(default_factory=dict)
    loraplus: Optional[float] = None
    init_options: dict = field(default_factory=dict)
    lrs: Tuple[float, ...] = LORA_LRS
    family: str = "LoRA inits"

    def adapter_config(self, targets, seed: int, n_calib: int):
        from lora_dist import AdapterConfig
        alpha = float(2 * self.r if self.alpha is None else self.alpha)
        return AdapterConfig(kind=self.kind, init=self.init, r=self.r, alpha=alpha, use_rslora=self.use_rslora,
                             target_modules=list(targets), seed=seed, init_options=dict(self.init_options),
                             init_samples=n_calib, update_rule=self.rule,
                             update_options=dict(self.update_options), loraplus_lr_ratio=self.loraplus)


def _registry() -> Dict[str, Method]:
    m = [Method("full", "full fine-tuning", kind="none", init="none", lrs=FULL_LRS, family="baselines"),
         Method("lora_r1", "LoRA r=1 (kaiming)", r=1, family="baselines"),
         Method("lora_kaiming", "LoRA kaiming"), Method("lora_gaussian", "LoRA gaussian", init="gaussian")]
    for init, label in (("pissa", "PiSSA"), ("milora", "MiLoRA"), ("olora", "OLoRA"), ("eva", "EVA"),
                        ("corda", "CorDA"), ("lora_ga", "LoRA-GA"), ("lora_one", "LoRA-One"),
                        ("lora_da", "LoRA-DA")):
        m.append(Method(init, label, init=init))
    for abl in ("no_bias", "no_variance", "no_variance_no_fisher"):
        m.append(Method(f"lora_da_{abl}", f"LoRA-DA w/o {abl[3:].replace('_no_', ' & ')}", init="lora_da",
                        init_options={"ablation": abl}))
    for init, label in (("kaiming", "kaiming"), ("gaussian", "gaussian"), ("eva", "EVA"), ("pissa", "PiSSA"),
                        ("olora", "OLoRA"), ("lora_da", "LoRA-DA")):
        m.append(Method(f"fa_{init}", f"LoRA-FA, A={label}", kind="lora_fa", init=init, family="LoRA-FA"))
        m.append(Method(f"fa_{init}_proj", f"LoRA-FA, A={label}, projected g_B", kind="lora_fa", init=init,
                        rule="lora_fa", family="LoRA-FA"))
    m += [Method("lora_pro", "LoRA-Pro (full)", rule="lora_pro", family="update rules"),
          Method("lora_pro_light", "LoRA-Pro light", rule="lora_pro", update_options={"moments": "none"},
                 family="update rules"),
          Method("loraplus", "LoRA+ (ratio 16)", loraplus=16.0, family="update rules"),
          Method("loraplus_4", "LoRA+ (ratio 4)", loraplus=4.0, family="update rules")]
    for r in (8, 32):
        m.append(Method(f"lora_xs_r{r}", f"LoRA-XS r={r}", kind="lora_xs", init="lora_xs", r=r, lrs=SMALL_LRS,
                        family="few parameters"))
        m.append(Method(f"lora_sb_r{r}", f"LoRA-SB r={r}", kind="lora_xs", init="lora_sb", r=r, lrs=SMALL_LRS,
                        family="few parameters"))
    m += [Method("vera", "VeRA (r=64)", kind="vera", r=64, lrs=SMALL_LRS, family="few parameters"),
          Method("tied_tl6", "Tied-LoRA TL6", kind="tied_lora", lrs=SMALL_LRS, family="few parameters"),
          Method("dora", "DoRA", kind="dora", family="other kinds"),
          Method("rslora", "rsLoRA", use_rslora=True, family="other kinds")]
    return {x.name: x for x in m}


METHODS = _registry()
QUICK = ("full", "lora_r1", "lora_kaiming", "lora_da", "fa_kaiming_proj", "lora_sb_r8")
