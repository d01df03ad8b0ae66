# btrfsdrv: run as root (sudo make test, sudo make demo); kernel tests need
# loop devices and mount.
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest
PYTEST_ARGS ?=
APT_GET = DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: test test-deps test-source test-vendored vendor demo bench bench-deps lint clean \
	struct-table crosscheck

# The README's test command: prepare the machine, then run the whole suite
# against the source tree and against the vendored single file.
test: test-deps test-source test-vendored

# Installs what the kernel tests need when it is missing (Debian and Ubuntu).
test-deps:
	@if ! command -v mkfs.btrfs >/dev/null 2>&1; then \
		$(APT_GET) update -qq && $(APT_GET) install -y -qq btrfs-progs; \
	fi
	@$(PYTHON) -c 'import pytest' 2>/dev/null || $(PYTHON) -m pip install -q pytest

test-source:
	$(PYTEST) $(PYTEST_ARGS)

test-vendored: vendor
	BTRFSDRV_PATH=dist $(PYTEST) -p no:cacheprovider $(PYTEST_ARGS)

vendor:
	$(PYTHON) tools/vendor.py --output dist/btrfsdrv.py

demo: test-deps
	$(PYTHON) tools/demo.py

# Benchmarks against libbtrfsutil, the btrfs CLI and GNU tar (see
# BENCHMARKS.md). CASES selects cases (CASES=snapshot,remove); QUICK=1 runs
# smaller sizes for development.
CASES ?=
QUICK ?=
BENCH_ARGS = $(if $(CASES),--cases $(CASES)) $(if $(QUICK),--quick)

bench: bench-deps
	$(PYTHON) bench/run.py $(BENCH_ARGS)

# python3-btrfsutil is built for Debian's /usr/bin/python3, which the
# benchmark runs it with.
bench-deps:
	@if ! /usr/bin/python3 -c 'import btrfsutil' 2>/dev/null || ! command -v btrfs >/dev/null 2>&1 \
		|| ! command -v tar >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then \
		$(APT_GET) update -qq && $(APT_GET) install -y -qq python3-btrfsutil btrfs-progs tar dpkg; \
	fi

# Regenerates the table of struct layouts and constants that the kernel
# interface tests compare against where no C compiler or headers exist.
# Cross compilers that are installed add their architectures to it.
struct-table:
	$(PYTHON) tools/structprobe.py --table --output tools/struct_table.json

# Installs the missing Debian cross compilers, then checks every request
# number of ioctl_structs against each architecture's compiled headers.
crosscheck: test-deps
	@missing=""; \
	for package in $$($(PYTHON) tools/structprobe.py --list-cross-packages); do \
		dpkg-query -W -f='$${Status}' "$$package" 2>/dev/null | grep -q "ok installed" \
			|| missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		$(APT_GET) update -qq && $(APT_GET) install -y -qq $$missing; \
	fi
	BTRFSDRV_CROSSCHECK=1 $(PYTEST) $(PYTEST_ARGS) -k crosscheck

clean:
	rm -rf dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache
