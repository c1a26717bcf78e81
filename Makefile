# mlxd — two commands on a fresh machine:
#   make run    create the venv, install what serving needs, prepare the default model, serve
#   make test   the same, plus the development tools (pytest, ruff, mypy…) and the suite
# MLXD_BACKEND=cuda selects mlx[cuda13] on Linux; macOS always uses Metal (plain `mlx`).
# Serving never installs the development tools: they come with `make test` / `make lint` only.

PYTHON  ?= python3
VENV    ?= .venv
PORT    ?= 8080
HOST    ?= 127.0.0.1
PY      := $(VENV)/bin/python
MLXD    := $(VENV)/bin/mlxd
UNAME   := $(shell uname -s)

ifeq ($(UNAME),Darwin)
  BACKEND := metal
  SPEC    := .
  DEVSPEC := .[dev]
else ifeq ($(MLXD_BACKEND),cuda)
  BACKEND := cuda
  SPEC    := .[cuda]
  DEVSPEC := .[cuda,dev]
else
  BACKEND := cpu
  SPEC    := .[cpu]
  DEVSPEC := .[cpu,dev]
endif

STAMP     := $(VENV)/.mlxd-installed-$(BACKEND)
DEV_STAMP := $(VENV)/.mlxd-dev-installed
PIP       := $(PY) -m pip install --disable-pip-version-check --progress-bar on

.PHONY: run test bench lint install dev model openblas chromium launcher clean help

help:
	@echo "make run     start mlxd on http://$(HOST):$(PORT)/v1 (default model: smollm2)"
	@echo "make test    run the test suite (unit + end-to-end)"
	@echo "make bench   benchmark mlxd against in-process mlx-lm and mlx_lm.server"
	@echo "make lint    ruff + mypy"
	@echo "make launcher  put mlxd on your PATH (a link in ~/.local/bin)"

# What serving needs, nothing more (pip shows what it downloads and installs).
install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing mlxd and what serving needs ($(BACKEND) backend) into $(VENV)"
	$(PIP) --upgrade pip
	$(PIP) -e "$(SPEC)"
	@touch $@
	@$(MAKE) --no-print-directory path-hint

# The development tools, for `make test` and `make lint` only.
dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	@echo "installing the development tools (pytest, ruff, mypy, …) into $(VENV)"
	$(PIP) -e "$(DEVSPEC)"
	@touch $@

.PHONY: path-hint
path-hint:
	@if [ "$$(command -v mlxd 2>/dev/null)" != "$(abspath $(MLXD))" ]; then \
	  echo "mlxd is installed at $(abspath $(MLXD)); to run it as \`mlxd\` from anywhere:"; \
	  echo "  make launcher                              (links it into ~/.local/bin)"; \
	  echo "  or: export PATH=\"$(abspath $(VENV))/bin:\$$PATH\""; \
	fi

# A user-level launcher: ~/.local/bin/mlxd → this checkout's venv.
launcher: install
	@mkdir -p $(HOME)/.local/bin
	@ln -sf "$(abspath $(MLXD))" "$(HOME)/.local/bin/mlxd"
	@echo "linked $(HOME)/.local/bin/mlxd -> $(abspath $(MLXD))"
	@case ":$$PATH:" in *":$(HOME)/.local/bin:"*) ;; \
	  *) echo "add ~/.local/bin to PATH, e.g. echo 'export PATH=\"\$$HOME/.local/bin:\$$PATH\"' >> ~/.profile";; esac

# The status page test drives a real headless Chromium (Debian's package), installed when
# missing if we can (root + apt-get); otherwise that test is skipped and says why.
chromium:
ifeq ($(UNAME),Linux)
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (for the status page test)"; \
	    apt-get install -y chromium || (apt-get update && apt-get install -y chromium) || \
	    echo "chromium not installed; the status page test will be skipped"; \
	  else \
	    echo "tip: install chromium (apt-get install chromium) to run the status page test"; \
	  fi; \
	fi
endif

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

test: dev openblas chromium
	$(MLXD) pull
	$(VENV)/bin/pytest -q

# Side by side on the default model: in-process mlx-lm, mlxd, mlxd without its prefix cache, and
# mlx_lm.server; results (table, JSON lines, plot) land in bench/results/. BENCH_ARGS=--quick
# for a short run. Then decode speed with a json_schema constraint vs without, and the memory
# scenario: estimate vs measured peak over prompt lengths, growing prompts under a budget
# (bench/README.md).
bench: dev openblas
	@dir=$$($(MLXD) pull | sed -n 's/^[^:]*: //p' | head -1); \
	$(MLXD) bench --model-dir "$$dir" --spawn-mlxd \
	  --spawn "mlxd-nocache={python} -m mlxd serve --config {config} --port {port} --preload --prefix-cache 0" \
	  --spawn-mlx-lm $(BENCH_ARGS); \
	$(PY) -m mlxd.bench.structured --model-dir "$$dir" \
	  --out "bench/results/$$(date +%Y-%m-%d)-structured-$$(basename "$$dir")"; \
	$(PY) -m mlxd.bench.memory --model-dir "$$dir" --out bench/results/$$(date +%F)-memory \
	  --lengths 16,256,1000,2100,3000 --max-tokens 8 --stress 64,512,1024,2100,3000 --budget 0.8GB

lint: dev
	$(VENV)/bin/ruff check server tests tools
	$(VENV)/bin/ruff format --check server tests tools
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
