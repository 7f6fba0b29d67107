# mailpipe: the two commands a newcomer needs are `make demo` and `make test`.
# The venv's interpreter: the distribution's python3 when it is new enough,
# else the first python3 on PATH (scripts/pick-python.sh says why).
PYTHON ?= $(shell scripts/pick-python.sh)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lab install debian-tools clean

demo: $(STAMP)        ## start the lab, send one message end to end, show its hops, stop
	$(BIN)/mailpipe demo

test: $(STAMP) debian-tools   ## the whole test suite (unit, protocol, end-to-end, interop, notebooks)
	$(BIN)/python -m pytest

lab: $(STAMP)         ## JupyterLab on the notebooks
	$(BIN)/jupyter lab notebooks/

install: $(STAMP)

# A fresh Debian has python3 without its venv module's pip: install
# python3-venv then (scripts/debian-venv.sh) and try once more.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && bash scripts/debian-venv.sh && $(PYTHON) -m venv $(VENV); }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

debian-tools:         ## swaks, curl, postfix and dovecot for the interop tests (apt-get, when missing)
	@bash scripts/debian-tools.sh

clean:
	rm -rf $(VENV) .pytest_cache
