# Two commands on a fresh machine:
#   make demo   sets up .venv and runs the whole loop on embedded defaults
#   make test   sets up .venv and the tools the tests use, then runs lint, type checks, the
#               import rule and the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every part is installed (`.[all,dev]`). The pinned CPU build of torch goes first (it lies on
# disk on our machines; the training extra's bare range would pull the multi-GB CUDA build); on a
# GPU machine set TORCH_SPEC to the CUDA build you want, or leave it: the same range resolves there.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# test files run in this many processes at once (pytest-xdist; a file's tests stay in one process,
# so a module's shared server starts once); most tests wait on the servers they start, so two
# processes keep both cores of a 2-core machine busy. 0 runs them in this process.
PYTEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup tools demo test lint test-fast bench clean grpc-stubs

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/modelloop demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# PostgreSQL running, and prometheus/promtool, amtool, wrk and helm installed (the tests use them)
tools:
	bash scripts/ci_services.sh

test: tools lint
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -m "not slow and not integration" $(PYTEST_ARGS)

# The Open Inference Protocol's gRPC messages and service (committed; rerun after editing the .proto)
grpc-stubs: setup
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
		serving/proto/predict_v2.proto
	# a descriptor pool of their own: tritonclient.grpc's modules put the same package,
	# "inference", in the default pool, which refuses a second definition in one process
	sed -i 's/_descriptor_pool.Default().AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' \
		serving/proto/predict_v2_pb2.py

clean:
	rm -rf $(VENV) .modelloop .pytest_cache .mypy_cache .ruff_cache
