"""Which MLX backend this process runs on, and the BLAS it computes with.

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS, which is slow.
When the system has OpenBLAS we load it with ``RTLD_GLOBAL`` before MLX is
imported, so MLX's ``sgemm`` calls resolve to OpenBLAS instead (measured on a
2-core x86_64 machine: about 2x decode and 10x prefill). ``MLXD_BLAS=off``
disables this; ``MLXD_BLAS=/path/libopenblas.so.0`` picks a specific library.

This module must not import mlx at module level.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_blas_loaded: str | None = None
_blas_handle: ctypes.CDLL | None = None


def find_openblas() -> str | None:
    """The first OpenBLAS shared library found on this system, if any."""
    wanted = os.environ.get("MLXD_BLAS", "").strip()
    if wanted and wanted.lower() not in {"on", "auto", "1", "off", "0", "none"}:
        return wanted if Path(wanted).exists() else None
    for candidate in OPENBLAS_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return None


def preload_blas() -> str | None:
    """Load OpenBLAS globally before MLX, on Linux only. Returns the path loaded."""
    global _blas_loaded, _blas_handle
    if _blas_loaded is not None:
        return _blas_loaded
    if sys.platform != "linux":
        return None
    if os.environ.get("MLXD_BLAS", "").strip().lower() in {"off", "0", "none"}:
        return None
    if "mlx.core" in sys.modules:
        # Too late: MLX already bound its BLAS symbols.
        return None
    path = find_openblas()
    if path is None:
        return None
    try:
        _blas_handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    _blas_loaded = path
    return path


def blas_in_use() -> str | None:
    """The optimized BLAS library loaded into this process, or None (reference BLAS)."""
    return _blas_loaded


@dataclass(frozen=True)
class BackendInfo:
    """What the banner and ``mlxd doctor`` say about the compute backend."""

    name: str  # "metal", "cuda" or "cpu"
    device: str
    platform: str
    machine: str
    blas: str | None
    mlx_version: str

    def describe(self) -> str:
        text = f"{self.name} (mlx {self.mlx_version}, {self.platform} {self.machine})"
        if self.name == "cpu" and sys.platform == "linux":
            blas = f"OpenBLAS {self.blas}" if self.blas else "reference (slow; install OpenBLAS)"
            text += f", BLAS: {blas}"
        return text


def backend_info() -> BackendInfo:
    """Inspect the active MLX backend (imports mlx)."""
    import mlx.core as mx

    device = mx.default_device()
    if device == mx.cpu:
        name = "cpu"
    elif sys.platform == "darwin":
        name = "metal"
    elif mx.cuda.is_available():
        name = "cuda"
    else:
        name = "gpu"
    return BackendInfo(
        name=name,
        device=str(device),
        platform=platform.system(),
        machine=platform.machine(),
        blas=blas_in_use(),
        mlx_version=str(getattr(mx, "__version__", "unknown")),
    )
