"""
measure.py: the measuring tools of the benchmark: timing, read bandwidth, peak memory.

  - timed / time_interleaved  wall-clock seconds; on CUDA the clock waits for the kernels. Several
                              functions are timed side by side, round by round, so that all see the
                              same load from other processes, and the median drops disturbed rounds.
  - read_probe                the device's read bandwidth: x.sum() reads every byte once
  - PeakMemory                peak memory while a `with` block runs (CUDA allocator, or the
                              process's resident-memory high-water mark on Linux)
  - proc_status / available_bytes / release_freed_memory: the Linux /proc and glibc bits behind them
Everything degrades gracefully where /proc or glibc are missing (macOS, Windows).
"""
import ctypes
import statistics
import threading
import time

import torch

READ_PROBE_BYTES = 256 * 2**20  # x.sum() over 256 MiB of float32 measures the read bandwidth


def sync(device):
    """Wait for the device's queued kernels (CUDA), so that the clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(result, seconds) of one call; on CUDA the clock waits for the kernels to finish."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def time_interleaved(fns: dict, device, reps: int, inner: int = 1) -> dict:
    """Median seconds per call of each function, timed side by side.

    Every round calls each function once (`inner` times back to back on CUDA, where one call is
    shorter than the clock's overhead), so all of them see the same load from other processes on
    this machine; the median over `reps` rounds drops the rounds an outside process disturbed.
    """
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def read_probe(device):
    """The device's read bandwidth probe: x.sum() reads every byte of x once, computes ~nothing.
    Returns (fn, bytes read)."""
    x = torch.ones(READ_PROBE_BYTES // 4, dtype=torch.float32, device=device)
    return (lambda: x.sum()), x.numel() * x.element_size()


def proc_status(field: str):
    """A memory field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes; None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory in bytes while a `with` block runs: `with PeakMemory(dev, base) as pm: ...; pm.peak`.

    CUDA: torch.cuda.max_memory_allocated (reset on entry): every tensor held at the peak,
    weights, caches and activations alike.
    CPU: torch keeps no such counter, so we read the kernel's high-water mark of the process's
    resident memory, VmHWM, reset on entry by writing "5" to /proc/self/clear_refs (after handing
    freed memory back to the OS), minus `base` (the resident memory before the model was loaded:
    the Python and torch runtime). That counts what CUDA counts plus the CPU allocator's slack.
    Where clear_refs cannot be written, a thread samples VmRSS every millisecond instead (it may
    miss a spike shorter than that).
    """

    def __init__(self, device, base: int = 0):
        self.device, self.base, self.peak, self.method = device, base, 0, None
        self._stop, self._thread, self._sampled = threading.Event(), None, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        release_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.method = "peak RSS (VmHWM) above the pre-model baseline"
        except OSError:
            self.method = "sampled RSS (1 ms) above the pre-model baseline"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sampled = max(self._sampled, proc_status("VmRSS") or 0)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = self._sampled - self.base
        else:
            self.peak = (proc_status("VmHWM") or 0) - self.base
        return False


def release_freed_memory():
    """Hand memory that is freed but still cached by glibc's malloc back to the OS (malloc_trim), so
    that resident memory is live memory: otherwise a phase's peak would include what an earlier
    phase freed. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_bytes():
    """MemAvailable from /proc/meminfo, or None where unknown (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
