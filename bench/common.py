"""Timing, machine description and JSON output shared by the microbenchmarks.

Contenders are timed interleaved in one process (one call of each per round, so that noise
from a shared machine falls on all of them alike), after a warm-up, and the median of the
rounds is reported. On the GPU each round is timed with CUDA events around ``inner`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(
    description: str,
    *,
    repeats: int,
    warmup: int | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The options every benchmark shares; ``extra`` adds a benchmark's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds (median)")
    if warmup is not None:
        p.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    if extra is not None:
        extra(p)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch and unlock_fast alike"
    )
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no GPU is visible")
    if args.threads is not None:
        from unlock_fast import ops

        torch.set_num_threads(args.threads)
        ops.core.core_module().set_num_threads(args.threads)
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]],
    device: str,
    *,
    repeats: int,
    warmup: int,
    inner: int = 1,
) -> dict[str, dict[str, float]]:
    """Median, min and max seconds per call of each function, timed round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            for _ in range(inner):
                fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                start, stop = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                for _ in range(inner):
                    fn()
                stop.record()
                stop.synchronize()
                times[name].append(start.elapsed_time(stop) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name].append((time.perf_counter() - t0) / inner)
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "rounds": len(t)}
        for name, t in times.items()
    }


def machine(device: str) -> dict[str, Any]:
    """What ran the benchmark."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        from unlock_fast import ops

        core = ops.core.core_module()
        info.update(
            unlock_threads=core.num_threads(), blas=core.blas, cuda_compiled=core.cuda_compiled
        )
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_json(name: str, payload: dict[str, Any], out: Path | None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
