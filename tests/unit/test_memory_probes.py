"""Memory probes on recorded outputs (macOS sysctl/vm_stat/Metal, Linux /proc + cgroups +
PSI, CUDA device info), the budget, and the pressure levels."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from mlxd.memory.budget import MemoryBudget, compute_budget, mlx_memory_limit
from mlxd.memory.parse import (
    MemoryProbeError,
    macos_snapshot,
    parse_cgroup_limit,
    parse_device_info,
    parse_meminfo,
    parse_proc_cgroup,
    parse_psi,
    parse_swapusage,
    parse_vm_stat,
)
from mlxd.memory.pressure import PressureLevel, PressureThresholds, assess_pressure
from mlxd.memory.probe import (
    MACOS_SYSCTL_COMMAND,
    MACOS_VM_STAT_COMMAND,
    linux_snapshot,
    run_command,
    take_linux_snapshot,
    take_macos_snapshot,
    take_snapshot,
)
from mlxd.memory.sizes import GIB, KIB, MIB, InvalidSizeError, format_size, parse_size
from mlxd.memory.snapshot import MemorySnapshot, MlxMemory, OsPressure

FIXTURES = Path(__file__).parents[1] / "fixtures" / "memory"


def recorded(name: str, file: str) -> str:
    return (FIXTURES / name / file).read_text()


def device_info(name: str) -> dict[str, object]:
    path = FIXTURES / name / "device_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("6GB", 6 * GIB, id="GB-is-binary"),
        pytest.param("6G", 6 * GIB, id="G"),
        pytest.param("6GiB", 6 * GIB, id="GiB"),
        pytest.param("6gib", 6 * GIB, id="lowercase"),
        pytest.param("512MB", 512 * MIB, id="MB"),
        pytest.param("512m", 512 * MIB, id="m"),
        pytest.param("1.5 GB", 3 * GIB // 2, id="fraction-and-space"),
        pytest.param(" 2TB ", 2 * 1024**4, id="TB-padded"),
        pytest.param("64k", 64 * KIB, id="k"),
        pytest.param("4096", 4096, id="raw-bytes"),
        pytest.param("10b", 10, id="b"),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("GB", id="no-number"),
        pytest.param("6XB", id="unknown-unit"),
        pytest.param("-1GB", id="negative"),
        pytest.param("1e9", id="exponent"),
        pytest.param("6 G B", id="split-unit"),
    ],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidSizeError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        pytest.param(512, "512 B", id="bytes"),
        pytest.param(3 * MIB // 2, "1.50 MiB", id="mib"),
        pytest.param(6 * GIB, "6.00 GiB", id="gib"),
        pytest.param(-2 * GIB, "-2.00 GiB", id="negative"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


# --------------------------------------------------------------------------- macOS


def test_parse_vm_stat_reads_pages_and_page_size() -> None:
    vm = parse_vm_stat(recorded("macos_m1_16gb_normal", "vm_stat.txt"))
    assert (vm.page_size, vm.free, vm.inactive, vm.speculative) == (16384, 41233, 289870, 18204)
    assert (vm.wired, vm.compressed, vm.swapouts) == (151377, 61822, 31877)
    # Free + speculative + inactive pages can be had without swapping.
    assert vm.available_bytes == (41233 + 18204 + 289870) * 16384


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("Pages free: 12.\n", "page size", id="no-header"),
        pytest.param(
            "Mach Virtual Memory Statistics: (page size of 4096 bytes)\nPages free: 12.\n",
            "lacks",
            id="missing-counters",
        ),
    ],
)
def test_parse_vm_stat_rejects(text: str, message: str) -> None:
    with pytest.raises(MemoryProbeError, match=message):
        parse_vm_stat(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "total = 2048.00M  used = 1234.50M  free = 813.50M  (encrypted)",
            (2048 * MIB, int(1234.5 * MIB)),
            id="megabytes",
        ),
        pytest.param(
            "total = 10.00G  used = 9.50G  free = 0.50G  (encrypted)",
            (10 * GIB, int(9.5 * GIB)),
            id="gigabytes",
        ),
        pytest.param("total = 0.00M  used = 0.00M  free = 0.00M", (0, 0), id="no-swap"),
    ],
)
def test_parse_swapusage(text: str, expected: tuple[int, int]) -> None:
    assert parse_swapusage(text) == expected


def test_parse_swapusage_rejects_garbage() -> None:
    with pytest.raises(MemoryProbeError, match=r"vm\.swapusage"):
        parse_swapusage("unknown oid")


@pytest.mark.parametrize(
    ("name", "total", "available", "swap", "level", "working_set", "page_size"),
    [
        pytest.param(
            "macos_m1_16gb_normal",
            16 * GIB,
            (41233 + 18204 + 289870) * 16384,
            (1024 * MIB, int(245.5 * MIB)),
            1,
            11453251584,
            16384,
            id="m1-16gb-normal",
        ),
        pytest.param(
            "macos_m2_24gb_warn",
            24 * GIB,
            (5321 + 2204 + 301288) * 16384,
            (4096 * MIB, int(3120.75 * MIB)),
            2,
            None,
            16384,
            id="m2-24gb-warn-no-metal",
        ),
        pytest.param(
            "macos_m3max_36gb_critical",
            36 * GIB,
            (3933 + 2542 + 216380) * 16384,
            (10240 * MIB, int(9812.25 * MIB)),
            4,
            28991029248,
            16384,
            id="m3max-36gb-critical",
        ),
        pytest.param(
            "macos_intel_8gb_old",
            8 * GIB,
            (30114 + 40112 + 700441) * 4096,
            (2048 * MIB, 1536 * MIB),
            None,
            None,
            4096,
            id="intel-no-pressure-key",
        ),
    ],
)
def test_macos_snapshot(
    name: str,
    total: int,
    available: int,
    swap: tuple[int, int],
    level: int | None,
    working_set: int | None,
    page_size: int,
) -> None:
    snap = macos_snapshot(
        recorded(name, "sysctl.txt"), recorded(name, "vm_stat.txt"), device_info(name)
    )
    assert snap.platform == "macos"
    assert (snap.total, snap.physical_total, snap.available) == (total, total, available)
    assert (snap.swap_total, snap.swap_used) == swap
    assert snap.os_pressure.macos_level == level
    assert snap.device_working_set == working_set
    assert snap.used == total - available
    assert snap.source.endswith("+mlx") == (working_set is not None)
    assert parse_vm_stat(recorded(name, "vm_stat.txt")).page_size == page_size


def test_macos_snapshot_needs_memsize() -> None:
    with pytest.raises(MemoryProbeError, match=r"hw\.memsize"):
        macos_snapshot("vm.swapusage: total = 0.00M used = 0.00M free = 0.00M\n", "")


def test_take_macos_snapshot_runs_the_probe_commands() -> None:
    asked: list[tuple[str, ...]] = []
    outputs = {
        MACOS_SYSCTL_COMMAND: recorded("macos_m1_16gb_normal", "sysctl.txt"),
        MACOS_VM_STAT_COMMAND: recorded("macos_m1_16gb_normal", "vm_stat.txt"),
    }

    def run(argv: Sequence[str]) -> str:
        asked.append(tuple(argv))
        return outputs[tuple(argv)]

    snap = take_macos_snapshot(run, lambda: device_info("macos_m1_16gb_normal"))
    assert asked == [MACOS_SYSCTL_COMMAND, MACOS_VM_STAT_COMMAND]
    assert snap.total == 16 * GIB
    assert snap.device_working_set == 11453251584


# --------------------------------------------------------------------------- MLX devices


@pytest.mark.parametrize(
    ("info", "total", "free", "working_set"),
    [
        pytest.param(device_info("macos_m1_16gb_normal"), 16 * GIB, None, 11453251584, id="metal"),
        pytest.param(
            device_info("linux_cuda_h100"), 85_520_809_984, 84_416_020_480, None, id="cuda"
        ),
        pytest.param(
            {"architecture": "x86_64", "device_name": "AMD EPYC"}, None, None, None, id="cpu"
        ),
    ],
)
def test_parse_device_info(
    info: dict[str, object], total: int | None, free: int | None, working_set: int | None
) -> None:
    device = parse_device_info(info)
    assert (device.total, device.free, device.recommended_working_set) == (
        total,
        free,
        working_set,
    )


# --------------------------------------------------------------------------- Linux parsers


def test_parse_meminfo_converts_kib() -> None:
    values = parse_meminfo(recorded("linux_v1_this_machine", "proc/meminfo"))
    assert values["MemTotal"] == 24684084 * KIB
    assert values["MemAvailable"] == 24104776 * KIB
    assert values["HugePages_Total"] == 0  # unit-less keys stay counts


def test_parse_meminfo_needs_memavailable() -> None:
    with pytest.raises(MemoryProbeError, match="MemAvailable"):
        parse_meminfo("MemTotal: 1024 kB\n")


@pytest.mark.parametrize(
    ("text", "some", "full"),
    [
        pytest.param(
            "some avg10=12.50 avg60=3.10 avg300=0.80 total=1\n"
            "full avg10=1.20 avg60=0.30 avg300=0.05 total=2\n",
            12.5,
            1.2,
            id="some-and-full",
        ),
        pytest.param("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", 0.0, None, id="no-full"),
    ],
)
def test_parse_psi(text: str, some: float, full: float | None) -> None:
    psi = parse_psi(text)
    assert (psi.some_avg10, psi.full_avg10) == (some, full)


def test_parse_psi_rejects_garbage() -> None:
    with pytest.raises(MemoryProbeError, match="PSI"):
        parse_psi("nothing here")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("max\n", None, id="v2-max"),
        pytest.param("8589934592\n", 8 * GIB, id="v2-bytes"),
        pytest.param("9223372036854771712\n", None, id="v1-unlimited"),
    ],
)
def test_parse_cgroup_limit(text: str, expected: int | None) -> None:
    assert parse_cgroup_limit(text) == expected


def test_parse_cgroup_limit_rejects_garbage() -> None:
    with pytest.raises(MemoryProbeError):
        parse_cgroup_limit("lots")


@pytest.mark.parametrize(
    ("text", "unified", "memory_v1"),
    [
        pytest.param("0::/\n", "/", None, id="v2-namespaced"),
        pytest.param(
            recorded("linux_v1_this_machine", "proc/self/cgroup"),
            "/",
            "/process_api/367d2aa83df7b4bd6e9cbfd3567c4937",
            id="hybrid-this-machine",
        ),
        pytest.param(
            "11:memory:/docker/9a8b7c\n10:cpu,cpuacct:/docker/9a8b7c\n",
            None,
            "/docker/9a8b7c",
            id="v1-only",
        ),
    ],
)
def test_parse_proc_cgroup(text: str, unified: str | None, memory_v1: str | None) -> None:
    paths = parse_proc_cgroup(text)
    assert (paths.unified, paths.memory_v1) == (unified, memory_v1)


# --------------------------------------------------------------------------- Linux snapshots

LINUX_CASES = [
    pytest.param(
        "linux_v1_this_machine",
        "linux",
        24684084 * KIB,  # no limit: RAM
        24104776 * KIB,  # MemAvailable
        None,
        (0.0, 0.0),
        (0, 0),
        "/proc/meminfo+cgroup v1+psi",
        id="v1-hybrid-this-machine",
    ),
    pytest.param(
        "linux_v2_container",
        "linux",
        8 * GIB,  # the container's memory.max, not the host's 62.7 GiB
        8 * GIB - 3 * GIB + 536_870_912,  # limit − current + inactive file pages
        8 * GIB,
        (12.5, 1.2),
        (8388604 * KIB, 0),
        "/proc/meminfo+cgroup v2+psi",
        id="v2-container-limit",
    ),
    pytest.param(
        "linux_v2_nested_slice",
        "linux",
        12 * GIB,  # the limit sits on an ancestor slice; the leaf says "max"
        12 * GIB - 1 * GIB + 134_217_728,
        12 * GIB,
        (None, None),  # kernel without PSI: the file is absent
        (2097148 * KIB, (2097148 - 1048576) * KIB),
        "/proc/meminfo+cgroup v2",
        id="v2-ancestor-limit-no-psi",
    ),
    pytest.param(
        "linux_v2_docker_hostns",
        "linux",
        4 * GIB,  # /proc names a host path; the own cgroup is mounted at the root
        4 * GIB - 512 * MIB + 52_428_800,
        4 * GIB,
        (0.0, 0.0),
        (0, 0),
        "/proc/meminfo+cgroup v2+psi",
        id="v2-docker-without-namespace",
    ),
    pytest.param(
        "linux_v2_unlimited",
        "linux",
        32768000 * KIB,  # "max" all the way up: RAM
        10485760 * KIB,
        None,
        (45.0, 15.25),
        (8388604 * KIB, (8388604 - 5242876) * KIB),
        "/proc/meminfo+cgroup v2+psi",
        id="v2-unlimited-swapping",
    ),
    pytest.param(
        "linux_v1_limited",
        "linux",
        6 * GIB,  # hierarchical_memory_limit
        6 * GIB - 2 * GIB + 268_435_456,
        6 * GIB,
        (None, None),
        (0, 0),
        "/proc/meminfo+cgroup v1",
        id="v1-docker-limit",
    ),
    pytest.param(
        "linux_cuda_h100",
        "cuda",
        85_520_809_984,  # the GPU's memory is the pool
        84_416_020_480,  # NVML's device-wide free memory
        None,
        (0.0, 0.0),
        (0, 0),
        "mlx cuda device+/proc/meminfo+cgroup v2+psi",
        id="cuda-device",
    ),
]


@pytest.mark.parametrize(
    ("name", "platform", "total", "available", "limit", "psi", "swap", "source"), LINUX_CASES
)
def test_linux_snapshot(
    name: str,
    platform: str,
    total: int,
    available: int,
    limit: int | None,
    psi: tuple[float | None, float | None],
    swap: tuple[int, int],
    source: str,
) -> None:
    snap = take_linux_snapshot(FIXTURES / name, lambda: device_info(name))
    assert snap.platform == platform
    assert (snap.total, snap.available, snap.cgroup_limit) == (total, available, limit)
    assert (snap.os_pressure.psi_some_avg10, snap.os_pressure.psi_full_avg10) == psi
    assert (snap.swap_total, snap.swap_used) == swap
    assert snap.source == source
    assert snap.total <= snap.physical_total


def test_linux_snapshot_keeps_physical_ram_under_a_limit() -> None:
    snap = linux_snapshot(FIXTURES / "linux_v1_limited")
    assert snap.cgroup_limit == 6 * GIB
    assert snap.physical_total == 16303992 * KIB


def test_linux_snapshot_without_meminfo_fails(tmp_path: Path) -> None:
    with pytest.raises(MemoryProbeError, match="MemTotal"):
        linux_snapshot(tmp_path)


def test_take_snapshot_reads_this_machine() -> None:
    snap = take_snapshot()
    assert snap.platform in {"linux", "macos", "cuda"}
    assert 0 < snap.available <= snap.total <= snap.physical_total
    assert snap.swap_used <= snap.swap_total or snap.swap_total == 0
    assert 0 <= snap.used_by_others <= snap.used


def test_take_snapshot_counts_mlx_as_own() -> None:
    snap = take_snapshot(own=lambda: MlxMemory(active=GIB // 4, cache=GIB // 8))
    assert snap.mlx == MlxMemory(active=GIB // 4, cache=GIB // 8)
    assert snap.used_by_others == max(0, snap.used - GIB // 4 - GIB // 8)


def test_take_snapshot_unknown_platform() -> None:
    with pytest.raises(MemoryProbeError, match="Plan9"):
        take_snapshot(system="Plan9")


def test_run_command_keeps_output_of_a_failing_command() -> None:
    # sysctl exits 1 when one of several keys is unknown but prints the others.
    assert run_command(["sh", "-c", "echo hw.memsize: 1; exit 1"]) == "hw.memsize: 1\n"


def test_run_command_missing_program() -> None:
    with pytest.raises(MemoryProbeError, match="cannot run"):
        run_command(["/nonexistent/sysctl"])


# --------------------------------------------------------------------------- budget


def snapshot(
    total: int = 16 * GIB,
    available: int = 12 * GIB,
    mlx: MlxMemory | None = None,
    swap_used: int = 0,
    pressure: OsPressure | None = None,
) -> MemorySnapshot:
    return MemorySnapshot(
        platform="macos",
        source="test",
        total=total,
        available=available,
        physical_total=total,
        swap_total=4 * GIB,
        swap_used=swap_used,
        os_pressure=pressure or OsPressure(),
        mlx=mlx,
    )


@pytest.mark.parametrize(
    ("name", "reserve", "override", "limit", "basis"),
    [
        pytest.param(
            "macos_m1_16gb_normal", 0.22, None, 11453251584, "Metal recommended working set",
            id="m1-capped-by-working-set",
        ),
        pytest.param(
            "macos_m3max_36gb_critical", 0.22, None, 28991029248, "Metal recommended working set",
            id="m3max-capped-by-working-set",
        ),
        pytest.param(
            "macos_intel_8gb_old", 0.22, None, int(8 * GIB * 0.78), "8.00 GiB RAM × (1 − 0.22)",
            id="intel-ram-times-reserve",
        ),
        pytest.param(
            "macos_m1_16gb_normal", 0.5, None, 8 * GIB, "16.00 GiB RAM × (1 − 0.5)",
            id="reserve-below-working-set",
        ),
        pytest.param(
            "macos_m1_16gb_normal", 0.22, parse_size("6GB"), 6 * GIB, "--memory-budget 6.00 GiB",
            id="override",
        ),
    ],
)  # fmt: skip
def test_compute_budget_macos(
    name: str, reserve: float, override: int | None, limit: int, basis: str
) -> None:
    snap = macos_snapshot(
        recorded(name, "sysctl.txt"), recorded(name, "vm_stat.txt"), device_info(name)
    )
    budget = compute_budget(snap, reserve, override)
    assert budget.limit == limit
    assert budget.basis.startswith(basis)
    assert budget.total == snap.total


def test_compute_budget_in_a_container_uses_the_cgroup_limit() -> None:
    budget = compute_budget(linux_snapshot(FIXTURES / "linux_v2_container"))
    assert budget.limit == int(8 * GIB * 0.78)
    assert budget.basis == "8.00 GiB cgroup limit × (1 − 0.22)"


@pytest.mark.parametrize(
    ("reserve", "override"),
    [
        pytest.param(1.0, None, id="reserve-all"),
        pytest.param(-0.1, None, id="reserve-negative"),
        pytest.param(0.22, 0, id="override-zero"),
    ],
)
def test_compute_budget_rejects(reserve: float, override: int | None) -> None:
    with pytest.raises(ValueError):
        compute_budget(snapshot(), reserve, override)


# 16 GiB machine, 12 GiB budget: the other 4 GiB are the OS's and other programs' allowance.
BUDGET = MemoryBudget(limit=12 * GIB, total=16 * GIB, reserve=0.25, basis="test")


@pytest.mark.parametrize(
    ("snap", "in_use", "headroom"),
    [
        pytest.param(snapshot(available=13 * GIB), 0, 12 * GIB, id="idle-others-within-allowance"),
        pytest.param(
            snapshot(available=9 * GIB), 3 * GIB, 9 * GIB, id="others-3gib-over-allowance"
        ),
        pytest.param(
            snapshot(available=7 * GIB, mlx=MlxMemory(active=5 * GIB, cache=GIB)),
            6 * GIB,  # MLX 5 + 1 cached; others 3 GiB, within their 4
            7 * GIB,  # slice: 12 − 5 active; machine: 7 available + 1 reusable cache = 8
            id="mlx-resident-with-cache",
        ),
        pytest.param(
            snapshot(available=2 * GIB, mlx=MlxMemory(active=5 * GIB, cache=0)),
            10 * GIB,  # others hold 16 − 2 − 5 = 9 GiB: 5 beyond their allowance
            2 * GIB,
            id="others-squeezing",
        ),
        pytest.param(
            snapshot(available=GIB // 2, mlx=MlxMemory(active=12 * GIB, cache=0)),
            12 * GIB,
            0,  # free RAM is left, but it is the others' allowance
            id="full",
        ),
    ],
)
def test_budget_in_use_and_headroom(snap: MemorySnapshot, in_use: int, headroom: int) -> None:
    assert BUDGET.in_use(snap) == in_use
    assert BUDGET.headroom(snap) == headroom


# --------------------------------------------------------------------------- pressure


# Budget 12 GiB: 5 % = 614 MiB (spare, yellow), 2 % = 246 MiB (overshoot, swap yellow),
# 10 % = 1.2 GiB (swap red). ``counted`` is what admission counted for mlxd.
@pytest.mark.parametrize(
    ("snap", "counted", "level", "reason"),
    [
        pytest.param(snapshot(available=13 * GIB), None, PressureLevel.GREEN, None, id="idle"),
        pytest.param(
            # Admitted work near the budget, all of it counted: never pressure by itself.
            snapshot(available=3 * GIB, mlx=MlxMemory(active=11 * GIB, cache=GIB // 2)),
            11 * GIB + GIB // 2,
            PressureLevel.GREEN,
            None,
            id="own-counted-work-at-92pct-is-green",
        ),
        pytest.param(
            # 1 GiB free, but running requests counted on 1.5 GiB more than MLX holds yet.
            snapshot(available=GIB, mlx=MlxMemory(active=8 * GIB, cache=0)),
            8 * GIB + 3 * GIB // 2,
            PressureLevel.RED,
            "512.00 MiB short of what admitted requests need",
            id="red-others-took-what-was-promised",
        ),
        pytest.param(
            snapshot(available=GIB // 2, mlx=MlxMemory(active=8 * GIB, cache=0)),
            8 * GIB,
            PressureLevel.YELLOW,
            "only 512.00 MiB spare",
            id="yellow-little-spare",
        ),
        pytest.param(
            snapshot(available=3 * GIB, mlx=MlxMemory(active=9 * GIB, cache=0)),
            8 * GIB,
            PressureLevel.YELLOW,
            "MLX holds 1.00 GiB beyond the estimates",
            id="yellow-overshoot-of-estimates",
        ),
        pytest.param(
            snapshot(available=3 * GIB, mlx=MlxMemory(active=12 * GIB + 1, cache=0)),
            11 * GIB,
            PressureLevel.RED,
            "MLX holds 12.00 GiB, over the budget",
            id="red-overshoot-past-the-budget",
        ),
        pytest.param(
            snapshot(pressure=OsPressure(macos_level=2)),
            None,
            PressureLevel.YELLOW,
            "macOS memory pressure warn",
            id="macos-warn",
        ),
        pytest.param(
            snapshot(pressure=OsPressure(macos_level=4)),
            None,
            PressureLevel.RED,
            "macOS memory pressure critical",
            id="macos-critical",
        ),
        pytest.param(
            snapshot(pressure=OsPressure(psi_some_avg10=12.5, psi_full_avg10=1.2)),
            None,
            PressureLevel.YELLOW,
            "PSI some avg10 12.5%",
            id="psi-some-yellow",
        ),
        pytest.param(
            snapshot(pressure=OsPressure(psi_some_avg10=45.0, psi_full_avg10=2.0)),
            None,
            PressureLevel.RED,
            "PSI some avg10 45.0%",
            id="psi-some-red",
        ),
        pytest.param(
            snapshot(pressure=OsPressure(psi_some_avg10=45.0, psi_full_avg10=15.25)),
            None,
            PressureLevel.RED,
            "PSI full avg10 15.2%",
            id="psi-full-red",
        ),
        pytest.param(
            snapshot(swap_used=GIB + GIB // 2),
            None,
            PressureLevel.YELLOW,
            "swap grew 512.00 MiB",
            id="swap-grew-over-2pct",
        ),
        pytest.param(
            snapshot(swap_used=GIB + 2 * GIB),
            None,
            PressureLevel.RED,
            "swap grew 2.00 GiB",
            id="swap-grew-over-10pct",
        ),
        pytest.param(
            snapshot(swap_used=GIB + 200 * 1024**2),
            None,
            PressureLevel.GREEN,
            None,
            id="swap-grew-under-2pct",
        ),
    ],
)
def test_assess_pressure(
    snap: MemorySnapshot, counted: int | None, level: PressureLevel, reason: str | None
) -> None:
    reading = assess_pressure(snap, BUDGET, swap_baseline=GIB, counted=counted)
    assert reading.level is level
    if reason is None:
        assert reading.reasons == ()
    else:
        assert reason in reading.reasons
    assert reading.fraction == reading.in_use / BUDGET.limit


def test_assess_pressure_thresholds_are_configurable() -> None:
    snap = snapshot(available=GIB, mlx=MlxMemory(active=6 * GIB, cache=0))
    assert assess_pressure(snap, BUDGET, 0).level is PressureLevel.GREEN
    strict = PressureThresholds(spare_yellow=0.1)
    assert assess_pressure(snap, BUDGET, 0, strict).level is PressureLevel.YELLOW


def test_admission_keeps_the_spare_margin() -> None:
    # What admission lets in leaves at least the yellow margin spare, so its own requests
    # cannot turn the monitor yellow.
    snap = snapshot(available=4 * GIB, mlx=MlxMemory(active=6 * GIB, cache=0))
    margin = PressureThresholds().spare_yellow
    room = BUDGET.headroom(snap, margin)
    assert room == 4 * GIB - math.ceil(margin * BUDGET.limit)
    after = snapshot(available=4 * GIB, mlx=MlxMemory(active=6 * GIB, cache=0))
    reading = assess_pressure(after, BUDGET, 0, counted=6 * GIB + room)
    assert reading.level is PressureLevel.GREEN


@pytest.mark.parametrize(
    ("snap", "expected"),
    [
        # A 141 GiB GPU with a 9 GiB budget: the ceiling is 95 % of the device, far above.
        pytest.param(snapshot(total=141 * GIB, available=140 * GIB), int(140 * GIB * 0.95),
                     id="big-device-small-budget"),
        # Little free memory: never closer to the budget than 10 %.
        pytest.param(snapshot(available=5 * GIB), int(12 * GIB * 1.1), id="floor-above-budget"),
    ],
)  # fmt: skip
def test_mlx_limit_is_a_ceiling_above_the_budget(snap: MemorySnapshot, expected: int) -> None:
    budget = MemoryBudget(limit=12 * GIB, total=snap.total, reserve=0.25, basis="test")
    assert mlx_memory_limit(budget, snap) == expected
    assert mlx_memory_limit(budget, snap) > budget.limit


def test_recorded_linux_pressure_levels() -> None:
    # The fixtures' own PSI: a container stalling 12.5 % is yellow, a swapping host red.
    container = linux_snapshot(FIXTURES / "linux_v2_container")
    host = linux_snapshot(FIXTURES / "linux_v2_unlimited")
    assert assess_pressure(container, compute_budget(container), 0).level is PressureLevel.YELLOW
    assert assess_pressure(host, compute_budget(host), host.swap_used).level is PressureLevel.RED
