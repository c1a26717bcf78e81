"""Probes: read the files or run the commands and hand the text to a parser.

``take_snapshot()`` picks them by platform and returns one `MemorySnapshot`. On Linux a
snapshot reads a handful of small files (no process is spawned); on macOS it runs ``sysctl``
(one process for three keys) and ``vm_stat``.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from mlxd.memory.parse import (
    CgroupMemory,
    DeviceMemory,
    MemoryProbeError,
    macos_snapshot,
    parse_cgroup_limit,
    parse_device_info,
    parse_key_values,
    parse_meminfo,
    parse_proc_cgroup,
    parse_psi,
)
from mlxd.memory.snapshot import MemorySnapshot, MlxMemory, OsPressure


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
