"""The memory one calibration micro-step holds by itself, measured before the passes are planned.

The init's budget covers everything the init allocates on top of the resident model states:
statistics, rows in flight, solve workspace and gathered W (passes.py predicts those), and the
calibration forward/backward itself (activations, the input gradients flowing back, ZeRO-3's
gathered parameters), which depends on the model, sequence length, checkpointing and DeepSpeed's
prefetch settings and is therefore measured rather than modelled: the engine runs the first
micro-batch once without hooks and plans the passes under budget − that step's peak.

`LivePeak` measures the rise of live memory over a block:
- CUDA: torch.cuda.max_memory_allocated − memory_allocated at entry (the caching allocator's own
  bookkeeping: exact);
- CPU: bytes in use by malloc (glibc mallinfo2: arena + mmapped chunks, i.e. what CPU tensors
  occupy, cached or not), sampled every 0.5 ms by a thread; where mallinfo2 is missing (non-glibc),
  the resident set size from /proc/self/statm, sampled the same way (an upper bound: it includes
  pages the allocator keeps).
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                             "fsmblks", "uordblks", "fordblks", "keepcost")]


def _cpu_in_use_fn():
    """A function returning the process's CPU bytes in use (see the module doc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = libc.mallinfo2
        info.restype = _MallInfo2
    except (OSError, AttributeError):
        page = os.sysconf("SC_PAGE_SIZE")

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page
        return rss

    def heap() -> int:
        m = info()
        return m.uordblks + m.hblkhd
    return heap


class LivePeak:
    """`with LivePeak(device) as lp: ...` then `lp.rise`: the block's peak live bytes minus those
    at entry (never negative)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rise = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._in_use = _cpu_in_use_fn()
        self._start = self._peak = self._in_use()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.0005):
                self._peak = max(self._peak, self._in_use())
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.rise = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._in_use())
        self.rise = max(0, self._peak - self._start)
