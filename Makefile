# sohocloud — build hardened role images and prove them in QEMU.
#   make            deps + the default image (router, amd64, qemu)
#   make test       deps + tier 1 (unit) + tier 2 (boot, amd64 + arm64) + tier 3 (fleet, mixed-arch)  <- CI runs this
#   make test-all   make test + the site with every role on arm64 (+ k3s when its files are given)
#   make bench      writes BENCHMARKS.md
SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
SOHOCLOUD   := $(VENV)/bin/sohocloud
OUT         ?= out

# Host tools (Debian bookworm). Board firmware and arm64 kernels come from the
# archive into image trees, never onto the host.
APT_PACKAGES := mmdebstrap qemu-system-x86 qemu-utils ovmf mtools dosfstools e2fsprogs fdisk \
                squashfs-tools xz-utils kmod busybox socat iproute2 openssh-client systemd \
                ca-certificates python3-venv nftables cpio smbclient git \
                qemu-system-arm qemu-efi-aarch64 qemu-user-static binfmt-support arch-test bmap-tools \
                zbar-tools chromium chromium-driver tigervnc-standalone-server xterm wireguard-go wireguard-tools \
                aide lynis

.PHONY: all deps apt binfmt venv image test test-unit test-boot test-k3s test-audit test-all bench bench-desktops clean distclean

all: deps image

deps: apt binfmt venv

# arm64 images are built on this amd64 host through qemu-user: binfmt_misc must be
# mounted and qemu-aarch64 registered (binfmt-support does it at boot on a normal
# system; a container or a fresh VM may need it done here).
binfmt: apt
	@test -e /proc/sys/fs/binfmt_misc/status || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	@grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null || update-binfmts --enable qemu-aarch64
	@echo "deps: qemu-aarch64 registered with binfmt_misc"

# Idempotent and quick when nothing is missing: apt runs only for absent packages.
apt:
	@missing=$$(dpkg-query -W -f='$${Package} $${db:Status-Status}\n' $(APT_PACKAGES) 2>/dev/null \
	    | awk '$$2 != "installed" {print $$1}'; \
	  for p in $(APT_PACKAGES); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done | sort -u); \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing $$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "deps: run as root (apt-get install)" >&2; exit 1; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq; \
	  apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "deps: host packages present"; fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@
	@echo "deps: $(VENV) ready"

image: deps
	$(SOHOCLOUD) build router --arch amd64 --target qemu -o $(OUT)

test: deps
	$(PY) -m pytest tests/unit tests/boot -v --durations=30

test-unit: venv
	$(PY) -m pytest tests/unit -v
	@# make test collects both tiers in one session: a name clash between them fails only there.
	@out=$$($(PY) -m pytest --collect-only -q tests/unit tests/boot 2>&1) || { echo "$$out" | tail -40; exit 1; }

test-boot: deps
	$(PY) -m pytest tests/boot -v

# k3s end to end: needs its air-gap files (no reachable registry has k3s).
#   K3S_ARTIFACTS=dir make test-k3s     (dir/k3s, dir/k3s-airgap-images-amd64.tar)
test-k3s: deps
	@test -n "$${K3S_ARTIFACTS:-}" || { echo "test-k3s: set K3S_ARTIFACTS=dir (k3s + k3s-airgap-images-amd64.tar)" >&2; exit 2; }
	$(PY) -m pytest tests/boot/test_k3s_site.py -v -rs

# Everything: make test, then the arm64 router checks with router B too (the arm64 qemu image
# through AAVMF), the example site with every role on arm64 (router on a
# Pi 4 card, NAS on a ROCK64 card, control and workstation host arm64 qemu images) and both of its
# diskless PCs (make test boots the BIOS one; the UEFI one is a sixth emulated VM on two cores),
# the NAS re-imaged there (a whole emulated first boot again: too long for make test),
# then the opt-in suites whose inputs are present.
test-all: test
	SOHOCLOUD_TEST_ARCHES=arm64 SOHOCLOUD_ROUTER_B_ARCHES=arm64 $(PY) -m pytest tests/boot/test_router.py -v
	SOHOCLOUD_FLEET_ARM64=all SOHOCLOUD_FLEET_REIMAGE=1 SOHOCLOUD_FLEET_PCS=all $(PY) -m pytest tests/boot/test_fleet_site.py -v
	$(MAKE) test-audit
	@if [ -n "$${K3S_ARTIFACTS:-}" ]; then $(MAKE) test-k3s; else echo "test-all: K3S_ARTIFACTS unset, k3s suite skipped"; fi

# Lynis on one node of each role of the booted example site (`fleet audit`): 20-40 min a node under
# TCG, so not in make test. The figures go to out/test-logs/lynis.txt.
test-audit: deps
	SOHOCLOUD_FLEET_AUDIT=1 $(PY) -m pytest tests/boot/test_fleet_site.py -v -s -k "lynis or worker_booted"

bench: deps
	$(PY) tests/bench.py --output BENCHMARKS.md

# Only the desktops' figures (the example site booted; their block of BENCHMARKS.md rewritten).
bench-desktops: deps
	$(PY) tests/bench.py --output BENCHMARKS.md --desktops-only

clean:
	rm -rf $(OUT)

distclean: clean
	rm -rf $(VENV)
