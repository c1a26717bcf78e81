"""The budget: the slice of the machine mlxd plans for, ``total × (1 − reserve)``.

The reserve is left to the OS and other applications, and what they use beyond it counts
against mlxd (`MemoryBudget.in_use`); `MemoryBudget.headroom` says what mlxd may allocate
right now; `mlx_memory_limit` is MLX's ceiling above the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlxd.memory.sizes import format_size
from mlxd.memory.snapshot import MemorySnapshot

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
