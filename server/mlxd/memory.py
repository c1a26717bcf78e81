"""How much memory the machine has, how much is free, and how hard the OS is squeezing.

Three layers, each usable on its own:

1. **Parsers** — pure functions from recorded text (``vm_stat``, ``sysctl``, ``/proc/meminfo``,
   cgroup files, PSI) to numbers. Unit-tested on recorded outputs.
2. **Probes** — thin functions that run the command or read the file and hand the text to a
   parser. ``take_snapshot()`` picks them by platform and returns one `MemorySnapshot`.
   On Linux a snapshot reads a handful of small files (no process is spawned); on macOS it
   runs ``sysctl`` (one process for three keys) and ``vm_stat``.
3. **Budget and pressure** — `compute_budget` turns a snapshot into the bytes mlxd may plan
   for; `MemoryBudget.headroom` says what it may allocate right now; `assess_pressure`
   maps a snapshot to green / yellow / red.

Definitions used throughout (bytes unless stated):

- ``total``: the pool a model lives in. Apple silicon: unified RAM. Linux CPU: RAM, lowered
  to the cgroup limit when a container has one (the container's limit is the real limit).
  CUDA: the device's memory.
- ``available``: of ``total``, what can be had now without swapping, by the OS's own
  estimate (macOS: free + speculative + inactive pages; Linux: MemAvailable, and inside a
  cgroup at most limit − (current − inactive file pages); CUDA: the device's free memory).
- ``used`` = total − available. System-wide on purpose: other applications' memory counts,
  because it is the machine, not mlxd, that swaps. mlxd's own share is what MLX has
  allocated (``MemorySnapshot.mlx``); ``used_by_others`` is the rest.
- the budget: ``total × (1 − reserve)`` for mlxd; the reserve is left to the OS and other
  applications, and what they use beyond it counts against mlxd (`MemoryBudget.in_use`).
"""

from __future__ import annotations

import math
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

KIB = 1024
MIB = 1024**2
GIB = 1024**3

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB
# pages); anything this large is not a real limit.
_CGROUP_V1_UNLIMITED = 1 << 62


class MemoryProbeError(RuntimeError):
    """A memory probe produced text that cannot be understood (or could not run at all)."""


class InvalidSizeError(ValueError):
    """A size string such as ``--memory-budget 6GB`` could not be parsed."""


# --------------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1} | {
    f"{letter}{tail}": 1024**power
    for power, letter in enumerate("kmgt", start=1)
    for tail in ("", "b", "ib")
}


