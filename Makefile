# delving: two commands do all the set-up.
#   make book [PROFILE=cpu]   venv + pinned deps + data + every notebook (papermill) + HTML book
#   make test                 venv + pinned deps + the whole test suite
# Other targets: install, data, lab, bench, clean.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PROFILE ?= cpu
STAMP   := $(VENV)/.installed
LAB_PORT ?= 8888

.PHONY: book test install data lab bench clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c requirements.lock -e '.[dev]'
	@touch $@

install: $(STAMP)

data: $(STAMP)
	$(PY) -m delving.data fetch --install-debian

# The profile is checked before the data is fetched or any notebook runs.
book: $(STAMP)
	@$(PY) -m delving.book --profile $(PROFILE) --check
	@$(MAKE) --no-print-directory data
	@start=$$(date +%s); \
	$(PY) -m delving.book --profile $(PROFILE) || exit $$?; \
	echo "make book: $$(( $$(date +%s) - start )) s (after install)"

test: $(STAMP)
	$(PY) -m pytest -q

# JupyterLab on localhost only, with a token (printed in the URL below); never on other hosts.
lab: $(STAMP) data
	$(PY) -m jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) --no-browser \
	    --ServerApp.root_dir=$(CURDIR) $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

bench: $(STAMP) data
	$(PY) benchmarks/run.py

clean:
	rm -rf _build book/[0-9][0-9]_*.ipynb book/.*.partial.ipynb
