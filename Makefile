# make setup: system packages (when missing), .venv with cafuse installed.
# make test:  the whole suite.  make demo: cafuse on a sample archive.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
APT_PACKAGES := fuse3 casync nginx-light e2fsprogs \
	squashfs-tools erofs-utils acl attr libcap2-bin busybox-static xxd openssl
# Only the benchmarks need these (a root file system to mount, GNU time).
BENCH_PACKAGES := debootstrap time
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages test demo bench clean

setup: system-packages $(STAMP)

# apt-get runs only when a package is missing.  dpkg-query rather than
# dpkg -s: a removed package whose config files remain counts as missing.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# System packages first, also under -j.
$(STAMP): pyproject.toml | system-packages
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: setup
	sh demo/demo.sh

bench: APT_PACKAGES += $(BENCH_PACKAGES)
bench: setup
	$(VENV)/bin/python integration/bench_cat.py $(BENCH_ARGS)
	$(VENV)/bin/python integration/bench_prefetch.py $(BENCH_ARGS)
	$(VENV)/bin/python integration/bench_mount.py $(BENCH_ARGS)
	$(VENV)/bin/python integration/bench_failover.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
