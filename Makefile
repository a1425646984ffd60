# Quick start: `make demo` (main job) and `make test` (test suite: lint + every test). Both create .venv
# and install first. `make check` is the edit loop: lint + the tests not marked slow (about a minute).
# `make test` and `make check` also install the web app's extra (gradio, playwright); `make test` installs
# Debian's Chromium for the browser test where it can (root + apt-get), else that test skips with the reason.
#
# The CPU build of torch is installed by default so a fresh machine does not pull a multi-GB CUDA build:
# a wheel of that version already on disk (pip's find-links) is used first, else PyTorch's CPU index.
# GPU users override it, e.g. (changing TORCH or TORCH_INDEX reinstalls torch into the existing .venv):
#   make demo TORCH="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX := --index-url https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(TORCH_CPU_INDEX)
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-installed
APP_STAMP := $(VENV)/.stamp-app
CHROMIUM ?= /usr/bin/chromium
TORCH_SPEC := $(VENV)/.torch-spec

.PHONY: setup demo test check lint browser clean FORCE

setup: $(STAMP)

# rewritten only when the torch choice changes; then the old torch is removed, so that the same version
# from another index (e.g. a CUDA build instead of the CPU one) really replaces it
$(TORCH_SPEC): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH) $(TORCH_INDEX)' | cmp -s - $@ || { \
		if test -f $@ && test -x $(BIN)/python; then $(BIN)/python -m pip uninstall -q -y torch; fi; \
		echo '$(TORCH) $(TORCH_INDEX)' > $@; }

$(STAMP): pyproject.toml Makefile $(TORCH_SPEC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(TORCH_INDEX),$(TORCH_CPU_INDEX))
	$(BIN)/python -m pip install -q --no-index --no-deps "$(TORCH)" 2>/dev/null \
		&& $(BIN)/python -m pip install -q "$(TORCH)" \
		|| $(BIN)/python -m pip install -q "$(TORCH)" $(TORCH_INDEX)
else
	$(BIN)/python -m pip install -q "$(TORCH)" $(TORCH_INDEX)
endif
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# the app extra (gradio; playwright drives the system Chromium, it never downloads a browser); not for demo
$(APP_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,app]"
	touch $@

# Debian's chromium for tests/test_app_browser.py, when missing and installable (root with apt-get)
browser:
	@test -x "$(CHROMIUM)" || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the browser test"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
				|| echo "could not install chromium: the browser test will skip"; \
		else echo "no $(CHROMIUM) (and not root with apt-get): the browser test will skip"; fi; }

demo: setup
	$(BIN)/shapeflow demo $(DEMO_OUT) $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: lint $(APP_STAMP) browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

check: lint $(APP_STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
