# slipstream — the two commands a newcomer needs:
#   make demo   install what the demo needs, then run it on the embedded local cloud
#   make test   install everything the suite needs (Debian packages too, when root), then run it
#
# Python packages come from requirements.lock (uv pip compile pyproject.toml --extra test).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/.uv/bin/uv
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -o DPkg::Lock::Timeout=900 -y -q
# openssh-server: local-cloud VMs from Featured images run a real sshd (the demo's too).
DEMO_PACKAGES := openssh-server openssh-client
# slurmctld slurmd slurm-client munge: the elastic Slurm tests run real daemons (slurm-wlm's
# plugin packages are not needed).
# chromium: tests/integration/test_burn_chart_in_ui.py renders the burn chart in the real Prefect UI.
TEST_PACKAGES := $(DEMO_PACKAGES) slurmctld slurmd slurm-client munge chromium

.PHONY: demo test install demo-deps python-deps debian-deps lab-up lab-down lock clean-local

demo: demo-deps python-deps
	$(VENV)/bin/slipstream demo

test: install
	bash .ci/test-suite

install: debian-deps python-deps

python-deps: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(PYTHON) -m pip install -q --disable-pip-version-check --target $(VENV)/.uv uv==0.13.8
	PYTHONPATH=$(VENV)/.uv $(UV) pip install -q --python $(PY) -r requirements.lock
	PYTHONPATH=$(VENV)/.uv $(UV) pip install -q --python $(PY) --no-deps -e .
	@touch $@

demo-deps:
	@$(MAKE) --no-print-directory debian-deps PACKAGES="$(DEMO_PACKAGES)"

# Installs only what is missing (by default everything the tests need), so a second run costs nothing.
PACKAGES ?= $(TEST_PACKAGES)
debian-deps:
	@missing=""; for p in $(PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(APT) update -qq && $(APT) install --no-install-recommends $$missing >/dev/null; \
	fi

lock:
	PYTHONPATH=$(VENV)/.uv $(UV) pip compile pyproject.toml --extra test --python-version 3.11 -o requirements.lock

# Ends every local-cloud VM by its recorded process group.
clean-local: python-deps
	$(VENV)/bin/slipstream local reset
