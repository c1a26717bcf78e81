"""What a request will cost in memory, worked out from a model's files before it is loaded.

Nothing here loads a tensor: `files` (safetensors headers, ``config.json``, the weight
bytes), `architecture` (what the estimate needs from the config), `kv` (the KV cache as
mlx-lm allocates it), `working` (the working memory of prefill and decode) and `request`
(one request's peak, simulated phase by phase). What loads a model to measure the truth is
:mod:`mlxd.bench.measure`.
"""
