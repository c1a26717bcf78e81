"""The pressure monitor's reading: a snapshot against the budget as green / yellow / red."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mlxd.memory.budget import MemoryBudget
from mlxd.memory.sizes import format_size
from mlxd.memory.snapshot import MemorySnapshot


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
