"""One reading of the machine's memory (`MemorySnapshot`), as the probes take it.

Definitions used throughout the package (bytes unless stated):

- ``total``: the pool a model lives in. Apple silicon: unified RAM. Linux CPU: RAM, lowered
  to the cgroup limit when a container has one (the container's limit is the real limit).
  CUDA: the device's memory.
- ``available``: of ``total``, what can be had now without swapping, by the OS's own
  estimate (macOS: free + speculative + inactive pages; Linux: MemAvailable, and inside a
  cgroup at most limit − (current − inactive file pages); CUDA: the device's free memory).
- ``used`` = total − available. System-wide on purpose: other applications' memory counts,
  because it is the machine, not mlxd, that swaps. mlxd's own share is what MLX has
  allocated (``MemorySnapshot.mlx``); ``used_by_others`` is the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
