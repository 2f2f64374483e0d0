"""Memory accounting for LoRA-family training under DeepSpeed ZeRO (issue 6).

* activations: exact bytes saved for backward (saved-tensor hooks, real tensors or meta device),
  per module type, and a whole-step live-tensor replay (`simulate_step`).
* states: per-rank model states under ZeRO-2/3 with and without CPU offload, LoRA-aware.
* plan: per-GPU peak, largest micro-batch that fits and host RAM for offload.
* measure: a real CPU step measured against the meta-device prediction (and a CUDA path).
* init_cost: the data-aware init's memory, passes, wire bytes and time (docs/init_cost.md).
* update rules: LoRA-Pro's full-size moments on their owner ranks, LoRA-FA's r×r projection
  (`update_rule_states`, `--update-rule`; docs/update_rules.md).

`python -m lora_dist.memory --help` accounts one configuration; see docs/memory.md.
"""
from .activations import (ADAPTER_MODES, ALL_PROJ, CATEGORIES, MODES, ActivationReport,
                          LiveTensorTracker, MemoryConfigError, SavedActivationTracker, StepProfile,
                          TrainSpec, account_activations, build_model, list_presets, load_preset,
                          make_batch, measure_saved_activations, meta_shims, simulate_step)
from .budget import (UPDATE_RULES, ActivationProfile, MemoryPlan, activation_profile, count_params, plan_memory,
                     update_rule_states)
from .states import (Cluster, ModelStates, ParamStats, ZeroConfig, deepspeed_estimate, model_states,
                     param_stats)
from .measure import (Comparison, compare_cpu, compare_cpu_many, measure_cpu_step, measure_cpu_steps,
                      run_cpu_step, run_cuda_step, measure_cuda_step)
from .init_cost import InitCost, InitSpec, Rates, init_cost
from .cli import main

__all__ = [
    "ADAPTER_MODES", "ALL_PROJ", "CATEGORIES", "MODES", "ActivationReport", "LiveTensorTracker",
    "MemoryConfigError", "SavedActivationTracker", "StepProfile", "TrainSpec", "account_activations",
    "build_model", "list_presets", "load_preset", "make_batch", "measure_saved_activations",
    "meta_shims", "simulate_step", "ActivationProfile", "MemoryPlan", "activation_profile",
    "count_params", "plan_memory", "UPDATE_RULES", "update_rule_states", "Cluster", "ModelStates",
    "ParamStats", "ZeroConfig",
    "deepspeed_estimate", "model_states", "param_stats", "Comparison", "compare_cpu",
    "compare_cpu_many", "measure_cpu_step", "measure_cpu_steps", "run_cpu_step", "run_cuda_step", "measure_cuda_step", "InitCost", "InitSpec", "Rates", "init_cost", "main",
]
