"""Measured against predicted: a real training step on a small model.

CPU (what runs here): each configuration runs in a fresh Python process, so one run's allocations
cannot hide in another's. The child

1. imports torch/transformers and runs a warm-up step on a 1-layer model, so that library state
   (oneDNN/MKL code caches, OpenMP threads) is already in the baseline;
2. records the baseline RSS (VmRSS), builds the model, resets the peak-RSS counter (writes "5" to
   /proc/self/clear_refs, Linux >= 4.0), and runs forward (with the loss), backward and
   AdamW(foreach=False).step();
3. reports the saved-for-backward bytes (`SavedActivationTracker` on the real tensors) and the
   step's peak RSS minus the baseline.

glibc is told to serve every allocation of 64 KiB or more with mmap (MALLOC_MMAP_THRESHOLD_=65536),
so freed tensors go back to the OS and RSS follows the live tensors instead of the allocator's
free lists. If clear_refs cannot be written the peak covers the model build as well
(`hwm_reset` = False in the result).

The prediction is `simulate_step` on the meta device: the same step replayed without data, with
every storage followed from creation to release (`LiveTensorTracker`).

CUDA: `measure_cuda_step` runs `run_cuda_step` in a fresh process; it measures
torch.cuda.max_memory_allocated and tokens/s of the same step; with `zero_offload=True` it runs the
step through DeepSpeed ZeRO-3 with optimizer and parameter offload on one GPU.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .activations import (TrainSpec, build_model, load_preset, make_batch, SavedActivationTracker,
                          simulate_step)

MMAP_THRESHOLD = 65536


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_bytes() -> int:
    """Current resident set size of this process (VmRSS), in bytes."""
    kib = _status_kib("VmRSS")
    if kib is None:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since start or the last `reset_peak_rss` (VmHWM), in bytes."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel or sandbox does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class CpuStepResult:
    """One real CPU training step: measured bytes (see the module docstring)."""

    spec: TrainSpec
    saved_bytes: int
    saved_by_category: dict
    baseline_rss: int
    model_rss: int  # RSS after the model is built, minus the baseline
    peak_rss: int  # peak RSS of the step minus the baseline
    hwm_reset: bool
    seconds: float


def run_cpu_step(config, spec: TrainSpec, seed: int = 0) -> CpuStepResult:
    """Run one real training step in this process and measure it (use `measure_cpu_step` to get a
    fresh process)."""

    warm_cfg = type(config).from_dict(config.to_dict())
    warm_cfg.num_hidden_layers = 1
    warm_spec = spec.replace(batch_size=1, seq_len=min(spec.seq_len, 32))
    warm = build_model(warm_cfg, warm_spec, "cpu")
    ids, labels = make_batch(warm_spec, config.vocab_size, "cpu", seed)
    warm(input_ids=ids, labels=labels).loss.backward()
    trainable = [p for p in warm.parameters() if p.requires_grad]
    if trainable:
        torch.optim.AdamW(trainable, lr=1e-4, foreach=False).step()
    del warm, ids, labels, trainable
    _trim()

    t0 = time.time()
    baseline = rss_bytes()
    ids, labels = make_batch(spec, config.vocab_size, "cpu", seed)
    model = build_model(config, spec, "cpu")
    _trim()
    model_rss = rss_bytes() - baseline
    reset = reset_peak_rss()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=False) if trainable else None
    with SavedActivationTracker(model) as tr:
        out = model(input_ids=ids, labels=labels)
    loss = out.loss
    del out
    loss.backward()
    del loss
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = peak_rss_bytes() - baseline
    return CpuStepResult(spec, tr.report.total_bytes, dict(tr.report.by_category), baseline, model_rss,
                         peak, reset, time.time() - t0)


def _child_main(payload: str) -> None:
    """Entry point of the measuring child process: JSON in (argv), one JSON line out per spec."""
    d = json.loads(payload)
    torch.set_num_threads(int(d.get("threads", torch.get_num_threads())))
    config = load_preset(d["preset"]) if "preset" in d else _config_from_dict(d["config"])
    for s in d["specs"]:
        s["target_modules"] = tuple(s["target_modules"])
        res = run_cpu_step(config, TrainSpec(**s), seed=d.get("seed", 0))
        _trim()
        print(json.dumps(dataclasses.asdict(res)), flush=True)


def _config_from_dict(d: dict):
    from transformers import AutoConfig
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def measure_cpu_steps(config_or_preset, specs: Sequence[TrainSpec], seed: int = 0, timeout: float = 900,
                      threads: Optional[int] = None) -> List[CpuStepResult]:
    """`run_cpu_step` for each spec, in order, in one fresh Python process (see the module docstring).

    The baseline RSS is taken again before each model is built, after the previous run's memory was
    released (gc, malloc_trim). `measure_cpu_step` gives each configuration its own process.
    """
    payload = {"specs": [dataclasses.asdict(s) for s in specs], "seed": seed}
    if threads:
        payload["threads"] = threads
    if isinstance(config_or_preset, str):
        payload["preset"] = config_or_preset
    else:
        payload["config"] = config_or_preset.to_dict()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), PYTHONWARNINGS="ignore",
               TRANSFORMERS_VERBOSITY="error")
    code = "import sys; from lora_dist.memory.measure import _child_main; _child_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = []
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        s = d.pop("spec")
        s["target_modules"] = tuple(s["target_modules"])
        out.append(CpuStepResult(spec=TrainSpec(**s), **d))
    if len(out) != len(specs):
        raise RuntimeError(f"measuring child returned {len(out)} results for {len(specs)} specs:\n{proc.stderr[-4000:]}")
    return out


def measure_cpu_step(config_or_preset, spec: TrainSpec, seed: int = 0, timeout: float = 600,
                     threads: Optional[int] = None) -> CpuStepResult:
    """`run_cpu_step` in a fresh Python process of its own."""
    return measure_cpu_steps(config_or_preset, [spec], seed=seed, timeout=timeout, threads=threads)[0]


@dataclass
class Comparison:
    """Predicted (meta device) against measured (real CPU step) for one configuration."""

    spec: TrainSpec
    predicted_saved: int
    measured_saved: int
    predicted_peak: int
    measured_peak: int
    predicted_by_category: dict
    measured_model_rss: int
    predicted_params: int
    hwm_reset: bool

    @property
    def saved_exact(self) -> bool:
        return self.predicted_saved == self.measured_saved

    @property
    def peak_error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_peak - self.measured_peak) / self.measured_peak


def compare_cpu(config_or_preset, spec: TrainSpec, seed: int = 0, threads: Optional[int] = None) -> Comparison:
    """Predict on the meta device, measure a real step in a fresh process, and put them side by side."""
    return compare_cpu_many(config_or_preset, [spec], seed=seed, threads=threads, fresh=True)[0]


def compare_cpu_many(config_or_preset, specs: Sequence[TrainSpec], seed: int = 0,
                     threads: Optional[int] = None, fresh: bool = True) -> List[Comparison]:
    """`compare_cpu` for several specs: fresh=True gives each its own process; fresh=False measures
    them one after the other in a single child (faster; see `measure_cpu_steps`)."""
    config = load_preset(config_or_preset) if isinstance(config_or_preset, str) else config_or_preset
    if fresh:
        meas = [measure_cpu_step(config_or_preset, s, seed=seed, threads=threads) for s in specs]
    else:
        meas = measure_cpu_steps(config_or_preset, specs, seed=seed, threads=threads)
    out = []
    for spec, m in zip(specs, meas):
        pred = simulate_step(config, spec, "meta")
        out.append(Comparison(spec, pred.saved.total_bytes, m.saved_bytes, pred.peak_step, m.peak_rss,
                              dict(pred.saved.by_category), m.model_rss, pred.params, m.hwm_reset))
    return out


# --------------------------------------------------------------------------------------------------
# CUDA path (needs a GPU)
# --------------------------------------------------------------------------------------------------

@dataclass
class CudaStepResult:
    """max_allocated: torch.cuda.max_memory_allocated over the first training step (the step that
    `simulate_step` replays), bytes; baseline: bytes allocated before the model was built (the cuBLAS
    workspaces of a warm-up matmul; the plan's reserve covers them, the step prediction does not);
    tokens_per_s over the following `steps` steps; saved_bytes of one forward (None under ZeRO-3,
    whose gathered weights are not told apart from activations)."""

    spec: TrainSpec
    zero_offload: bool
    max_allocated: int
    baseline: int
    saved_bytes: Optional[int]
    tokens_per_s: float
    steps: int

    @property
    def step_peak(self) -> int:
        """Peak of the step itself: max_allocated minus the pre-model baseline."""
        return self.max_allocated - self.baseline


def _zero_offload_step(config, spec: TrainSpec, ids, labels):
    """(model, step) of DeepSpeed ZeRO-3 with optimizer and parameter offload to CPU, the model built
    under `deepspeed.zero.Init` as HfDeepSpeedConfig does (world size 1; a single-process group is
    created if none exists)."""
    import deepspeed
    import torch.distributed as dist
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed()
    ds_config = {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": spec.dtype in ("bfloat16", "bf16")},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True}},
        # torch AdamW on the CPU partitions: DeepSpeedCPUAdam would JIT-compile an extension,
        # and with only adapter parameters training the optimizer step is not what is measured.
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
    }
    model = build_model(config, spec, None, construct_ctx=deepspeed.zero.Init(config_dict_or_path=ds_config))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)

    def step():
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
    return model, step


def run_cuda_step(config, spec: TrainSpec, zero_offload: bool = False, steps: int = 3,
                  seed: int = 0) -> CudaStepResult:
    """Measure peak GPU memory and throughput of training steps on one GPU, in this process.

    zero_offload=False: plain PyTorch, AdamW(foreach=False) over the trainable parameters (the step
    `simulate_step` replays). zero_offload=True: DeepSpeed ZeRO-3 with optimizer and parameter
    offload to CPU, the model built under `deepspeed.zero.Init` as HfDeepSpeedConfig does (world
    size 1; a single-process group is created if none exists). Use `measure_cuda_step` to get a
    fresh process per configuration: allocations of an earlier run would count in the peak.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("run_cuda_step needs a CUDA device; none is available")
    dev = torch.device("cuda", torch.cuda.current_device())
    # cuBLAS allocates its workspaces through the caching allocator on first use: take them before
    # the baseline so that the step's peak is the model's own.
    w = torch.randn(64, 64, device=dev, dtype=spec.torch_dtype, requires_grad=True)
    (w @ w).float().sum().backward()
    del w
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    ids, labels = make_batch(spec, config.vocab_size, "cpu", seed)
    ids, labels = ids.to(dev), labels.to(dev)
    if zero_offload:
        model, step = _zero_offload_step(config, spec, ids, labels)
    else:
        model = build_model(config, spec, dev)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)

        def step():
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    max_alloc = torch.cuda.max_memory_allocated()
    t0 = time.time()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = time.time() - t0
    saved = None
    if not zero_offload:
        with SavedActivationTracker(model) as tr:
            out = model(input_ids=ids, labels=labels)
        del out
        saved = tr.report.total_bytes
    return CudaStepResult(spec, zero_offload, max_alloc, baseline, saved,
                          steps * spec.batch_size * spec.seq_len / dt, steps)


def _cuda_child_main(payload: str) -> None:
    """Entry point of the CUDA measuring child: JSON in (argv), one JSON line out."""
    d = json.loads(payload)
    s = d["spec"]
    s["target_modules"] = tuple(s["target_modules"])
    res = run_cuda_step(load_preset(d["preset"]), TrainSpec(**s), zero_offload=d["offload"], seed=d["seed"])
    print(json.dumps(dataclasses.asdict(res)), flush=True)


def measure_cuda_step(preset: str, spec: TrainSpec, zero_offload: bool = False, seed: int = 0,
                      timeout: float = 900) -> CudaStepResult:
    """`run_cuda_step` in a fresh Python process of its own (a clean allocator and CUDA context)."""
    payload = {"preset": preset, "spec": dataclasses.asdict(spec), "offload": zero_offload, "seed": seed}
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    code = "import sys; from lora_dist.memory.measure import _cuda_child_main; _cuda_child_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"CUDA measuring child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    d = json.loads(line)
    s = d.pop("spec")
    s["target_modules"] = tuple(s["target_modules"])
    return CudaStepResult(spec=TrainSpec(**s), **d)
