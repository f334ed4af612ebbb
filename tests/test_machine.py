"""The machine record that every run keeps, read from /proc/cpuinfo texts."""

from __future__ import annotations

import platform

import torch

from edgeface.machine import cpu_fields, cpu_flags, cpu_model, describe_machine, machine_tags

# /proc/cpuinfo in the kernel's layout: an Intel Xeon with AMX whose second processor block
# differs (so only the first counts), an AMD EPYC (Zen 4) and an ARM Neoverse N1 (no model
# name). Flags are shortened.
XEON_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Another Processor
flags\t\t: fpu
"""
EPYC_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC Processor
stepping\t: 1
flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""


def test_cpu_model_adds_family_numbers() -> None:
    assert cpu_model(XEON_CPUINFO) == "Intel(R) Xeon(R) Processor (family 6, model 207, stepping 2)"
    assert cpu_model(EPYC_CPUINFO) == "AMD EPYC Processor (family 25, model 17, stepping 1)"

    assert cpu_model(ARM_CPUINFO).endswith(
        "(implementer 0x41, part 0xd0c, variant 0x3, revision 1)")


def test_cpu_fields_first_processor_only() -> None:
    fields = cpu_fields(XEON_CPUINFO)
    assert fields["model"] == "207"
    assert fields["model name"] == "Intel(R) Xeon(R) Processor"
    assert "amx_tile" in cpu_flags(XEON_CPUINFO)
    assert "amx_tile" not in cpu_flags(EPYC_CPUINFO)


def test_cpu_model_without_cpuinfo() -> None:
    expected = platform.processor() or "unknown"
    assert cpu_model("") == expected
    assert cpu_flags("") == set()


def test_describe_machine_this_host() -> None:
    machine = describe_machine()
    assert machine["torch"] == torch.__version__
    assert machine["python"] == platform.python_version()
    assert machine["cores"] >= 1
    tags = machine_tags(machine)
    assert tags["edgeface.machine.cpu"] == machine["cpu"]
    assert tags["edgeface.machine.torch"] == torch.__version__
