"""Timing and memory helpers shared by compare.py and the anchor worker (numpy only, so
they also run in the anchors' own environments)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since start or the last reset_peak()) of this process, MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Runner:
    """One system under test: `fn(list[str]) -> (n, dim)` and `fn(str) -> (dim,)`."""

    def __init__(self, name: str, fn: Callable, load_mb: float = float("nan")) -> None:
        self.name, self.fn, self.load_mb = name, fn, load_mb
        self.seconds: list[float] = []
        self.peak_growth_mb: list[float] = []
        self.last: np.ndarray | None = None

    def warm(self, texts: list[str]) -> None:
        self.fn(texts)
        self.fn(texts[0])

    def timed_pass(self, texts: list[str]) -> float:
        """Encode all texts once; records seconds and peak RSS growth during the pass."""
        can_reset = reset_peak()
        before, _ = rss_mb()
        start = time.perf_counter()
        out = self.fn(texts)
        seconds = time.perf_counter() - start
        self.seconds.append(seconds)
        if can_reset:
            self.peak_growth_mb.append(rss_mb()[1] - before)
        self.last = np.asarray(out, dtype=np.float32)
        return seconds

    def latencies_ms(self, texts: list[str]) -> list[float]:
        """One single-sentence call per text, each timed."""
        out = []
        for t in texts:
            start = time.perf_counter()
            self.fn(t)
            out.append((time.perf_counter() - start) * 1e3)
        return out


def summary(latencies: list[float]) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50_ms": statistics.median(latencies), "p99_ms": q[98]}


def loaded(name: str, factory: Callable[[], Callable]) -> Runner:
    """Build a system with `factory` and record the RSS its loading added."""
    before, _ = rss_mb()
    fn = factory()
    return Runner(name, fn, rss_mb()[0] - before)


SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_name() -> str:
    """The CPU as results should name it: a VM's model name ("AMD EPYC") hides whether it
    is Zen 3 or Zen 4, so the family / model numbers and the SIMD flags that change the
    kernels (VNNI, bf16, AMX) come with it."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text()
                    .split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return platform.platform()
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    simd = ", ".join(f for f in SIMD_FLAGS if f in flags) or "no AVX2"
    return (f"{info.get('model name', platform.processor())} (family {info.get('cpu family')} "
            f"model {info.get('model')}; {simd})")
