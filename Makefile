# scriptreel: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := scriptreel/.generated
MODELS_DIR ?= models
MODELS_STAMP := $(MODELS_DIR)/.built

.PHONY: help setup protos models run demo test lint bench plots images clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

setup: $(STAMP) $(GEN_STAMP) ## Create .venv with pinned (CPU) dependencies and generate the gRPC code

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,quant]' --config-settings editable_mode=compat
	rm -f $(VENV)/.installed-*
	touch $@

protos: $(GEN_STAMP) ## Generate Python code from protos/ into scriptreel/

$(GEN_STAMP): $(STAMP) $(PROTOS)
	rm -rf scriptreel
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

models: $(MODELS_STAMP) ## Build the tiny embedded models (random weights: they produce noise)

$(MODELS_STAMP): $(STAMP) $(shell find tiny_models -name '*.py')
	$(PY) -m tiny_models $(MODELS_DIR)
	touch $@

run: setup models ## Start the three servers, make a video into out/, print status, serve until Ctrl-C
	$(PY) -m gateway.stack --models $(MODELS_DIR) --out out/demo.mp4

demo: setup models ## Like run, but exit once the video is written
	$(PY) -m gateway.stack --models $(MODELS_DIR) --out out/demo.mp4 --exit

test: setup models ## Run the test suite (unit + integration on CPU; GPU tests skip without a GPU)
	bash deploy/tools.sh $(PY)
	$(PY) -m pytest -q

lint: setup ## buf lint on the protos, ruff and mypy on the code
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy serving vram media llm_server video_server gateway tiny_models bench

bench: setup ## GPU benchmarks (run on a GPU machine; writes bench/results/*.json)
	$(PY) -m bench.precision
	$(PY) -m bench.video
	$(PY) -m bench.llm
	$(PY) -m bench.compat

plots: setup ## Charts in docs/img/ from the bench/results/*.json that exist (matplotlib)
	$(PY) -m bench.plots

images: ## Build the container images (needs a container engine)
	docker build -f deploy/docker/Dockerfile.gpu -t scriptreel-gpu .
	docker build -f deploy/docker/Dockerfile.gateway -t scriptreel-gateway .

clean: ## Remove generated code, models and outputs (keeps .venv)
	rm -rf scriptreel $(MODELS_DIR) out