def parse_size(text: str) -> int:
    """Parse a human size into bytes: ``6GB``, ``6G``, ``6GiB``, ``512MB``, ``1.5 gb``, ``4096``.

    Every unit is binary: ``GB``, ``G`` and ``GiB`` all mean 2³⁰ bytes. Memory is sold and
    reported that way (a "16 GB" Mac has 16 GiB; Activity Monitor and ``free -g`` count in
    GiB), so ``--memory-budget 12GB`` on a 16 GB machine means what its owner expects.
    Case-insensitive; a plain number is bytes.
    """
    match = _SIZE_RE.match(text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise InvalidSizeError(
            f"invalid size {text!r}: use bytes or a number with a unit such as 6GB, 6G, "
            "6GiB or 512MB (all binary: 1 GB = 1024 MB)"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """Render bytes for people, in binary units (``"5.59 GiB"``, ``"512.00 MiB"``)."""
    for unit, scale in (("TiB", 1024**4), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class OsPressure:
    """The operating system's own verdict, as raw as it comes.

    ``macos_level`` is ``kern.memorystatus_vm_pressure_level`` (1 normal, 2 warn,
    4 critical); ``psi_*`` are Linux pressure-stall percentages over the last 10 s
    (``some``: at least one task stalled on memory; ``full``: all non-idle tasks stalled).
    """

    macos_level: int | None = None
    psi_some_avg10: float | None = None
    psi_full_avg10: float | None = None


@dataclass(frozen=True)
class MlxMemory:
    """``mx.get_active_memory()`` and ``mx.get_cache_memory()`` (freed buffers MLX keeps
    for reuse: the OS counts them as used, but mlxd can allocate into them)."""

    active: int
    cache: int


@dataclass(frozen=True)
class MemorySnapshot:
    """One reading of the machine's memory; see the module docstring for the definitions."""

    platform: str  # "macos" | "linux" | "cuda"
    source: str  # which probes produced it, for /health and logs
    total: int
    available: int
    physical_total: int  # RAM or device memory before any cgroup limit
    swap_total: int
    swap_used: int
    swapouts: int | None = None  # pages swapped out since boot, where the OS says
    cgroup_limit: int | None = None
    os_pressure: OsPressure = field(default_factory=OsPressure)
    device_working_set: int | None = None  # Metal's recommendedMaxWorkingSetSize
    mlx: MlxMemory | None = None  # this process's MLX allocations, when MLX is loaded

    @property
    def used(self) -> int:
        return self.total - self.available

    @property
    def used_by_others(self) -> int:
        """What everything but MLX in this process holds: other apps, the OS, and this
        process's Python side. Unknown MLX usage counts as someone else's."""
        own = self.mlx.active + self.mlx.cache if self.mlx else 0
        return max(0, self.used - own)


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


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # absent, or PSI disabled (reads fail with EOPNOTSUPP)
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    return int(text) if text is not None and text.strip().isdigit() else None


def _cgroup_dir(base: Path, path: str) -> Path:
    # Without a cgroup namespace the path names the host hierarchy, which a container
    # does not see; its own cgroup is then mounted at the base itself.
    candidate = base / path.lstrip("/")
    return candidate if candidate.is_dir() else base


def read_cgroup(root: Path = Path("/")) -> CgroupMemory | None:
    """This process's cgroup memory accounting, v2 or v1; ``None`` outside any cgroup."""
    proc_text = _read(root / "proc/self/cgroup")
    if proc_text is None:
        return None
    paths = parse_proc_cgroup(proc_text)
    base = root / "sys/fs/cgroup"
    if paths.unified is not None and (base / "cgroup.controllers").exists():
        return _read_cgroup_v2(base, paths.unified)
    if paths.memory_v1 is not None and (base / "memory").is_dir():
        return _read_cgroup_v1(base / "memory", paths.memory_v1)
    return None


def _read_cgroup_v2(base: Path, path: str) -> CgroupMemory | None:
    leaf = _cgroup_dir(base, path)
    current = _read_int(leaf / "memory.current")
    if current is None:
        return None
    limits = []
    node = leaf
    while True:  # a limit on any ancestor binds this cgroup too
        text = _read(node / "memory.max")
        if text is not None and (limit := parse_cgroup_limit(text)) is not None:
            limits.append(limit)
        if node == base:
            break
        node = node.parent
    stat = parse_key_values(_read(leaf / "memory.stat") or "")
    return CgroupMemory(
        version=2,
        path=path,
        limit=min(limits) if limits else None,
        current=current,
        swap_current=_read_int(leaf / "memory.swap.current"),
        inactive_file=stat.get("inactive_file", 0),
    )


def _read_cgroup_v1(base: Path, path: str) -> CgroupMemory | None:
    leaf = _cgroup_dir(base, path)
    current = _read_int(leaf / "memory.usage_in_bytes")
    if current is None:
        return None
    stat = parse_key_values(_read(leaf / "memory.stat") or "")
    # hierarchical_memory_limit already is the smallest limit among the ancestors.
    if "hierarchical_memory_limit" in stat:
        limit_text: str | None = str(stat["hierarchical_memory_limit"])
    else:
        limit_text = _read(leaf / "memory.limit_in_bytes")
    memsw = _read_int(leaf / "memory.memsw.usage_in_bytes")
    return CgroupMemory(
        version=1,
        path=path,
        limit=parse_cgroup_limit(limit_text) if limit_text is not None else None,
        current=current,
        swap_current=max(0, memsw - current) if memsw is not None else None,
        inactive_file=stat.get("total_inactive_file", stat.get("inactive_file", 0)),
    )


def linux_snapshot(root: Path = Path("/"), device: DeviceMemory | None = None) -> MemorySnapshot:
    """Read ``/proc`` and ``/sys/fs/cgroup`` under ``root`` (tests point it at a recording).

    With a CUDA ``device`` (one that reports total and free memory) the pool is the device's
    memory; host swap and pressure are still reported, since host RAM thrashing hurts too.
    """
    meminfo = parse_meminfo(_read(root / "proc/meminfo") or "")
    vmstat = parse_key_values(_read(root / "proc/vmstat") or "")
    psi_text = _read(root / "proc/pressure/memory")
    psi = parse_psi(psi_text) if psi_text else None
    cgroup = read_cgroup(root)
    pressure = OsPressure(
        psi_some_avg10=psi.some_avg10 if psi else None,
        psi_full_avg10=psi.full_avg10 if psi else None,
    )
    swap_total = meminfo.get("SwapTotal", 0)
    swap_used = swap_total - meminfo.get("SwapFree", swap_total)
    cgroup_limit = cgroup.limit if cgroup else None
    sources = ["/proc/meminfo"]
    if cgroup is not None:
        sources.append(f"cgroup v{cgroup.version}")
    if psi is not None:
        sources.append("psi")

    if device is not None and device.total is not None and device.free is not None:
        return MemorySnapshot(
            platform="cuda",
            source="+".join(["mlx cuda device", *sources]),
            total=device.total,
            available=min(device.total, device.free),
            physical_total=device.total,
            swap_total=swap_total,
            swap_used=swap_used,
            swapouts=vmstat.get("pswpout"),
            cgroup_limit=cgroup_limit,
            os_pressure=pressure,
        )

    physical = meminfo["MemTotal"]
    total = min(physical, cgroup_limit) if cgroup_limit is not None else physical
    available = min(total, meminfo["MemAvailable"])
    if cgroup is not None and cgroup.available is not None:
        available = min(available, cgroup.available)
    return MemorySnapshot(
        platform="linux",
        source="+".join(sources),
        total=total,
        available=available,
        physical_total=physical,
        swap_total=swap_total,
        swap_used=swap_used,
        swapouts=vmstat.get("pswpout"),
        cgroup_limit=cgroup_limit,
        os_pressure=pressure,
    )


# --------------------------------------------------------------------------- probes

CommandRunner = Callable[[Sequence[str]], str]

MACOS_SYSCTL_COMMAND = (
    "sysctl",
    "hw.memsize",
    "vm.swapusage",
    "kern.memorystatus_vm_pressure_level",
)
MACOS_VM_STAT_COMMAND = ("vm_stat",)


def run_command(argv: Sequence[str]) -> str:
    """Run a probe command and return its stdout.

    A non-zero exit keeps whatever was printed: ``sysctl`` exits 1 when one of several keys
    is unknown but still prints the others, and the parsers report what is missing.
    """
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MemoryProbeError(f"cannot run {' '.join(argv)}: {exc}") from exc
    return done.stdout


def mlx_device_info() -> dict[str, object]:
    """``mx.device_info()`` for the GPU when MLX has one (Metal or CUDA), else ``{}``.

    On the CPU backend MLX reports only the CPU's name, which says nothing about memory.
    """
    import mlx.core as mx

    if not (mx.metal.is_available() or mx.cuda.is_available()):
        return {}
    return dict(mx.device_info(mx.gpu))


def mlx_memory() -> MlxMemory | None:
    """MLX's own allocations in this process; ``None`` while MLX is not imported (then it
    holds nothing, and importing it only to say so would cost a second)."""
    if "mlx.core" not in sys.modules:
        return None
    import mlx.core as mx

    return MlxMemory(active=int(mx.get_active_memory()), cache=int(mx.get_cache_memory()))


def take_macos_snapshot(
    run: CommandRunner = run_command,
    device_info: Callable[[], Mapping[str, object]] = mlx_device_info,
) -> MemorySnapshot:
    return macos_snapshot(run(MACOS_SYSCTL_COMMAND), run(MACOS_VM_STAT_COMMAND), device_info())


def take_linux_snapshot(
    root: Path = Path("/"),
    device_info: Callable[[], Mapping[str, object]] = mlx_device_info,
) -> MemorySnapshot:
    return linux_snapshot(root, parse_device_info(device_info()))


def take_snapshot(
    system: str | None = None,
    own: Callable[[], MlxMemory | None] = mlx_memory,
) -> MemorySnapshot:
    """The current machine's memory, by the probes its platform has, with MLX's share."""
    system = system or platform.system()
    if system == "Darwin":
        snapshot = take_macos_snapshot()
    elif system == "Linux":
        snapshot = take_linux_snapshot()
    else:
        raise MemoryProbeError(f"no memory probes for {system}")
    return replace(snapshot, mlx=own())


# --------------------------------------------------------------------------- budget

DEFAULT_RESERVE = 0.22


@dataclass(frozen=True)
class MemoryBudget:
    """The slice of the machine mlxd plans for.

    ``limit`` is what a model's weights plus its requests' estimates must fit in:
    ``total × (1 − reserve)``, lowered to Metal's recommended working set (beyond it the GPU
    pages), or the user's ``--memory-budget``. Everything else, ``total − limit``, is left
    to the OS and other applications; what they use beyond that eats into mlxd's slice.
    """

    limit: int
    total: int
    reserve: float
    basis: str  # one line for /health and error messages

    @property
    def others_allowance(self) -> int:
        return max(0, self.total - self.limit)

    def in_use(self, snapshot: MemorySnapshot) -> int:
        """mlxd's share of the slice in use now: MLX's allocations (its reusable cache
        included) plus whatever other programs take beyond their allowance."""
        own = snapshot.mlx.active + snapshot.mlx.cache if snapshot.mlx else 0
        return own + max(0, snapshot.used_by_others - self.others_allowance)

    def headroom(self, snapshot: MemorySnapshot, margin: float = 0.0) -> int:
        """Bytes mlxd can allocate now: room left in its slice, and no more than the OS can
        hand out without swapping (MLX's cached buffers count as free: MLX reuses them),
        less ``margin`` (a fraction of the limit) that admission keeps spare so that its own
        requests never make the pressure monitor act (see `PressureThresholds.spare_yellow`).
        """
        active = snapshot.mlx.active if snapshot.mlx else 0
        cache = snapshot.mlx.cache if snapshot.mlx else 0
        in_slice = self.limit - active - max(0, snapshot.used_by_others - self.others_allowance)
        machine = snapshot.available + cache - math.ceil(margin * self.limit)
        return max(0, min(in_slice, machine))


def compute_budget(
    snapshot: MemorySnapshot, reserve: float = DEFAULT_RESERVE, override: int | None = None
) -> MemoryBudget:
    """The budget for this machine: ``total × (1 − reserve)`` (``total`` is already the
    cgroup limit inside a container), capped by Metal's working set; ``override`` (bytes,
    from ``--memory-budget``, see `parse_size`) replaces it."""
    if not 0.0 <= reserve < 1.0:
        raise ValueError(f"memory reserve must be in [0, 1), got {reserve}")
    if override is not None:
        if override <= 0:
            raise ValueError(f"memory budget must be positive, got {override}")
        return MemoryBudget(
            override, snapshot.total, reserve, f"--memory-budget {format_size(override)}"
        )
    pool = "device memory" if snapshot.platform == "cuda" else "RAM"
    if snapshot.cgroup_limit is not None and snapshot.total < snapshot.physical_total:
        pool = "cgroup limit"
    limit = int(snapshot.total * (1.0 - reserve))
    basis = f"{format_size(snapshot.total)} {pool} × (1 − {reserve:g})"
    working_set = snapshot.device_working_set
    if working_set is not None and working_set < limit:
        limit = working_set
        basis = f"Metal recommended working set {format_size(working_set)}"
    return MemoryBudget(limit, snapshot.total, reserve, basis)


CEILING_SHARE = 0.95  # of what the machine can give this process: MLX's memory limit
CEILING_OVER_BUDGET = 1.10  # the MLX limit is never closer to the budget than this


def mlx_memory_limit(budget: MemoryBudget, snapshot: MemorySnapshot) -> int:
    """MLX's memory limit: a ceiling against runaway allocation, not the budget.

    When MLX's active memory is over its limit, every evaluation commits what it has
    encoded and waits for the GPU to finish a command buffer before it encodes more, and
    keeps waiting while it stays over (``eval_impl`` in mlx/transforms.cpp): the GPU runs in
    tiny serialized steps with a host round trip between them. A limit at the budget slowed
    every request whose real peak went past it (measured on an H200, where the estimate was
    low: a 2,872-token prefill took 55.8 s instead of 0.25 s). Admission keeps requests
    inside the budget; the limit sits above it, at 95 % of what the machine can give this
    process (free memory plus what MLX already holds), and never closer to the budget than
    10 %, so only allocation that nothing admitted is throttled, and the pressure monitor
    ends it.
    """
    own = snapshot.mlx.active + snapshot.mlx.cache if snapshot.mlx else 0
    machine = min(snapshot.total, snapshot.available + own)
    ceiling = max(int(budget.limit * CEILING_OVER_BUDGET), int(machine * CEILING_SHARE))
    return min(ceiling, max(snapshot.physical_total, budget.limit))


# --------------------------------------------------------------------------- pressure


class PressureLevel(str, Enum):
    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"


_LEVEL_ORDER = {PressureLevel.GREEN: 0, PressureLevel.YELLOW: 1, PressureLevel.RED: 2}
MACOS_PRESSURE_WARN = 2
MACOS_PRESSURE_CRITICAL = 4


@dataclass(frozen=True)
class PressureThresholds:
    """When the pressure monitor acts; fractions are of the budget (README's table).

    "spare" is what the machine can still give (free memory plus MLX's reusable cache) less
    what admitted requests counted on and have not allocated yet. mlxd's own requests cannot
    lower it: admission keeps ``spare_yellow`` of it free, and as a request allocates what it
    counted, free memory and what it still needs fall together.
    """

    spare_yellow: float = 0.05  # spare below this: stop admitting
    spare_red: float = 0.0  # spare below this: the machine cannot give what was promised
    overshoot_yellow: float = 0.02  # MLX holds this much more than admission counted
    swap_growth_yellow: float = 0.02  # new swap since the server started
    swap_growth_red: float = 0.10
    psi_some_yellow: float = 10.0  # % of the last 10 s some task stalled on memory
    psi_some_red: float = 40.0
    psi_full_red: float = 10.0  # % of the last 10 s all non-idle tasks stalled on memory


@dataclass(frozen=True)
class PressureReading:
    level: PressureLevel
    in_use: int  # MemoryBudget.in_use
    fraction: float  # in_use / budget.limit
    swap_growth: int
    reasons: tuple[str, ...]  # why the level is not green, one phrase per signal
    spare: int = 0  # see PressureThresholds
    overshoot: int = 0  # MLX active memory beyond what admission counted


def assess_pressure(
    snapshot: MemorySnapshot,
    budget: MemoryBudget,
    swap_baseline: int,
    thresholds: PressureThresholds | None = None,
    counted: int | None = None,
) -> PressureReading:
    """Green / yellow / red from what admission cannot see: other programs taking memory
    (spare), MLX holding more than the estimates counted (overshoot, red beyond the budget),
    the OS's own signal (macOS level, Linux PSI) and swap growth since ``swap_baseline``.

    ``counted`` is what admission counted for mlxd: resident weights, the reservations of
    running requests and the prefix cache (``None``: exactly what MLX holds now).
    """
    t = thresholds or PressureThresholds()
    limit = budget.limit
    signals: list[tuple[PressureLevel, str]] = []
    active = snapshot.mlx.active if snapshot.mlx else 0
    cache = snapshot.mlx.cache if snapshot.mlx else 0
    counted = active if counted is None else counted

    spare = snapshot.available + cache - max(0, counted - active)
    if spare < t.spare_red * limit:
        signals.append(
            (PressureLevel.RED, f"{format_size(-spare)} short of what admitted requests need")
        )
    elif spare < t.spare_yellow * limit:
        signals.append((PressureLevel.YELLOW, f"only {format_size(spare)} spare"))

    overshoot = max(0, active - counted)
    if active > limit:
        signals.append((PressureLevel.RED, f"MLX holds {format_size(active)}, over the budget"))
    elif overshoot > t.overshoot_yellow * limit:
        signals.append(
            (PressureLevel.YELLOW, f"MLX holds {format_size(overshoot)} beyond the estimates")
        )

    level = snapshot.os_pressure.macos_level
    if level is not None and level >= MACOS_PRESSURE_CRITICAL:
        signals.append((PressureLevel.RED, "macOS memory pressure critical"))
    elif level is not None and level >= MACOS_PRESSURE_WARN:
        signals.append((PressureLevel.YELLOW, "macOS memory pressure warn"))

    full = snapshot.os_pressure.psi_full_avg10
    some = snapshot.os_pressure.psi_some_avg10
    if full is not None and full >= t.psi_full_red:
        signals.append((PressureLevel.RED, f"PSI full avg10 {full:.1f}%"))
    elif some is not None and some >= t.psi_some_red:
        signals.append((PressureLevel.RED, f"PSI some avg10 {some:.1f}%"))
    elif some is not None and some >= t.psi_some_yellow:
        signals.append((PressureLevel.YELLOW, f"PSI some avg10 {some:.1f}%"))

    swap_growth = max(0, snapshot.swap_used - swap_baseline)
    if swap_growth > t.swap_growth_red * limit:
        signals.append((PressureLevel.RED, f"swap grew {format_size(swap_growth)}"))
    elif swap_growth > t.swap_growth_yellow * limit:
        signals.append((PressureLevel.YELLOW, f"swap grew {format_size(swap_growth)}"))

    worst = max(
        (lvl for lvl, _ in signals), key=_LEVEL_ORDER.__getitem__, default=PressureLevel.GREEN
    )
    in_use = budget.in_use(snapshot)
    return PressureReading(
        level=worst,
        in_use=in_use,
        fraction=in_use / limit,
        swap_growth=swap_growth,
        reasons=tuple(reason for _, reason in signals),
        spare=spare,
        overshoot=overshoot,
    )
