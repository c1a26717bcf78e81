"""mlxd: an OpenAI-compatible local inference server on Apple MLX.

Importing the package preloads an optimized BLAS on Linux CPU builds of MLX
(see :mod:`server.backend`). That has to happen before the first ``import mlx``
anywhere in the process, which is why it lives here rather than in the CLI.
"""

import os

from mlxd.backend import preload_blas

# mlxd uses transformers only for tokenizers; its "PyTorch was not found" advice would be printed
# on every start and means nothing here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

preload_blas()
