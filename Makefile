# OneRec serving. `make serve` and `make test` work on a fresh clone (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORE ?= model-store
MODEL ?= demo

.PHONY: install system-deps proto serve demo-model test test-deploy lint bench-kernels clean

install: $(STAMP) proto

# torch is pinned through constraints.txt: the CPU build of 2.13.0 is on disk, a newer one is GBs of CUDA.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,bench,gpu]'
	touch $(STAMP)

# gRPC stubs are generated from proto/ at install time, never committed.
proto: $(STAMP)
	$(PY) -m onerec_proto.generate

demo-model: install
	@if [ -z "$$(ls -A $(STORE)/$(MODEL) 2>/dev/null)" ]; then \
		echo "model store $(STORE) has no '$(MODEL)' model: building the synthetic demo (about a minute)"; \
		$(VENV)/bin/onerec build --dataset synthetic --out $(STORE) --name $(MODEL); \
	fi

serve: demo-model
	$(VENV)/bin/onerec serve --model-store $(STORE)

# redis-server, promtool, amtool and kubectl from Debian where missing (as root; else it names them).
system-deps:
	bash .ci/system-deps

test: install system-deps
	$(PY) -m pytest -q

# Only the deployment checks (Dockerfile, compose, Kubernetes, Prometheus, Grafana; about a minute).
test-deploy: install system-deps
	$(PY) -m pytest -q tests/test_deploy_*.py tests/test_service_deploy.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy service model_store kernels onerec_proto
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

bench-kernels: install
	$(PY) -m benchmarks.kernel_speed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache onerec_proto/_generated
