# stanceserve developer tasks. Everything runs from the project venv (.venv).
#
#   make venv    create .venv and install the project (+dev, train, bench extras); re-runs when pyproject.toml changes
#   make model   download and cache the embedded SmolLM2-135M-Instruct (no-op when cached)
#   make serve   run the service on http://$(HOST):$(PORT)
#   make test    run the test suite (slow tests included), PYTEST_ARGS="..." to pass options; then the
#                dtype-sensitive tests (marker `dtype`) again as the other kind of CPU would run them
#                (STANCESERVE_CPU_BF16=1 on a host without native bf16: `--dtype auto` picks bfloat16,
#                emulated; STANCESERVE_CPU_BF16=0 on a host with it: float32); BF16_PASS= skips that pass
#   make lint    byte-compile everything (ruff check too, when installed)
#   make docs    build the documentation site into site/ (mkdocs, strict); `make docs-serve` previews it on :8001
#   make clean   remove the venv and build/test leftovers (not the model cache)
#   make prometheus  install Debian's prometheus + promtool when missing (the scrape test runs them)
#   make chromium    install Debian's chromium when missing (the playground's browser test drives it)
#   make dashboard   rebuild deploy/grafana/dashboards/stanceserve.json from deploy/grafana/dashboard.py
#
# The model cache lives in $$STANCESERVE_CACHE_DIR (default ~/.cache/stanceserve).
#
# Where torch comes from: TORCH_INDEX_URL (empty = pip's own indexes; see docs/getting-started.md).
#   make venv TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu     CPU only (~200 MB)
#   make venv TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130   CUDA 13.0 (what PyPI's torch==2.13.0 is)
#   make venv TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   CUDA 12.8, older drivers (if built for 2.13.0)
# Empty on a plain machine means PyPI, whose torch==2.13.0 is the CUDA 13.0 build (several GB); this
# project's machines have a local CPU wheel that pip's configuration finds first.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=
# What `pip install` gets after torch. [dev] pulls the [train] and [bench] extras too, so
# `make test` has everything; the Docker image sets INSTALL_SPEC=. (the server only, not editable).
INSTALL_SPEC ?= -e '.[dev]'
STAMP := $(VENV)/.stanceserve-installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# Set to 1 to treat pytest's exit code 5 ("no tests collected") as success (.ci/run does).
ALLOW_NO_TESTS ?=
# Non-empty: after the suite, rerun the tests marked `dtype` with the CPU's bf16 probe forced to the other answer.
BF16_PASS ?= 1

.PHONY: venv model serve test lint docs docs-serve clean prometheus chromium dashboard

venv: $(STAMP)

# torch goes in FIRST, pinned: pip then finds the local CPU wheel (or a CPU index);
# an unpinned resolve would pull the newest CUDA build and several GB with it.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install $(INSTALL_SPEC)
	@touch $@

model: venv
	$(BIN)/stanceserve fetch-model

serve: venv model
	$(BIN)/stanceserve serve --host $(HOST) --port $(PORT)

test: venv model
	@rc=0; $(BIN)/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ] && [ -n "$(ALLOW_NO_TESTS)" ]; then \
		echo "pytest collected no tests (exit 5); accepted because ALLOW_NO_TESTS is set"; rc=0; \
	fi; \
	if [ $$rc -eq 0 ] && [ -n "$(BF16_PASS)" ]; then \
		other=$$($(BIN)/python -c 'from app.model_loader import cpu_has_native_bf16 as h; print(int(not h()))'); \
		echo "dtype-sensitive tests again, as on the other kind of CPU (STANCESERVE_CPU_BF16=$$other)"; \
		STANCESERVE_CPU_BF16=$$other $(BIN)/pytest -m dtype $(PYTEST_ARGS) || rc=$$?; \
		if [ $$rc -eq 5 ]; then rc=0; fi; \
	fi; \
	exit $$rc

lint: venv
	$(BIN)/python -m compileall -q app training bench tests
	@if [ -x $(BIN)/ruff ]; then $(BIN)/ruff check app training bench tests; else echo "ruff not installed: skipped"; fi

docs: venv
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: venv
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

# Debian's prometheus package (the version is Debian's: 2.42 on bookworm); as root, or through sudo.
prometheus:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then \
		echo "prometheus: $$(prometheus --version 2>&1 | head -n 1)"; \
	else \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
		prometheus --version 2>&1 | head -n 1; \
	fi

# Debian's chromium, which tests/playground drives headless through Playwright (Playwright's own browser
# download is never used); as root, or through sudo.
chromium:
	@if command -v chromium >/dev/null 2>&1; then \
		echo "chromium: $$(chromium --version 2>/dev/null | head -n 1)"; \
	else \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		chromium --version 2>/dev/null | head -n 1; \
	fi

dashboard: venv
	$(BIN)/python deploy/grafana/dashboard.py

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
