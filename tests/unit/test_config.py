"""Tier 1: config resolution (builder/s1_resolve.py, schema.py, yamlsrc.py) and the CLI's fail-fast path.

Every error test edits a temp copy of the repo's profiles/images/overlays and
checks that the ConfigError names the file, the line (file:LINE), the key
path and what was expected.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.errors import ConfigError
from builder.image.pipeline import check_build_host
from builder.image.s1_resolve import Repo, load_profile, resolve
from builder.image.schema import parse_size
from repo_edit import edit  # tests/unit is on sys.path (prepend import mode)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def line_of(path: Path, needle: str, nth: int = 1) -> int:
    """1-based line number of the nth line of *path* containing *needle*."""
    hits = [i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    assert len(hits) >= nth, f"{needle!r} not found {nth} time(s) in {path}"
    return hits[nth - 1]


def config_error(repo: Path, role: str = "router", **kw) -> str:
    with pytest.raises(ConfigError) as ei:
        resolve(Repo(repo), role, **kw)
    return str(ei.value)


# --------------------------------------------------------------------------- the real router


@pytest.fixture(scope="module")
def router():
    return resolve(Repo(REPO_ROOT), "router")


def test_router_interfaces_in_order(router) -> None:
    assert router.profile.interfaces == ("wan", "lan")


def test_router_slug_and_defaults(router) -> None:
    assert (router.role, router.distro, router.arch, router.target_name) == ("router", "debian", "amd64", "qemu")
    assert router.slug == "router-debian-amd64-qemu"
    assert router.arch_spec is router.target.arches["amd64"]


def test_router_packages_merge_role_and_layers(router) -> None:
    pkgs = router.profile.packages
    for p in ("dnsmasq", "wireguard-tools", "apparmor", "systemd", "openssh-server", "sudo", "nftables"):
        assert p in pkgs
    assert len(pkgs) == len(set(pkgs)), "merged package list has duplicates"
    # base first, then hardened, then the role
    assert pkgs.index("systemd") < pkgs.index("apparmor") < pkgs.index("dnsmasq")
    allp = router.all_packages()
    # The kernel is extracted natively (stage 2: the distro backend's kernel()), never installed by mmdebstrap.
    assert "linux-image-amd64" not in allp and "dnsmasq" in allp
    assert router.arch_spec.kernel_package == "linux-image-amd64"


def test_router_ip_forward_exception_with_reason(router) -> None:
    eff = router.profile.effective_sysctl()
    assert eff["net.ipv4.ip_forward"] == "1"
    exc = router.profile.sysctl_exceptions["net.ipv4.ip_forward"]
    assert str(exc.value) == "1"
    assert "forward" in exc.reason and exc.reason.strip()
    # the hardened baseline value itself is unchanged; only the exception relaxes it
    assert str(router.profile.sysctl["net.ipv4.ip_forward"]) == "0"


def test_router_keeps_hardened_sysctls(router) -> None:
    eff = router.profile.effective_sysctl()
    expected = {
        "kernel.kptr_restrict": "2",
        "kernel.dmesg_restrict": "1",
        "kernel.yama.ptrace_scope": "1",
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.all.accept_redirects": "0",
        "net.ipv4.tcp_syncookies": "1",
        "fs.protected_symlinks": "1",
        "fs.suid_dumpable": "0",
    }
    for k, v in expected.items():
        assert eff.get(k) == v, k


def test_router_firewall_ports_exact(router) -> None:
    ports = {(p.zone, p.proto, p.port) for p in router.profile.firewall.ports}
    assert ports == {("lan", "tcp", 22), ("lan", "tcp", 9100), ("lan", "tcp", 53), ("lan", "udp", 53),
                     ("lan", "udp", 67), ("lan", "udp", 123),  # NTP: the site's time
                     ("lan", "udp", 69), ("lan", "tcp", 80)}  # + TFTP, HTTP: PXE server
    assert len(router.profile.firewall.ports) == 8
    assert not any(p.zone == "wan" for p in router.profile.firewall.ports)
    assert router.profile.firewall.masquerade == ("wan",)
    assert [(f.src, f.to) for f in router.profile.firewall.forward] == [("lan", "wan")]


def test_router_network_and_overlays(router) -> None:
    p = router.profile
    assert p.network["lan"].addresses == ("10.44.0.1/24",) and p.network["lan"].dhcp4 is False
    assert p.network["wan"].dhcp4 is True
    assert p.overlays == ("base", "hardened", "site-node", "pxe-server", "router")
    assert "cramfs" in p.module_blacklist
    assert "fs/ext4" in router.kernel_module_paths() and "drivers/virtio" in router.kernel_module_paths()
    assert p.abstract is False


def test_config_is_frozen(router) -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        router.profile.packages = ()  # type: ignore[misc]


def test_layers_are_not_roles(repo: Path) -> None:
    assert Repo(repo).roles() == ["control", "desktop", "router", "storage", "workstation-host"]
    msg = config_error(repo, "hardened")
    assert "hardened.yaml" in msg and "abstract" in msg


def test_load_profile_of_layer_works(repo: Path) -> None:
    p = load_profile(Repo(repo), "hardened")
    assert p.abstract is True and "apparmor" in p.packages and "systemd" in p.packages


# --------------------------------------------------------------------------- error cases


def test_unknown_key_with_suggestion(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "\npackages:\n", "\npakages:\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'pakages:')}:" in msg
    assert "unknown key 'pakages'" in msg
    assert "did you mean 'packages'" in msg


def test_unknown_nested_key(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "    dhcp4: false\n", "    dhcp4: false\n    adresses: [10.0.0.1/24]\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'adresses:')}:" in msg
    assert "network.lan.adresses" in msg and "did you mean 'addresses'" in msg


def test_wrong_type_packages(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "packages:\n  - dnsmasq\n  - wireguard-tools\n", "packages: 5\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'packages: 5')}:" in msg
    assert "packages" in msg and "expected a list of strings" in msg and "got 5" in msg


def test_wrong_type_port(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "{zone: lan, proto: udp, port: 53,", '{zone: lan, proto: udp, port: "x",')
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'port: ' + chr(34) + 'x')}:" in msg
    # hardened's ssh port is item 0 of the merged list, site-node's and pxe-server's come next
    assert "firewall.ports[5].port" in msg
    assert "expected an integer" in msg and "'x'" in msg


def test_wrong_literal_proto(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "{zone: lan, proto: udp, port: 67,", "{zone: lan, proto: sctp, port: 67,")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'proto: sctp')}:" in msg
    assert "firewall.ports[6].proto" in msg and "'tcp'" in msg and "'udp'" in msg


def test_port_out_of_range(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "port: 67,", "port: 70000,")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'port: 70000')}:" in msg
    assert "firewall.ports[6].port" in msg and "1-65535" in msg


def test_missing_required_key(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "{zone: lan, proto: udp, port: 67, service: dhcp}", "{zone: lan, proto: udp, port: 67}")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'port: 67}')}:" in msg
    assert "firewall.ports[6]" in msg and "missing required key 'service'" in msg


def test_unknown_role(repo: Path) -> None:
    msg = config_error(repo, "rooter")
    assert "unknown role 'rooter'" in msg
    assert str(repo / "profiles/rooter.yaml") in msg
    assert "known roles: control, desktop, router, storage, workstation-host" in msg


def test_unknown_target(repo: Path) -> None:
    msg = config_error(repo, target="rpi9")
    assert "unknown target 'rpi9'" in msg
    assert str(repo / "images/rpi9.yaml") in msg and "known targets: oci, pxe, qemu" in msg


def test_unknown_arch_argument(repo: Path) -> None:
    msg = config_error(repo, arch="riscv64")
    assert "unknown arch 'riscv64'" in msg and "amd64" in msg and "arm64" in msg


def test_arch_not_in_target(repo: Path) -> None:
    f = repo / "images/qemu.yaml"
    text = f.read_text()
    f.write_text(text[:text.index("\n  arm64:\n")] + text[text.index("\n# NIC n"):])  # an amd64-only target
    msg = config_error(repo, arch="arm64")
    assert str(repo / "images/qemu.yaml") in msg
    assert "arches" in msg and "'arm64'" in msg


def test_unknown_arch_in_target_file(repo: Path) -> None:
    f = repo / "images/qemu.yaml"
    edit(f, "\n  amd64:\n", "\n  riscv64:\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'riscv64:')}:" in msg
    assert "arches.riscv64" in msg and "unknown arch 'riscv64'" in msg


def test_unknown_distro(repo: Path) -> None:
    assert "unknown distro 'gentoo'" in config_error(repo, distro="gentoo")
    # A distro with no backend yet: refused by the host check every build runs before any work.
    with pytest.raises(ConfigError, match="distro 'alpine' is not supported yet"):
        check_build_host([resolve(Repo(repo), "router", distro="alpine")])


def test_extends_missing_parent(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "extends: [site-node, pxe-server]", "extends: hardend")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'extends: hardend')}:" in msg
    assert "extends" in msg and "no profile 'hardend'" in msg
    assert str(repo / "profiles/hardend.yaml") in msg


def test_extends_missing_parent_in_list(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "extends: [site-node, pxe-server]", "extends:\n  - site-node\n  - nosuch")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, '- nosuch')}:" in msg
    assert "no profile 'nosuch'" in msg


def test_extends_cycle(repo: Path) -> None:
    f = repo / "profiles/base.yaml"
    edit(f, "abstract: true\n", "abstract: true\nextends: router\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'extends: router')}:" in msg
    assert "cycle" in msg and "router -> site-node -> hardened -> base -> router" in msg


def test_extends_self(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "extends: [site-node, pxe-server]", "extends: [site-node, router]")
    msg = config_error(repo)
    assert f"{f}:" in msg and "cycle" in msg and "router -> router" in msg


def test_yaml_syntax_error(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "  - dnsmasq\n", "  - dnsmasq: foo: bar\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'dnsmasq: foo: bar')}:" in msg
    assert "invalid YAML" in msg


def test_yaml_not_a_mapping(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    f.write_text("- just\n- a list\n")
    msg = config_error(repo)
    assert f"{f}:1:" in msg and "mapping" in msg


def test_duplicate_key(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "\nvars:\n", "\npackages: [curl]\nvars:\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'packages: [curl]')}:" in msg
    assert "duplicate key 'packages'" in msg


def test_duplicate_nested_key(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "  lease_time: 12h\n", "  lease_time: 12h\n  dhcp_pool_end: 150\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'dhcp_pool_end: 150')}:" in msg
    assert "duplicate key 'dhcp_pool_end'" in msg


def test_role_cannot_change_hardened_sysctl(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "\nvars:\n", "\nsysctl:\n  kernel.kptr_restrict: 0\nvars:\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'kernel.kptr_restrict: 0')}:" in msg
    assert "sysctl.kernel.kptr_restrict" in msg
    h = repo / "profiles/hardened.yaml"
    assert f"{h}:{line_of(h, 'kernel.kptr_restrict:')}" in msg  # where the baseline was set
    assert "sysctl_exceptions" in msg and "reason" in msg


def test_role_may_repeat_hardened_sysctl_value_and_add_new(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "\nvars:\n", "\nsysctl:\n  kernel.kptr_restrict: 2\n  net.core.somaxconn: 1024\nvars:\n")
    eff = resolve(Repo(repo), "router").profile.effective_sysctl()
    assert eff["kernel.kptr_restrict"] == "2" and eff["net.core.somaxconn"] == "1024"


def test_role_cannot_change_hardened_sysctl_via_slash_spelling(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "\nvars:\n", "\nsysctl:\n  kernel/kptr_restrict: 0\nvars:\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'kernel/kptr_restrict: 0')}:" in msg and "kptr_restrict" in msg


def test_sysctl_exception_empty_reason(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    f.write_text(re.sub(r"\n    reason: .*", '\n    reason: "  "', f.read_text(), count=1))
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'reason: ' + chr(34))}:" in msg
    assert "sysctl_exceptions.net.ipv4.ip_forward.reason" in msg and "non-empty reason" in msg


def test_sysctl_exception_missing_reason(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    text = f.read_text()
    f.write_text(re.sub(r"\n    reason: .*", "", text))
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'net.ipv4.ip_forward:')}:" in msg
    assert "sysctl_exceptions.net.ipv4.ip_forward" in msg and "missing required key 'reason'" in msg


def test_firewall_zone_not_an_interface(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "{zone: lan, proto: udp, port: 67", "{zone: dmz, proto: udp, port: 67")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'zone: dmz')}:" in msg
    assert "firewall.ports[6].zone" in msg and "'dmz'" in msg and "interfaces" in msg
    assert "'lan'" in msg and "'wan'" in msg


def test_masquerade_zone_not_an_interface(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "masquerade: [wan]", "masquerade: [wlan]")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'masquerade: [wlan]')}:" in msg
    assert "firewall.masquerade[0]" in msg and "'wlan'" in msg


def test_missing_overlay_directory(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "overlays: [router]", "overlays: [router, nope]")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'overlays: [router, nope]')}:" in msg
    assert "overlays[5]" in msg and str(repo / "overlays/nope") in msg


def test_bad_package_name(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "  - wireguard-tools", "  - Wireguard_Tools")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'Wireguard_Tools')}:" in msg
    assert re.search(r"packages\[\d+\]", msg) and "'Wireguard_Tools'" in msg and "package name" in msg


def test_bad_mode(repo: Path) -> None:
    f = repo / "profiles/hardened.yaml"
    edit(f, '/etc/passwd: {mode: "0644"}', '/etc/passwd: {mode: "rw-r--r--"}')
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'rw-r--r--')}:" in msg
    assert "modes./etc/passwd.mode" in msg and "octal" in msg


def test_target_partition_size(repo: Path) -> None:
    f = repo / "images/qemu.yaml"
    edit(f, "size: 64M", "size: 12Q")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'size: 12Q')}:" in msg
    assert "partitions[0].size" in msg and "'12Q'" in msg and "64M" in msg


def test_target_root_free_size(repo: Path) -> None:
    f = repo / "images/qemu.yaml"
    edit(f, "root_free: 192M", "root_free: 192MB")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'root_free: 192MB')}:" in msg and "root_free" in msg


def test_target_too_few_nics(repo: Path) -> None:
    f = repo / "images/qemu.yaml"
    text = f.read_text()
    f.write_text(re.sub(r"nic_paths:\n(  - .*\n)+", "nic_paths:\n  - pci-0000:00:03.0\n", text))
    msg = config_error(repo)
    assert "nic_paths" in msg and "2 NICs" in msg and "qemu.yaml" in msg


def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("512K") == 512 << 10
    for bad in ("12Q", "64", "1.5G", "", "M", "-1M", "64m"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_size(bad)


def test_dash_spelling_is_an_unknown_key(repo: Path) -> None:
    """One spelling per key: `kernel-modules` must not silently replace inherited `kernel_modules`."""
    f = repo / "profiles/router.yaml"
    edit(f, "kernel_modules:", "kernel-modules:")
    with pytest.raises(ConfigError) as exc:
        resolve(Repo(repo), "router")
    msg = str(exc.value)
    assert "router.yaml:" in msg and "unknown key 'kernel-modules'" in msg and "kernel_modules" in msg


# --------------------------------------------------------------------------- CLI


def _cli(args: list[str], repo: Path, tmp_path: Path,
         path: str = "/nonexistent") -> tuple[subprocess.CompletedProcess, float]:
    env = {"PATH": path, "SOHOCLOUD_REPO": str(repo), "SOHOCLOUD_CACHE": str(tmp_path / "cache"),
           "HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO_ROOT), "LANG": "C.UTF-8"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    return proc, time.monotonic() - t0


def test_cli_build_fails_fast_on_config_error(repo: Path, tmp_path: Path) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "\npackages:\n", "\npakages:\n")
    proc, seconds = _cli(["build", "router", "-o", str(tmp_path / "out")], repo, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{f}:{line_of(f, 'pakages:')}" in proc.stderr
    assert "pakages" in proc.stderr and "Traceback" not in proc.stderr
    # the config error comes before the host tool check (mmdebstrap is not on PATH)
    assert "missing host tools" not in proc.stderr
    assert seconds < 2.0, f"took {seconds:.2f}s"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_cli_build_checks_host_tools_before_any_work(repo: Path, tmp_path: Path) -> None:
    proc, seconds = _cli(["build", "router", "-o", str(tmp_path / "out")], repo, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "missing host tools" in proc.stderr and "mmdebstrap" in proc.stderr
    assert seconds < 2.0
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_cli_list(repo: Path, tmp_path: Path) -> None:
    proc, _ = _cli(["list"], repo, tmp_path, path=os.environ.get("PATH", "/usr/bin:/bin"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(re.fullmatch(r"router\s+--target qemu\s+--arch amd64", line.strip()) for line in lines), lines
    assert not any(line.split()[0] in ("base", "hardened") for line in lines if line.strip())


def test_usb_storage_is_allowed_on_the_nas_only() -> None:
    """hardened blacklists usb-storage; storage (a board's USB disks) excepts it, with a reason, and
    ships the modules; every other role keeps it blocked and unshipped."""
    repo = Repo(REPO_ROOT)
    nas = resolve(repo, "storage", target="rock64", arch="arm64")
    assert "usb-storage" not in nas.profile.effective_module_blacklist()
    assert "USB disks" in nas.profile.module_exceptions["usb-storage"].reason
    assert {"drivers/usb/storage/usb-storage.ko", "drivers/scsi/sd_mod.ko"} <= set(nas.kernel_module_paths())
    for role in ("router", "control", "workstation-host"):
        cfg = resolve(repo, role)
        assert "usb-storage" in cfg.profile.effective_module_blacklist(), role
        assert not any("usb/storage" in m for m in cfg.kernel_module_paths()), role


@pytest.mark.parametrize("entry,expect", [
    ("usbnet: {reason: why}", "module_exceptions.usbnet: 'usbnet' is not in any layer's module_blacklist"),
    ("sctp: {reason: ' '}", "module_exceptions.sctp.reason: a module exception needs a non-empty reason"),
])
def test_a_module_exception_needs_a_blacklisted_module_and_a_reason(repo: Path, entry: str, expect: str) -> None:
    f = repo / "profiles/router.yaml"
    edit(f, "\nvars:\n", f"\nmodule_exceptions:\n  {entry}\nvars:\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, entry)}:" in msg and expect in msg, msg


# --------------------------------------------------------------------------- audit answers


def test_every_role_answers_lynis_with_reasons_and_asks_for_90(repo: Path) -> None:
    for role in ("router", "control", "storage", "workstation-host"):
        p = resolve(Repo(repo), role).profile
        assert p.audit_min_index >= 90, role
        assert p.audit_answers and all(a.reason.strip() for a in p.audit_answers.values()), role


def test_audit_answer_needs_a_lynis_id(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    f.write_text(f.read_text() + "\naudit_answers:\n  not-an-id: {reason: x}\n")
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'not-an-id')}:" in msg and "expected a Lynis test id like FILE-6310" in msg


def test_audit_answer_needs_a_reason(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    f.write_text(f.read_text() + "\naudit_answers:\n  BOOT-5122: {reason: \"  \"}\n")
    msg = config_error(repo)
    assert "audit_answers.BOOT-5122.reason" in msg and "non-empty reason" in msg


# --------------------------------------------------------------------------- services.exposure, services.sandbox


def test_every_role_declares_the_exposure_of_each_service_it_runs(repo: Path) -> None:
    for role in ("router", "control", "storage", "workstation-host"):
        services = resolve(Repo(repo), role).profile.services
        assert services.run() and set(services.run()) <= set(services.exposure), role
    assert resolve(Repo(repo), "router").profile.services.exposure["dnsmasq.service"] < 5


def test_a_service_without_a_declared_exposure_is_refused(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    f.write_text(f.read_text().replace("    dnsmasq.service: 3.4\n", "    chrony.service: 3.7\n"))
    msg = config_error(repo)
    assert "services.exposure" in msg and "no exposure level declared for dnsmasq.service" in msg


def test_an_exposure_level_is_a_number_from_0_to_10(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    f.write_text(f.read_text().replace("    dnsmasq.service: 3.4\n", "    dnsmasq.service: 12\n"))
    msg = config_error(repo)
    assert f"{f}:{line_of(f, 'dnsmasq.service: 12')}:" in msg and "from 0 to 10, got 12" in msg
    f.write_text(f.read_text().replace("dnsmasq.service: 12", "dnsmasq.service: low"))
    assert "services.exposure.dnsmasq.service: expected a number, got 'low'" in config_error(repo)


def test_a_sandboxed_unit_must_be_one_the_role_runs(repo: Path) -> None:
    f = repo / "profiles/router.yaml"
    f.write_text(f.read_text().replace("  sandbox:\n    - dnsmasq.service\n",
                                       "  sandbox:\n    - dnsmasq.service\n    - smbd.service\n"))
    msg = config_error(repo)
    assert f"{f}:{line_of(f, '- smbd.service')}: services.sandbox[" in msg
    assert "'smbd.service' is not a service the role runs" in msg
