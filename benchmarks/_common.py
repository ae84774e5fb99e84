"""Helpers shared by the benchmark scripts: threads, timing, machine description, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_PACKAGES = ("tqindex", "torch", "faiss-cpu", "numpy")


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in torch and, when it is installed, in FAISS's OpenMP."""
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(threads)


def time_runs(run: Callable[..., Any], repeats: int, setup: Callable[[], Any] | None = None) -> list[float]:
    """Seconds of ``repeats`` timed calls of ``run``, after one untimed warm-up call.

    ``setup`` (untimed) runs before each call, warm-up included; when given, ``run``
    receives its return value.
    """
    times = []
    for attempt in range(repeats + 1):
        state = setup() if setup is not None else None
        start = time.perf_counter()
        if setup is None:
            run()
        else:
            run(state)
        elapsed = time.perf_counter() - start
        if attempt:
            times.append(elapsed)
    return times


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """The raw times with their median and best."""
    return {"times_s": list(times), "median_s": statistics.median(times), "best_s": min(times)}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_description(threads: int) -> dict[str, Any]:
    """CPU, cores, OS, Python and package versions, threads, thread-related env vars, date."""
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "threads": threads,
        "env": {name: os.environ.get(name) for name in _ENV_VARS},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_machine_md(machine: dict[str, Any]) -> str:
    """One Markdown line summarising ``machine_description()``."""
    versions = ", ".join(f"{name} {version}" for name, version in machine["packages"].items() if version)
    env = ", ".join(f"{name}={value}" for name, value in machine["env"].items() if value is not None) or "none set"
    return (
        f"{machine['cpu']}, {machine['usable_cores']} usable cores, {machine['threads']} threads; "
        f"Python {machine['python']}, {versions}; env: {env}; {machine['date']}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers should already be formatted as strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, results: dict[str, Any], markdown: str) -> Path:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` (created if needed); return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return out
