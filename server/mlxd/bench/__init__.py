"""Benchmark OpenAI-compatible servers against the same model run in-process with mlx-lm.

``python -m mlxd.bench`` (``mlxd bench``) measures everything for one model directory; see
``bench/README.md`` for what each number means. The modules, in the order a run uses them:

* :mod:`mlxd.bench.cli`: the flags, the plan they ask for, and ``main``;
* :mod:`mlxd.bench.meta`: the machine, versions and model shape recorded with the results;
* :mod:`mlxd.bench.session`: one run, the baseline then each target, one at a time;
* :mod:`mlxd.bench.runner`: the scenarios and their prompts, run against one target;
* :mod:`mlxd.bench.targets`: in-process mlx-lm, a running server, a spawned server;
* :mod:`mlxd.bench.report`: statistics, ``results.md``, ``results.jsonl`` and the plot.

Two more scenarios have their own commands: :mod:`mlxd.bench.structured` (decode speed under a
``json_schema`` constraint) and :mod:`mlxd.bench.memory` (the memory estimate against the
measured peak).
"""
