# Two commands on a fresh machine (Python 3.11 with venv): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The capital of France is

.PHONY: setup demo test test-quick lint protos
setup: $(BIN)/tandem

# docker/install.sh is the one install path: the container image runs it too (docker/Dockerfile).
$(BIN)/tandem: pyproject.toml docker/install.sh
	PYTHON="$(PY)" bash docker/install.sh --dev $(VENV)
	touch $@

# The main job: the three services as processes, SmolLM2-135M-Instruct verifying a Tandem drafter's blocks, streamed.
demo: setup
	$(BIN)/tandem demo "$(PROMPT)"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# pytest exits 5 when a selection collects no tests; that is not a failure of the code under test.
# The whole suite: tests/unit, tests/services (gRPC services in process, faults, soak, load test), tests/real_model
# (the SmolLM2 GGUF, fetched once into the cache), tests/deploy (Kubernetes manifests, the Docker install).
test: lint
	$(BIN)/python -m pytest -q || [ $$? -eq 5 ]

# The quick tier: the library on tiny models, no services, no real model. The unit tests marked slow (the statistical
# and compile-everything ones, ten seconds and more each) are left to `make test` and `pytest tests/unit`.
test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow" tests/unit || [ $$? -eq 5 ]

# Regenerate the checked-in stubs from protos/ (grpcio-tools is pinned in pyproject.toml; tests/unit/test_protos.py diffs).
protos: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/tandemrpc/v1/tandem.proto
