"""`hnmix bench --profile`: where a step's time goes, by operator (torch.profiler).

Self time per operator (time inside the operator, not in the operators it calls), so the shares add up to
the profiled total without counting a kernel twice: device time on CUDA (what bounds a GPU step), CPU time
otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.table import Table
from torch.profiler import ProfilerActivity


def self_time_us(event, on_device: bool) -> float:
    if not on_device:
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_step(step: Callable[[], object], device: torch.device, steps: int = 3,
                 top: int = 20) -> tuple[list[dict], float]:
    """Profile `steps` calls of `step` (already warmed up). Returns the `top` operators by self time (name,
    calls per step, ms per step, share of the profiled time) and the profiled time per step: on CUDA the
    device's busy time, which against the timed ms/step tells a device-bound step from a host-bound one."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_device:
            torch.cuda.synchronize(device)
    events = [(e, self_time_us(e, on_device)) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    events.sort(key=lambda et: et[1], reverse=True)
    rows = [{"name": e.key, "calls": e.count / steps, "total_ms": t / steps / 1e3, "share": t / total}
            for e, t in events[:top] if t > 0]
    return rows, total / steps / 1e3


def profile_table(rows: list[dict], device_time: bool, profiled_ms: float, timed_ms: float) -> Table:
    title = (f"top operators, {'device' if device_time else 'CPU'} self time per step "
             f"(all operators {profiled_ms:.1f} ms; timed step {timed_ms:.1f} ms)")
    t = Table(title=title, title_justify="left")
    for col, justify in (("operator", "left"), ("calls", "right"), ("total ms", "right"), ("share", "right")):
        t.add_column(col, justify=justify)
    for r in rows:
        t.add_row(r["name"], f"{r['calls']:g}", f"{r['total_ms']:.3f}", f"{r['share']:.1%}")
    return t
