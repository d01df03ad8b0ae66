# btrfsdrv: run as root (sudo make test, sudo make demo); kernel tests need
# loop devices and mount.
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest
PYTEST_ARGS ?=
APT_GET = DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: demo-deps test test-deps test-source test-vendored vendor demo bench bench-deps bench-deep-paths \
	bench-pax-headers lint clean struct-table crosscheck packages

# The README's test command: prepare the machine, then run the whole suite
# against the source tree and against the vendored single file.
test: test-deps test-source test-vendored

# Debian packages whose data tarballs the layer round-trip tests apply.
DEBS_DIR = .cache/debs
ROUND_TRIP_PACKAGES = busybox-static tzdata python3-minimal

# Installs what the kernel tests need when it is missing (Debian and Ubuntu).
test-deps: packages
	@if ! command -v mkfs.btrfs >/dev/null 2>&1; then \
		$(APT_GET) update -qq && $(APT_GET) install -y -qq btrfs-progs; \
	fi
	@$(PYTHON) -c 'import pytest' 2>/dev/null || $(PYTHON) -m pip install -q pytest
	@# The packaging test builds a wheel offline, without build isolation.
	@$(PYTHON) -c 'import setuptools, wheel' 2>/dev/null || $(PYTHON) -m pip install -q setuptools wheel
	@# The interoperation tests build stores with Podman's btrfs driver.
	@if ! command -v podman >/dev/null 2>&1; then \
		$(APT_GET) update -qq && $(APT_GET) install -y -qq podman; \
	fi

# Downloads the round-trip packages into $(DEBS_DIR) unless they are there.
packages:
	@mkdir -p $(DEBS_DIR)
	@missing=""; for package in $(ROUND_TRIP_PACKAGES); do \
		ls $(DEBS_DIR)/$${package}_*.deb >/dev/null 2>&1 || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		$(APT_GET) update -qq && cd $(DEBS_DIR) && \
		$(APT_GET) -o APT::Sandbox::User=root download $$missing; \
	fi

test-source:
	$(PYTEST) $(PYTEST_ARGS)

# The same tests against dist/btrfsdrv.py. pytest runs from dist/ in
# importlib mode, so neither pytest nor "python -m" puts the repository,
# and with it ioctl_structs.py, on sys.path. Tests find repository files
# through their own __file__.
test-vendored: vendor
	cd dist && BTRFSDRV_PATH=. BTRFSDRV_VENDORED=1 $(PYTEST) -c ../setup.cfg --rootdir .. \
		-p no:cacheprovider --import-mode=importlib $(PYTEST_ARGS) ../test_btrfsdrv.py

vendor:
	$(PYTHON) tools/vendor.py --output dist/btrfsdrv.py

demo: demo-deps
	$(PYTHON) tools/demo.py

# The demo needs only mkfs.btrfs.
demo-deps:
	@if ! command -v mkfs.btrfs >/dev/null 2>&1; then \
		$(APT_GET) update -qq && $(APT_GET) install -y -qq btrfs-progs; \
	fi

# Benchmarks against libbtrfsutil, the btrfs CLI and GNU tar (see
# BENCHMARKS.md). CASES selects cases (CASES=snapshot,remove); QUICK=1 runs
# smaller sizes for development.
CASES ?=
QUICK ?=
BENCH_ARGS = $(if $(CASES),--cases $(CASES)) $(if $(QUICK),--quick)

bench: bench-deps
	$(PYTHON) bench/run.py $(BENCH_ARGS)
	$(PYTHON) bench/deep_paths.py $(DEPTH_ARGS)
	$(PYTHON) bench/pax_headers.py $(PAX_ARGS)

# Times changes, diff_size, diff and apply_diff on a chain of 3,000 nested
# directories, and apply_diff and remove on layers with 1,000 nested
# subvolumes, and read_write_disk_usage and update_layer_id_map on a chain of
# 20,000 directories (see BENCHMARKS.md). DEPTH_ARGS="--module-dir DIR" measures the
# btrfsdrv.py of another checkout.
DEPTH_ARGS ?=
bench-deep-paths:
	$(PYTHON) bench/deep_paths.py $(DEPTH_ARGS)

# Measures the CPU seconds per MiB of PAX header data that apply_diff spends
# (see bench/pax_headers.py). PAX_ARGS="--module-dir DIR" measures the
# btrfsdrv.py of another checkout.
PAX_ARGS ?=
bench-pax-headers:
	$(PYTHON) bench/pax_headers.py $(PAX_ARGS)

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

# Static checks, run by hand: ruff, mypy --strict, and vermin for Python 3.8,
# the oldest supported version. vermin evaluates annotations only in files
# without "from __future__ import annotations", where Python evaluates them.
LINT_FILES = btrfsdrv.py ioctl_structs.py tools/*.py test_btrfsdrv.py bench/*.py
VERMIN = $(PYTHON) -c 'import sys, vermin; sys.exit(vermin.main())'
lint: vendor
	@for tool in ruff mypy vermin; do \
		$(PYTHON) -c "import $$tool" 2>/dev/null || $(PYTHON) -m pip install -q $$tool; \
	done
	$(PYTHON) -m ruff check $(LINT_FILES)
	$(PYTHON) -m mypy --strict btrfsdrv.py ioctl_structs.py
	@for file in $(LINT_FILES) dist/btrfsdrv.py; do \
		if grep -q '^from __future__ import annotations' $$file; then flags=; else flags=--eval-annotations; fi; \
		echo "vermin -t=3.8- $$flags $$file"; \
		$(VERMIN) -q -t=3.8- --no-tips --violations $$flags $$file || exit 1; \
	done

clean:
	rm -rf dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache
