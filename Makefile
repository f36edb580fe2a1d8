# Two commands matter: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# TorchRec declares the CUDA fbgemm-gpu; with --no-deps it runs on pyproject's fbgemm-gpu-cpu.
TORCHREC := torchrec==1.8.0

.PHONY: demo test lint format clean movielens triton

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(TORCHREC)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mlet demo --out demo-out

# The report test renders HTML in Debian's headless Chromium; install it where we can.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
$(BROWSER):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null; \
	else \
		echo "chromium and chromium-driver are missing: the HTML report test will skip"; \
	fi

# Real Triton (serve/triton_engine.py) runs from an environment of its own; where the wheel
# cannot install, the real-Triton tests skip and say why.
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed
$(TRITON_STAMP): triton-requirements.txt
	@test -d $(TRITON_VENV) || $(PYTHON) -m venv $(TRITON_VENV)
	@if $(TRITON_VENV)/bin/pip install --quiet -r triton-requirements.txt; then touch $@; \
	else echo "nvidia-pytriton did not install: the real-Triton tests will skip"; fi
triton: $(TRITON_STAMP)

# `mlet bench engines` drives the load with Debian's wrk, a compiled HTTP load generator.
WRK := /usr/bin/wrk
$(WRK):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	else \
		echo "wrk is missing: mlet bench engines falls back to several Locust processes"; \
	fi

# Over gRPC it drives the load with h2load, from Debian's nghttp2-client.
H2LOAD := /usr/bin/h2load
$(H2LOAD):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			nghttp2-client >/dev/null; \
	else \
		echo "h2load is missing: mlet bench engines --protocol grpc falls back to Locust"; \
	fi

test: $(STAMP) $(BROWSER) $(TRITON_STAMP) $(WRK) $(H2LOAD)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# MovieLens-100k from RecBole's wheel on the package index (the only network used); only
# its three ml-100k files are read, recbole itself is not installed.
movielens: $(STAMP)
	rm -rf datasets/.recbole && mkdir -p datasets/.recbole
	$(BIN)/pip download --no-deps --quiet --dest datasets/.recbole recbole
	$(BIN)/mlet data movielens datasets/.recbole/recbole-*.whl --out datasets/movielens --overwrite
	rm -rf datasets/.recbole

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf demo-out runs models results .pytest_cache $(TRITON_VENV)
