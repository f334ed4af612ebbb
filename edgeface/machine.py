"""Record of the processor and library versions a run trains on.

A seeded run gives the same weights to the bit when it runs again on the same processor with
the same library versions. Another processor can give other weights, because the CPU kernels
that PyTorch picks depend on the instruction set, and the rounding differences grow over the
rounds. The default LFW View 1 run scored 0.836 on an AMD EPYC and 0.846 on an Intel Xeon with
the same code and seed (docs/accuracy.md). So every run records this description, in
`summary.json` and as tags of its MLflow run.
"""

from __future__ import annotations

import os
import platform
from typing import Any

CPUINFO_PATH = "/proc/cpuinfo"
# MLflow tag of a resumed run that lists the machines its later rounds ran on.
MACHINE_CHANGES_TAG = "edgeface.machine.changes"


def read_cpuinfo() -> str:
    """Return the text of /proc/cpuinfo, or "" where it cannot be read (macOS, Windows)."""
    try:
        with open(CPUINFO_PATH, encoding="ascii", errors="replace") as file:
            return file.read()
    except OSError:
        return ""


def cpu_fields(cpuinfo: str) -> dict[str, str]:
    """Return the "key: value" fields of the first processor in a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # a blank line ends the first processor's block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model(cpuinfo: str) -> str:
    """Return the processor's model name with its family, model and stepping numbers.

    Virtual machines often report a generic name such as "Intel(R) Xeon(R) Processor", and the
    numbers tell its generations apart. ARM Linux lists no model name but an implementer and a
    part number, which are used instead. Falls back to `platform.processor()`, then "unknown".
    """
    fields = cpu_fields(cpuinfo)
    labels = (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"),
              ("CPU implementer", "implementer"), ("CPU part", "part"),
              ("CPU variant", "variant"), ("CPU revision", "revision"))
    numbers = [f"{label} {fields[key]}" for key, label in labels if key in fields]
    name = fields.get("model name") or platform.processor()
    if not name:
        name = "ARM" if "CPU implementer" in fields else "unknown"
    return f"{name} ({', '.join(numbers)})" if numbers else name


def cpu_flags(cpuinfo: str) -> set[str]:
    """Return the CPU feature flags of the first processor, empty where none are listed."""
    return set(cpu_fields(cpuinfo).get("flags", "").split())


def describe_machine() -> dict[str, Any]:
    """Return the processor, core count and library versions that decide a run's rounding."""
    import torch

    cpuinfo = read_cpuinfo()
    flags = cpu_flags(cpuinfo)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        cores = os.cpu_count() or 1
    return {
        "cpu": cpu_model(cpuinfo),
        "cores": cores,
        "avx512": "avx512f" in flags,
        "amx": "amx_tile" in flags,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def machine_tags(machine: dict[str, Any]) -> dict[str, str]:
    """Return the MLflow run tags for a `describe_machine` record."""
    return {"edgeface.machine.cpu": str(machine["cpu"]),
            "edgeface.machine.cores": str(machine["cores"]),
            "edgeface.machine.torch": str(machine["torch"])}
