"""What a benchmark run records about itself: the machine, the versions, the model's shape.

``meta.json`` and the head of ``results.md`` are built from these, and the default results
directory is named after the machine and the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from mlxd.backend import blas_in_use
from mlxd.bench.runner import Plan
from mlxd.bench.targets import BenchError
from mlxd.estimate.files import read_config


def model_summary(
    config: Mapping[str, Any], weights_bytes: int, name: str, dtype: str | None = None
) -> dict[str, Any]:
    """The shape facts of a model config that explain its speed and memory."""
    text = config.get("text_config") or {}
    cfg = {**config, **text}
    quant = cfg.get("quantization") or cfg.get("quantization_config")
    if isinstance(quant, Mapping) and quant.get("bits"):
        quantization = f"{quant['bits']}-bit (group {quant.get('group_size', '?')})"
    else:
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or dtype or "dtype unknown"
        quantization = f"none ({dtype})"
    return {
        "name": name,
        "type": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers"),
        "hidden": cfg.get("hidden_size"),
        "heads": cfg.get("num_attention_heads"),
        "kv_heads": cfg.get("num_key_value_heads"),
        "vocab": cfg.get("vocab_size"),
        "context": cfg.get("max_position_embeddings"),
        "quantization": quantization,
        "weights_bytes": weights_bytes,
        "weights_gib": round(weights_bytes / 2**30, 3),
    }


def read_model_summary(model_dir: Path) -> dict[str, Any]:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise BenchError(f"{model_dir} is not an mlx-lm model directory (no config.json)")
    config = read_config(model_dir)
    shards = sorted(model_dir.glob("*.safetensors"))
    weights = sum(f.stat().st_size for f in shards)
    dtype = weights_dtype(shards[0]) if shards else None
    return model_summary(config, weights, model_dir.resolve().name, dtype)


def weights_dtype(shard: Path) -> str | None:
    """The most common floating-point dtype in a safetensors shard, from its header alone."""
    try:
        with shard.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
    except (OSError, ValueError):
        return None
    counts: dict[str, int] = {}
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) and name != "__metadata__" else None
        if dtype in {"F16", "BF16", "F32"}:
            counts[dtype] = counts.get(dtype, 0) + 1
    if not counts:
        return None
    best = max(counts, key=lambda d: counts[d])
    return {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[best]


def _run(argv: Sequence[str]) -> str | None:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    if sys.platform == "darwin" and (brand := _run(["sysctl", "-n", "machdep.cpu.brand_string"])):
        return brand
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    if not out:
        return None
    names = out.splitlines()
    return names[0] if len(names) == 1 else f"{len(names)}x {names[0]}"


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_name(),
    }


def versions() -> dict[str, str | None]:
    import mlxd

    out: dict[str, str | None] = {"python": platform.python_version(), "mlxd": mlxd.__version__}
    for dist in ("mlx", "mlx-lm", "mlx-metal", "mlx-cuda", "transformers", "httpx"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def slug(text: str) -> str:
    text = re.sub(r"\((R|TM)\)|@.*$", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_out(machine: Mapping[str, Any], model_name: str, quick: bool) -> Path:
    day = datetime.now().strftime("%Y-%m-%d")
    name = f"{day}-{slug(machine.get('gpu') or machine['cpu'])}-{slug(model_name)}"
    return Path("bench/results") / (name + ("-quick" if quick else ""))


def collect_meta(args: argparse.Namespace, plan: Plan, argv: Sequence[str]) -> dict[str, Any]:
    from mlxd.backend import backend_info

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "backend": backend_info().describe(),
        "spawned_servers_preload": blas_in_use(),
        "versions": versions(),
        "model": read_model_summary(args.model_dir),
        "plan": dataclasses.asdict(plan),
        "command": "python -m mlxd.bench " + shlex.join(argv),
    }
