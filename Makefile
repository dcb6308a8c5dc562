# oncoserve — every target sets itself up from nothing: `.venv` is created/updated from
# requirements.lock (torch==2.13.0, the CPU build, first), and a second run with an unchanged
# lock installs nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip warns about every optional local index it cannot read; keep the log readable.
QUIET := { grep -v 'is ignored' || true; }

# install VENV, ARGS: pip-style requirement arguments into a venv. uv installs the whole lock in seconds
# where pip takes minutes (measured on this 2-core machine, cold caches: 14 s vs about 10 min, the same
# versions); it does not read pip's configuration, so this machine's pip indexes, find-links and
# constraints are handed on. Where uv cannot be had, pip does the same job. Bytecode is compiled at install
# as pip does, so the suite's many fresh processes do not each compile it. The venvs it builds run numeric
# code exactly as fast as pip's (same wheels; torch/scipy/numpy micro-benchmarks within noise, 2026-12-05).
UV_VERSION := 0.13.9
PIP_TO_UV := sed -nE "s/^[^=]*[.](find-links|extra-index-url|index-url|constraint)='(.*)'$$/\1 \2/p"
define install
	@test -x $(1)/bin/uv || $(1)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION) 2>&1 | $(QUIET) || true
	@if [ -x $(1)/bin/uv ]; then \
	  args=$$($(1)/bin/pip config list 2>/dev/null | $(PIP_TO_UV) | while read -r key values; do \
	    for value in $$values; do printf -- '--%s %s ' "$$key" "$$value"; done; done); \
	  $(1)/bin/uv pip install -q --python $(1)/bin/python --index-strategy unsafe-best-match --compile-bytecode $$args $(2); \
	else $(1)/bin/pip install -q --disable-pip-version-check $(2) 2>&1 | $(QUIET); fi
endef

.PHONY: venv demo test bench lock clean chromium orthanc image test-image test-cluster test-science

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml services/proto/study.proto
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> installing torch==2.13.0 (CPU build) first"
	$(call install,$(VENV),torch==2.13.0)
	@$(BIN)/python -W ignore -c "import torch" || { echo "torch==2.13.0 failed to install"; exit 1; }
	@echo "==> installing the pinned environment (requirements.lock)"
	$(call install,$(VENV),-r requirements.lock)
	$(call install,$(VENV),--no-deps --no-build-isolation -e .)
	@echo "==> generating gRPC code from services/proto/study.proto"
	@$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. services/proto/study.proto
	@$(BIN)/python -c "import pipelines.cli, services.grpc_servicers" || { echo "oncoserve failed to install"; exit 1; }
	@touch $(STAMP)

demo: venv
	$(BIN)/oncoserve demo

# The official BraTS metrics (AGPL) live in their own venv: a test-only external cross-check.
BRATS_VENV := .venv-brats
$(BRATS_VENV)/.installed: tests/external/requirements-brats.lock
	@test -x $(BRATS_VENV)/bin/python || $(PYTHON) -m venv $(BRATS_VENV)
	@echo "==> installing the test-only BraTS metrics venv"
	$(call install,$(BRATS_VENV),-r $<)
	@touch $@

# Offline infra validation tools (Helm SDK, kubernetes-validate, checkov) in their own venv: test-only.
INFRA_VENV := .venv-infra
$(INFRA_VENV)/.installed: tests/external/requirements-infra.lock
	@test -x $(INFRA_VENV)/bin/python || $(PYTHON) -m venv $(INFRA_VENV)
	@echo "==> installing the test-only infra validation venv"
	$(call install,$(INFRA_VENV),-r $<)
	@touch $@

# The web UI tests drive Debian's chromium with Playwright (never `playwright install`).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@test -x /usr/bin/chromium || { echo "==> installing chromium (Debian) for the web UI tests"; \
	  $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null; }; }
	@test -x /usr/bin/chromium || { echo "chromium failed to install (apt-get install chromium)"; exit 1; }

# Orthanc (Debian) stands in for the hospital PACS in the PACS tests; the product never imports it.
orthanc:
	@test -x /usr/sbin/Orthanc -a -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { echo "==> installing Orthanc (Debian) for the PACS tests"; \
	  $(SUDO) apt-get install -y -q orthanc orthanc-dicomweb >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q orthanc orthanc-dicomweb >/dev/null; }; }
	@test -x /usr/sbin/Orthanc || { echo "Orthanc failed to install (apt-get install orthanc orthanc-dicomweb)"; exit 1; }

test: venv chromium orthanc $(BRATS_VENV)/.installed $(INFRA_VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m bench.run

# The container image as an OCI layout in build/image/oci (debootstrap + the locked wheels + umoci; no Docker,
# no registry), with its size and contents in build/image/REPORT.md. Root only (debootstrap, chroot).
image: venv
	infra/image/build.sh

# The image's entrypoints started inside its unpacked root filesystem (tests/image); not part of `make test`
# (the build alone takes minutes).
test-image: image
	$(BIN)/python -m pytest -m image tests/image $(PYTEST_ARGS)

# Multi-node Ray (three worker nodes beside the head) and the chart's RayJob run as processes: the
# deployment proofs that do not fit make test's time budget (about 5 minutes more).
test-cluster: venv orthanc $(INFRA_VENV)/.installed
	$(BIN)/python -m pytest -m cluster tests/integration/test_multinode.py tests/integration/test_cluster_wiring.py $(PYTEST_ARGS)

# The models against the synthetic benchmark's shortcuts (grade-only IDH, age-only survival), calibration and
# OOD, trained through the CLI on a 240-case cohort: about 40 minutes, so not part of `make test`.
test-science: venv
	ONCOSERVE_TEST_HANG_S=3600 $(BIN)/python -m pytest -m slow tests/science $(PYTEST_ARGS)

# Re-resolve the lock from requirements.in in a scratch venv (needs the registries).
lock:
	rm -rf /tmp/oncoserve-lock-venv && $(PYTHON) -m venv /tmp/oncoserve-lock-venv
	/tmp/oncoserve-lock-venv/bin/pip install -q torch==2.13.0
	/tmp/oncoserve-lock-venv/bin/pip install -q -r requirements.in
	{ head -2 requirements.lock; /tmp/oncoserve-lock-venv/bin/pip freeze --exclude-editable | grep -v '^torch=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) $(BRATS_VENV) $(INFRA_VENV) .pytest_cache
