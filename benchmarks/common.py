"""Shared helpers of the speed benchmarks: machine description, timing, process-tree memory.

Memory is read from Linux `/proc`: VmRSS from `/proc/PID/status` and Pss from
`/proc/PID/smaps_rollup`. The RSS of several processes double-counts the pages they share, such as
the torch libraries (about 230 MB per process with torch 2.14). The PSS sum splits each shared
page between the processes that map it, so it is the memory the processes really use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """Describe the CPU, cores, memory, load and library versions for a benchmark record.

    Extends `edgeface.machine.describe_machine`, the record that every run keeps, with the
    bf16 flags, the memory and the load average.
    """
    from edgeface.machine import cpu_flags, describe_machine, read_cpuinfo

    flags = cpu_flags(read_cpuinfo())
    try:
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        memory_kb = 0
    record = describe_machine()
    return {
        **record,
        "memory_gib": round(memory_kb / 2**20, 1),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(payload: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the `fraction` quantile (0..1) of `values` by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty sequence")
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --- process-tree memory ------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Return the direct children of `pid`, from /proc/PID/task/*/children."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        found.extend(int(item) for item in text.split())
    return found


def process_tree(pid: int) -> list[int]:
    """Return `pid` and all its descendants that exist now."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(_children(current))
    return tree


def _kib_field(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory_mib(pid: int) -> tuple[float, float, int]:
    """Return (sum of RSS, sum of PSS, process count) over `pid` and its descendants."""
    pids = process_tree(pid)
    rss = sum(_kib_field(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib_field(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss / 1024, pss / 1024, len(pids)


@dataclass
class MemorySampler:
    """Sample the memory of a process tree in a background thread until `stop`.

    Peaks shorter than `interval` seconds can be missed, so the peaks are lower bounds.
    """

    pid: int
    interval: float = 0.25
    peak_rss_mib: float = 0.0
    peak_pss_mib: float = 0.0
    peak_processes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "MemorySampler":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss, pss, count = tree_memory_mib(self.pid)
            self.peak_rss_mib = max(self.peak_rss_mib, rss)
            self.peak_pss_mib = max(self.peak_pss_mib, pss)
            self.peak_processes = max(self.peak_processes, count)
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return {"peak_rss_mib": round(self.peak_rss_mib, 1),
                "peak_pss_mib": round(self.peak_pss_mib, 1),
                "peak_processes": self.peak_processes, "samples": self.samples}


def run_measured(command: list[str], *, cwd: Path, env: dict[str, str] | None = None,
                 timeout: float = 3600.0, log_path: Path | None = None) -> dict[str, Any]:
    """Run `command`, sampling the memory of its process tree; return wall time and peaks.

    Raises:
        subprocess.CalledProcessError: the command failed; its output is in `log_path`.
        subprocess.TimeoutExpired: it ran past `timeout` seconds and was killed.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    started = time.perf_counter()
    try:
        process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=log,
                                   stderr=subprocess.STDOUT)
        sampler = MemorySampler(process.pid).start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            memory = sampler.stop()
    finally:
        if log_path:
            log.close()
    wall = time.perf_counter() - started
    if code != 0:
        raise subprocess.CalledProcessError(code, command, output=f"see {log_path}")
    return {"wall_seconds": round(wall, 2), **memory}


def edgeface_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "edgeface.cli.main", *arguments]
