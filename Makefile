# Tamiyo. `make serve` and `make test` work on a fresh machine with Python 3.11 and make:
# the first run creates .venv and installs the pinned CPU build of torch and the project.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build pinned for local and CI use; the Dockerfile chooses CUDA with a build argument.
TORCH_SPEC ?= torch==2.13.0
# Where pip finds that torch: empty = pip's configured index. Elsewhere, the same CPU
# wheel index the Dockerfile's TORCH_INDEX_URL names (or a CUDA one).
TORCH_INDEX_URL ?=
BUF := node_modules/.bin/buf
ARGS ?=

.PHONY: help setup protos check-protos serve test lint fmt buf buf-lint train demo bench soak clean

help:
	@echo "make serve   run the server on 127.0.0.1:50051 with the bundled default policy"
	@echo "make test    lint, check generated code, run the test suite"
	@echo "make lint    ruff, mypy, buf lint     make protos   regenerate tamiyo/v1"
	@echo "make buf     buf (npm) for buf curl / buf lint"
	@echo "make train | demo | bench | soak"

# setup.py builds the native modules (tamiyo/policy/_*.c): a change to one reinstalls.
$(STAMP): pyproject.toml setup.py tamiyo/policy/_fused.c tamiyo/policy/_features.c tamiyo/policy/_ingest.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)")
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(STAMP)

protos: $(STAMP)
	$(PY) tools/protogen.py

check-protos: $(STAMP)
	$(PY) tools/protogen.py --check

serve: $(STAMP)
	$(PY) -m tamiyo_server $(ARGS)

$(BUF): package.json
	npm install --no-audit --no-fund --silent
	touch $@

# buf alone (for `buf curl` by hand), without the Python lint
buf: $(BUF)

buf-lint:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(BUF) && $(BUF) lint; \
	else echo "buf lint skipped: npm not found (buf ships in the npm package @bufbuild/buf)"; fi

lint: $(STAMP) buf-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# pytest exits 5 when it collects no tests; make treats any non-zero exit as failure.
test: $(STAMP) check-protos lint
	$(PY) -m pytest $(ARGS)

# Simic behaviour data → BC/IQL × 3 seeds → evaluation → runs/default/report.{json,png};
# publishes the IQL seed-0 policy to checkpoints/default/. Fixed seeds. ARGS="--set steps=500".
train: $(STAMP)
	$(PY) -m trainer pipeline --out runs/default --checkpoint-dir checkpoints/default $(ARGS)

# Trains a small real model with and without Tamiyo (starts a server unless
# ARGS="--target host:port"); prints decisions, writes demo-results/{loss.png,summary.json}.
demo: $(STAMP)
	$(PY) -m tamiyo_client.demo $(ARGS)

# Speed/memory vs baselines measured in the same run; tables + bench-results/*.json.
# ARGS="--only inference,serving --quick".
bench: $(STAMP)
	$(PY) -m bench $(ARGS)

# Fuzzing (>= 10,000 examples per fuzzer) and fault injection against real server
# processes on loopback; bounded (~15 min). Table + bench-results/soak.json. ARGS="--quick".
soak: $(STAMP)
	$(PY) -m soak $(ARGS)

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache build *.egg-info
