# mlxd — two commands on a fresh machine:
#   make run    create the venv, install, prepare the default model, start the server
#   make test   the same set-up, then the test suite
# MLXD_BACKEND=cuda selects mlx[cuda13] on Linux; macOS always uses Metal (plain `mlx`).

PYTHON  ?= python3
VENV    ?= .venv
PORT    ?= 8080
HOST    ?= 127.0.0.1
PY      := $(VENV)/bin/python
MLXD    := $(VENV)/bin/mlxd
UNAME   := $(shell uname -s)

ifeq ($(UNAME),Darwin)
  BACKEND := metal
  EXTRAS  := dev
else ifeq ($(MLXD_BACKEND),cuda)
  BACKEND := cuda
  EXTRAS  := cuda,dev
else
  BACKEND := cpu
  EXTRAS  := cpu,dev
endif

STAMP := $(VENV)/.mlxd-installed-$(BACKEND)

.PHONY: run test bench lint install model openblas clean help

help:
	@echo "make run     start mlxd on http://$(HOST):$(PORT)/v1 (default model: smollm2)"
	@echo "make test    run the test suite (unit + end-to-end)"
	@echo "make bench   benchmark mlxd against in-process mlx-lm and mlx_lm.server"
	@echo "make lint    ruff + mypy"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

# MLX's Linux CPU wheel links a reference BLAS; OpenBLAS doubles decode speed and makes prefill
# ~10x faster. Installed when we can (root + apt), otherwise mlxd runs without it and says so.
openblas:
ifeq ($(UNAME),Linux)
	@if ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing OpenBLAS (libopenblas0-pthread)"; \
	    (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1)) || \
	    echo "OpenBLAS not installed; continuing with MLX's bundled BLAS (slower)"; \
	  else \
	    echo "tip: install OpenBLAS (e.g. apt-get install libopenblas0-pthread) for ~2x faster CPU decode"; \
	  fi; \
	fi
endif

model: install openblas
	$(MLXD) pull

run: install openblas
	$(MLXD) serve --host $(HOST) --port $(PORT)

test: install openblas
	$(MLXD) pull
	$(VENV)/bin/pytest -q

# Side by side on the default model: in-process mlx-lm, mlxd, mlxd without its prefix cache, and
# mlx_lm.server; results (table, JSON lines, plot) land in bench/results/. BENCH_ARGS=--quick
# for a short run. Then decode speed with a json_schema constraint vs without (same server run).
bench: install openblas
	@dir=$$($(MLXD) pull | sed -n 's/^[^:]*: //p' | head -1); \
	$(MLXD) bench --model-dir "$$dir" --spawn-mlxd \
	  --spawn "mlxd-nocache={python} -m server serve --config {config} --port {port} --preload --prefix-cache 0" \
	  --spawn-mlx-lm $(BENCH_ARGS); \
	$(PY) -m server.bench.structured --model-dir "$$dir" \
	  --out "bench/results/$$(date +%Y-%m-%d)-structured-$$(basename "$$dir")"

lint: install
	$(VENV)/bin/ruff check server tests
	$(VENV)/bin/ruff format --check server tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
