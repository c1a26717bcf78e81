"""Parsers: pure functions from recorded text (``vm_stat``, ``sysctl``, ``/proc/meminfo``,
cgroup files, PSI, MLX's device info) to numbers. Unit-tested on recorded outputs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mlxd.memory.sizes import GIB, KIB, MIB
from mlxd.memory.snapshot import MemorySnapshot, OsPressure

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB
# pages); anything this large is not a real limit.
_CGROUP_V1_UNLIMITED = 1 << 62


class MemoryProbeError(RuntimeError):
    """A memory probe produced text that cannot be understood (or could not run at all)."""


# --------------------------------------------------------------------------- macOS parsers


@dataclass(frozen=True)
class VmStat:
    """``vm_stat`` counters, in pages (``page_size`` bytes each)."""

    page_size: int
    free: int
    active: int
    inactive: int
    speculative: int
    wired: int
    compressed: int  # "Pages occupied by compressor": RAM the compressor holds
    purgeable: int
    swapins: int
    swapouts: int

    @property
    def available_bytes(self) -> int:
        # Free and speculative pages are free; inactive pages are reclaimable without
        # swapping (file cache is dropped, clean anonymous pages compressed). Purgeable
        # pages already sit on the active/inactive queues, so adding them would count
        # them twice.
        return (self.free + self.speculative + self.inactive) * self.page_size


_VM_STAT_HEADER_RE = re.compile(r"page size of (\d+) bytes")
_VM_STAT_LINE_RE = re.compile(r'^"?(?P<label>[^":]+)"?:\s+(?P<value>\d+)\.?\s*$')
_VM_STAT_FIELDS = {
    "Pages free": "free",
    "Pages active": "active",
    "Pages inactive": "inactive",
    "Pages speculative": "speculative",
    "Pages wired down": "wired",
    "Pages occupied by compressor": "compressed",
    "Pages purgeable": "purgeable",
    "Swapins": "swapins",
    "Swapouts": "swapouts",
}


def parse_vm_stat(text: str) -> VmStat:
    header = _VM_STAT_HEADER_RE.search(text)
    if header is None:
        raise MemoryProbeError("vm_stat output has no 'page size of N bytes' header")
    values: dict[str, int] = {}
    for line in text.splitlines():
        match = _VM_STAT_LINE_RE.match(line.strip())
        if match and match.group("label") in _VM_STAT_FIELDS:
            values[_VM_STAT_FIELDS[match.group("label")]] = int(match.group("value"))
    missing = sorted(set(_VM_STAT_FIELDS.values()) - values.keys())
    if missing:
        raise MemoryProbeError(f"vm_stat output lacks {', '.join(missing)}")
    return VmStat(page_size=int(header.group(1)), **values)


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl name1 name2 …`` output (``name: value`` lines) as a dict of raw values."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            values[name.strip()] = value.strip()
    return values


_SWAP_FIELD_RE = re.compile(r"(total|used|free)\s*=\s*([\d.]+)([KMGT]?)")
_SWAP_UNITS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1024**4}


def parse_swapusage(text: str) -> tuple[int, int]:
    """``vm.swapusage`` (``total = 2048.00M  used = 1234.50M  free = …``) → (total, used)."""
    fields = {
        name: int(float(amount) * _SWAP_UNITS[unit])
        for name, amount, unit in _SWAP_FIELD_RE.findall(text)
    }
    if "total" not in fields or "used" not in fields:
        raise MemoryProbeError(f"cannot read vm.swapusage from {text!r}")
    return fields["total"], fields["used"]


def macos_snapshot(
    sysctl_text: str, vm_stat_text: str, device_info: Mapping[str, object] | None = None
) -> MemorySnapshot:
    """Build a snapshot from ``sysctl hw.memsize vm.swapusage kern.memorystatus_vm_pressure_level``
    and ``vm_stat`` output (and, when MLX's Metal backend is there, its device info)."""
    values = parse_sysctl(sysctl_text)
    if "hw.memsize" not in values:
        raise MemoryProbeError("sysctl output lacks hw.memsize")
    total = int(values["hw.memsize"])
    swap_total, swap_used = parse_swapusage(values.get("vm.swapusage", ""))
    level = values.get("kern.memorystatus_vm_pressure_level")
    vm = parse_vm_stat(vm_stat_text)
    device = parse_device_info(device_info or {})
    return MemorySnapshot(
        platform="macos",
        source="sysctl+vm_stat" + ("+mlx" if device_info else ""),
        total=total,
        available=min(total, vm.available_bytes),
        physical_total=total,
        swap_total=swap_total,
        swap_used=swap_used,
        swapouts=vm.swapouts,
        os_pressure=OsPressure(macos_level=int(level) if level else None),
        device_working_set=device.recommended_working_set,
    )


# --------------------------------------------------------------------------- MLX device


@dataclass(frozen=True)
class DeviceMemory:
    """What ``mx.device_info()`` says about memory (keys differ per backend)."""

    name: str | None = None
    total: int | None = None  # Metal "memory_size" (= RAM), CUDA "total_memory"
    free: int | None = None  # CUDA "free_memory" (NVML: device-wide); Metal has none
    recommended_working_set: int | None = None  # Metal "max_recommended_working_set_size"


def parse_device_info(info: Mapping[str, object]) -> DeviceMemory:
    def number(key: str) -> int | None:
        value = info.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    name = info.get("device_name")
    return DeviceMemory(
        name=str(name) if name is not None else None,
        total=number("total_memory") or number("memory_size"),
        free=number("free_memory"),
        recommended_working_set=number("max_recommended_working_set_size"),
    )


# --------------------------------------------------------------------------- Linux parsers


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` → bytes per key (the ``kB`` there are KiB); unit-less keys as is."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and parts and parts[0].isdigit():
            values[name.strip()] = int(parts[0]) * (KIB if parts[1:] == ["kB"] else 1)
    for key in ("MemTotal", "MemAvailable"):
        if key not in values:
            raise MemoryProbeError(f"/proc/meminfo lacks {key}")
    return values


def parse_key_values(text: str) -> dict[str, int]:
    """``name value`` lines (``/proc/vmstat``, cgroup ``memory.stat``) → dict of ints."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


@dataclass(frozen=True)
class Psi:
    some_avg10: float
    full_avg10: float | None  # absent on old kernels' CPU files; present for memory


def parse_psi(text: str) -> Psi:
    """``/proc/pressure/memory`` (``some avg10=0.00 avg60=… total=…`` / ``full …``)."""
    lines: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        lines[kind] = dict(item.split("=", 1) for item in rest.split() if "=" in item)
    if "avg10" not in lines.get("some", {}):
        raise MemoryProbeError(f"cannot read PSI from {text!r}")
    full = lines.get("full", {}).get("avg10")
    return Psi(
        some_avg10=float(lines["some"]["avg10"]),
        full_avg10=float(full) if full is not None else None,
    )


def parse_cgroup_limit(text: str) -> int | None:
    """A cgroup limit file (v2 ``memory.max``: ``max`` or bytes; v1 ``limit_in_bytes``)."""
    value = text.strip()
    if value == "max":
        return None
    if not value.isdigit():
        raise MemoryProbeError(f"cannot read cgroup limit {value!r}")
    limit = int(value)
    return None if limit >= _CGROUP_V1_UNLIMITED else limit


@dataclass(frozen=True)
class CgroupPaths:
    """Where this process sits: the v2 path (``0::/…``) and the v1 memory controller path."""

    unified: str | None
    memory_v1: str | None


def parse_proc_cgroup(text: str) -> CgroupPaths:
    unified = memory_v1 = None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "memory" in controllers.split(","):
            memory_v1 = path
    return CgroupPaths(unified=unified, memory_v1=memory_v1)


@dataclass(frozen=True)
class CgroupMemory:
    version: int
    path: str
    limit: int | None  # effective: the smallest limit on the way to the root
    current: int
    swap_current: int | None
    inactive_file: int  # page cache the kernel drops before it swaps

    @property
    def available(self) -> int | None:
        if self.limit is None:
            return None
        return max(0, self.limit - self.current + self.inactive_file)
