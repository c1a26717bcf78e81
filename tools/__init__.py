"""Development tools: used by the tests and the GPU benchmarks, never installed with the server.

The server's package is ``server/mlxd`` (the only one ``pip install`` picks up); what lives here
runs from a checkout, e.g. ``python -m tools.random_model --shape 8B --bits 4 --out DIR``.
"""
