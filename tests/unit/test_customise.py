"""Tier 1: stage 3 (builder/s3_customise.py) on small fake trees, and the real overlays rendered for the router."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from builder.errors import ConfigError
from builder.image.distro.debian import installed_packages
from builder.image.identity import identity
from builder.image.s1_resolve import Repo, resolve
from builder.image.s3_customise import (
    FIRSTBOOT_DIR,
    add_user,
    apply_edits,
    apply_modes,
    apply_preset,
    clear_setid,
    customise_inputs,
    install_firstboot,
    lock_passwords,
    network_units,
    remove_machine_identity,
    render_overlay,
    template_context,
    write_preset,
)
from builder.image.schema import ConfigEdit, FileMode, Port, User

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef" * 4

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="render_overlay/apply_modes chown to root: needs root")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


# --------------------------------------------------------------------------- render_overlay (fake trees)


@needs_root
def test_render_overlay_renders_templates_and_copies_files(tmp_path: Path) -> None:
    src, dest = tmp_path / "overlay", tmp_path / "root"
    (src / "etc/app").mkdir(parents=True)
    (src / "etc/app/app.conf.j2").write_text("role={{ role }}\n{% for p in ports %}port={{ p }}\n{% endfor %}")
    (src / "etc/app/plain.txt").write_text("{{ not rendered }}\n")
    (src / "etc/app/script.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "etc/app/script.sh", 0o755)  # checkout mode is ignored
    os.chmod(src / "etc/app/plain.txt", 0o600)
    dest.mkdir()

    old_umask = os.umask(0)  # modes must not depend on the builder's umask either
    try:
        written = render_overlay(src, dest, {"role": "router", "ports": [22, 53]})
    finally:
        os.umask(old_umask)

    assert sorted(written) == ["/etc/app/app.conf", "/etc/app/plain.txt", "/etc/app/script.sh"]
    assert (dest / "etc/app/app.conf").read_text() == "role=router\nport=22\nport=53\n"
    assert not (dest / "etc/app/app.conf.j2").exists()
    assert (dest / "etc/app/plain.txt").read_text() == "{{ not rendered }}\n"
    for rel in ("etc/app/app.conf", "etc/app/plain.txt", "etc/app/script.sh"):
        st = (dest / rel).lstat()
        assert stat.S_IMODE(st.st_mode) == 0o644, rel
        assert (st.st_uid, st.st_gid) == (0, 0), rel
    assert mode(dest / "etc/app") == 0o755


@needs_root
def test_render_overlay_is_strict_about_undefined(tmp_path: Path) -> None:
    src, dest = tmp_path / "overlay", tmp_path / "root"
    (src / "etc").mkdir(parents=True)
    tpl = src / "etc/broken.conf.j2"
    tpl.write_text("ok\nvalue={{ vars.nope }}\n")
    dest.mkdir()
    with pytest.raises(ConfigError) as ei:
        render_overlay(src, dest, {"vars": {}})
    assert str(tpl) in str(ei.value) and "nope" in str(ei.value)
    assert not (dest / "etc/broken.conf").exists()


@needs_root
def test_render_overlay_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    src, dest = tmp_path / "overlay", tmp_path / "root"
    (src / "etc").mkdir(parents=True)
    tpl = src / "etc/bad.conf.j2"
    tpl.write_text("line1\nline2\n{% if %}\n{% endif %}\n")
    dest.mkdir()
    with pytest.raises(ConfigError) as ei:
        render_overlay(src, dest, {})
    assert f"{tpl}:3" in str(ei.value) and "template error" in str(ei.value)


@needs_root
def test_render_overlay_keeps_symlinks_and_does_not_write_through_them(tmp_path: Path) -> None:
    src, dest, outside = tmp_path / "overlay", tmp_path / "root", tmp_path / "outside.conf"
    (src / "etc").mkdir(parents=True)
    (src / "etc/real.conf").write_text("new\n")
    os.symlink("real.conf", src / "etc/alias.conf")
    (dest / "etc").mkdir(parents=True)
    outside.write_text("precious\n")
    os.symlink(outside, dest / "etc/real.conf")  # the tree has a symlink where the overlay puts a file

    written = render_overlay(src, dest, {})

    assert "/etc/alias.conf" in written
    assert os.readlink(dest / "etc/alias.conf") == "real.conf"
    assert not (dest / "etc/real.conf").is_symlink()
    assert (dest / "etc/real.conf").read_text() == "new\n"
    assert outside.read_text() == "precious\n"


# --------------------------------------------------------------------------- real overlays for the router


@pytest.fixture(scope="module")
def router():
    return resolve(Repo(REPO_ROOT), "router")


@pytest.fixture(scope="module")
def rendered(router, tmp_path_factory) -> Path:
    if not IS_ROOT:
        pytest.skip("render_overlay chowns to root: needs root")
    dest = tmp_path_factory.mktemp("router-tree")
    ctx = template_context(router, identity(KEY))
    for name in router.profile.overlays:
        render_overlay(router.repo.overlays / name, dest, ctx)
    return dest


def _rule_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _chain(text: str, name: str) -> str:
    start = text.index(f"chain {name} {{")
    return text[start:text.index("}", text.index("policy", start) + 1)]


def test_nftables_default_drop(rendered: Path) -> None:
    text = (rendered / "etc/nftables.conf").read_text()
    assert "policy drop;" in _chain(text, "input")
    assert "policy drop;" in _chain(text, "forward")
    assert "flush ruleset" in text


def test_nftables_opens_exactly_the_declared_lan_ports(rendered: Path) -> None:
    text = (rendered / "etc/nftables.conf").read_text()
    lines = _rule_lines(text)
    assert 'iifname "lan" tcp dport { 22, 9100, 80, 53 } accept' in lines
    assert 'iifname "lan" udp dport { 69, 53, 67, 123 } accept' in lines
    dport_rules = [line for line in lines if " dport { " in line]
    assert len(dport_rules) == 2, dport_rules


def test_nftables_opens_nothing_on_wan(rendered: Path) -> None:
    text = (rendered / "etc/nftables.conf").read_text()
    input_chain = _chain(text, "input")
    assert '"wan"' not in input_chain
    assert 'iifname "lan" oifname "wan" accept' in _chain(text, "forward")
    assert 'iifname "wan" oifname "lan" accept' not in text


def test_nftables_masquerades_on_wan(rendered: Path) -> None:
    text = (rendered / "etc/nftables.conf").read_text()
    assert "type nat hook postrouting" in text
    assert 'oifname "wan" masquerade' in _rule_lines(text)
    assert 'oifname "lan" masquerade' not in text


def test_nftables_ruleset_parses(rendered: Path, tmp_path: Path) -> None:
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if not nft:
        pytest.skip("nft not installed")
    conf = tmp_path / "nftables.conf"
    conf.write_text((rendered / "etc/nftables.conf").read_text().replace(
        'include "/etc/nftables.d/*.nft"', ""))
    proc = subprocess.run([nft, "-c", "-f", str(conf)], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0 and ("Operation not permitted" in proc.stderr or "permission" in proc.stderr.lower()):
        pytest.skip(f"nft -c not permitted here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def control_nft(tmp_path_factory) -> str:
    """The control role's rendered nftables.conf (the hardened overlay's template)."""
    if not IS_ROOT:
        pytest.skip("render_overlay chowns to root: needs root")
    control = resolve(Repo(REPO_ROOT), "control")
    dest = tmp_path_factory.mktemp("control-tree")
    render_overlay(REPO_ROOT / "overlays/hardened", dest, template_context(control, identity(KEY)))
    return (dest / "etc/nftables.conf").read_text()


def test_cluster_ports_answer_the_sites_nodes_only(control_nft: str) -> None:
    """Swarm's ports (peers: site) need a source in site_hosts; ESP too; the rest of the LAN ports
    answer the zone."""
    lines = _rule_lines(control_nft[control_nft.index("chain input {"):control_nft.index("chain forward {")])
    assert 'iifname "lan" ip saddr @site_hosts tcp dport { 7946, 2377 } accept' in lines
    assert 'iifname "lan" ip saddr @site_hosts udp dport { 7946, 4789 } accept' in lines
    assert 'iifname "lan" ip saddr @site_hosts meta l4proto esp accept' in lines
    assert 'ip saddr @site_hosts iifname . meta l4proto . th dport @site_ports accept' in lines
    open_rule = next(line for line in lines if line.startswith('iifname "lan" tcp dport {'))
    assert "636" in open_rule and "2377" not in open_rule and "7946" not in open_rule


def test_ruleset_with_the_seeds_elements_parses(control_nft: str, tmp_path: Path) -> None:
    """What firstboot hooks add (site hosts, k3s's site ports, VPN forwarding) loads with the ruleset."""
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if not nft:
        pytest.skip("nft not installed")
    conf = tmp_path / "nftables.conf"
    conf.write_text(control_nft.replace('include "/etc/nftables.d/*.nft"', "\n".join([
        "add element inet filter site_hosts { 10.44.0.1, 10.44.0.2 }",
        'add element inet filter site_ports { "lan" . tcp . 6443 }',
        'add element inet filter seed_ports { "wg0" . udp . 53 }',
        'add element inet filter seed_forward { "wg0" . "lan" . 10.44.0.3 . tcp . 445, '
        '"wg0" . "lan" . 10.44.0.2 . udp . 0-65535 }'])))
    proc = subprocess.run([nft, "-c", "-f", str(conf)], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0 and ("Operation not permitted" in proc.stderr or "permission" in proc.stderr.lower()):
        pytest.skip(f"nft -c not permitted here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr


def _sysctl_file(rendered: Path) -> Path:
    files = sorted((rendered / "etc/sysctl.d").glob("*sohocloud*.conf"))
    assert len(files) == 1, files
    return files[0]


def test_sysctl_file(rendered: Path) -> None:
    lines = _sysctl_file(rendered).read_text().splitlines()
    assert "kernel.kptr_restrict = 2" in lines
    assert "net.ipv4.conf.all.rp_filter = 1" in lines
    i = lines.index("net.ipv4.ip_forward = 1")
    assert lines[i - 1].startswith("# ") and "forwards LAN traffic" in lines[i - 1]
    assert "net.ipv4.ip_forward = 0" not in lines
    assert sum(1 for line in lines if line.startswith("net.ipv4.ip_forward")) == 1


def test_sshd_socket_bound_to_lan(rendered: Path) -> None:
    lines = (rendered / "usr/lib/systemd/system/sohocloud-sshd.socket").read_text().splitlines()
    assert "BindToDevice=lan" in lines
    assert "ListenStream=22" in lines
    assert not any(line.startswith("BindToDevice=") and line != "BindToDevice=lan" for line in lines)


def test_modprobe_blacklist_and_modules_load(rendered: Path, router) -> None:
    bl = (rendered / "etc/modprobe.d/sohocloud-blacklist.conf").read_text().splitlines()
    assert "blacklist cramfs" in bl and "install cramfs /bin/true" in bl
    assert "install usb-storage /bin/true" in bl
    ml = _rule_lines((rendered / "etc/modules-load.d/sohocloud.conf").read_text())
    assert ml == list(router.profile.modules_load)
    assert "nf_tables" in ml and "nft_masq" in ml


def test_rendered_tree_has_no_templates_and_is_root_0644(rendered: Path) -> None:
    files = [p for p in rendered.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert not p.name.endswith(".j2"), p
        assert mode(p) == 0o644, p
        assert p.stat().st_uid == 0, p


def test_ssh_zone_must_be_unique(router) -> None:
    fw = router.profile.firewall
    two = dataclasses.replace(fw, ports=fw.ports + (Port("wan", "tcp", 22, "ssh"),))
    cfg = dataclasses.replace(router, profile=dataclasses.replace(router.profile, firewall=two))
    with pytest.raises(ConfigError, match="exactly one zone"):
        template_context(cfg, identity(KEY))


def test_ports_by_zone_dedupes_and_groups(router) -> None:
    fw = router.profile.firewall
    dup = dataclasses.replace(fw, ports=fw.ports + (Port("lan", "tcp", 53, "dns-again"),))
    cfg = dataclasses.replace(router, profile=dataclasses.replace(router.profile, firewall=dup))
    ctx = template_context(cfg, identity(KEY))
    assert ctx["ports_by_zone"] == {"lan": {"tcp": [22, 9100, 80, 53], "udp": [69, 53, 67, 123]}}
    assert ctx["ssh_zone"] == "lan" and ctx["role"] == "router" and ctx["identity"] == identity(KEY)


def test_customise_inputs_track_overlay_changes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("profiles", "images", "overlays", "firstboot"):
        shutil.copytree(REPO_ROOT / name, repo / name, symlinks=True)
    before = customise_inputs(resolve(Repo(repo), "router"))
    assert {"profile", "target", "firstboot", "overlay:base", "overlay:hardened", "overlay:router"} <= set(before)
    f = repo / "overlays/hardened/etc/nftables.d/README"
    f.write_text(f.read_text() + "changed\n")
    after = customise_inputs(resolve(Repo(repo), "router"))
    assert [k for k in before if before[k] != after[k]] == ["overlay:hardened"]


# --------------------------------------------------------------------------- accounts


def _fake_etc(root: Path) -> Path:
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "bob:x:1000:1000::/home/bob:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text("root:x:0:\nshadow:x:42:\nsudo:x:27:bob\nbob:x:1000:\nusers:x:100:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\nbob:!:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\nshadow:*::\nsudo:*::bob\nbob:!::\nusers:*::\n")
    os.chmod(etc / "shadow", 0o640)
    os.chmod(etc / "gshadow", 0o640)
    (etc / "skel").mkdir()
    (etc / "skel/.bashrc").write_text("# bashrc\n")
    return etc


def _rows(path: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}


@needs_root
def test_add_user(tmp_path: Path) -> None:
    etc = _fake_etc(tmp_path)
    uid = add_user(tmp_path, User(name="admin", groups=("sudo",), shell="/bin/bash", sudo_nopasswd=True))
    assert uid == 1001  # 1000 is taken by bob

    assert _rows(etc / "passwd")["admin"] == ["admin", "x", "1001", "1001", "", "/home/admin", "/bin/bash"]
    assert _rows(etc / "group")["admin"] == ["admin", "x", "1001", ""]
    assert _rows(etc / "group")["sudo"][3].split(",") == ["bob", "admin"]
    sh = _rows(etc / "shadow")["admin"]
    assert sh[1] == "*" and len(sh) == 9
    assert _rows(etc / "gshadow")["admin"][1] == "!"
    assert _rows(etc / "gshadow")["sudo"][3].split(",") == ["bob", "admin"]
    assert mode(etc / "shadow") == 0o640 and mode(etc / "gshadow") == 0o640  # modes kept

    sudoers = etc / "sudoers.d/90-admin"
    assert mode(sudoers) == 0o440
    assert "admin ALL=(ALL:ALL) NOPASSWD: ALL" in sudoers.read_text().splitlines()

    home = tmp_path / "home/admin"
    assert mode(home) == 0o750 and home.stat().st_uid == 1001
    assert (home / ".bashrc").read_text() == "# bashrc\n" and (home / ".bashrc").stat().st_uid == 1001

    # idempotent: same uid, no second row
    assert add_user(tmp_path, User(name="admin", groups=("sudo",))) == 1001
    assert [line.split(":")[0] for line in (etc / "passwd").read_text().splitlines()].count("admin") == 1


@needs_root
def test_add_user_without_sudo_nopasswd_has_no_sudoers(tmp_path: Path) -> None:
    etc = _fake_etc(tmp_path)
    assert add_user(tmp_path, User(name="carol", uid=2000)) == 2000
    assert not (etc / "sudoers.d").exists()
    assert _rows(etc / "group")["sudo"][3] == "bob"


def test_add_user_unknown_group(tmp_path: Path) -> None:
    etc = _fake_etc(tmp_path)
    before = (etc / "passwd").read_text()
    with pytest.raises(ConfigError, match="group 'wheel'"):
        add_user(tmp_path, User(name="admin", groups=("wheel",)))
    assert (etc / "passwd").read_text() == before


def test_lock_passwords(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "shadow").write_text(
        "root:$6$salt$hash:19000:0:99999:7:::\n"
        "daemon:*:19000:0:99999:7:::\n"
        "bob:!:19000:0:99999:7:::\n"
        "eve::19000:0:99999:7:::\n"
        "mallory:!$6$salt$hash:19000:0:99999:7:::\n")
    os.chmod(etc / "shadow", 0o640)
    changed = lock_passwords(tmp_path)
    assert sorted(changed) == ["eve", "root"]
    rows = _rows(etc / "shadow")
    assert rows["root"][1] == "*" and rows["eve"][1] == "*"
    assert rows["daemon"][1] == "*" and rows["bob"][1] == "!" and rows["mallory"][1] == "!$6$salt$hash"
    assert rows["root"][2:] == ["19000", "0", "99999", "7", "", "", ""]
    assert mode(etc / "shadow") == 0o640


# --------------------------------------------------------------------------- files


LOGIN_DEFS = """\
# UMASK is the default umask value for pam_umask
UMASK\t\t022
UMASKED yes
#PASS_MAX_DAYS\t99999
PASS_MIN_DAYS\t0
PASS_MIN_DAYS\t0
MAIL_DIR\t/var/mail
"""


def test_apply_edits(tmp_path: Path) -> None:
    f = tmp_path / "etc/login.defs"
    f.parent.mkdir()
    f.write_text(LOGIN_DEFS)
    edit = ConfigEdit(file="/etc/login.defs", separator="\t",
                      set={"UMASK": "027", "PASS_MAX_DAYS": "365", "PASS_MIN_DAYS": "1", "LOGIN_RETRIES": "3"})
    apply_edits(tmp_path, [edit])
    expected = [
        "# UMASK is the default umask value for pam_umask",
        "UMASK\t027",
        "UMASKED yes",
        "PASS_MAX_DAYS\t365",
        "PASS_MIN_DAYS\t1",
        "MAIL_DIR\t/var/mail",
        "LOGIN_RETRIES\t3",
    ]
    assert f.read_text().splitlines() == expected
    apply_edits(tmp_path, [edit])  # idempotent
    assert f.read_text().splitlines() == expected


def test_apply_edits_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="/etc/nope.conf"):
        apply_edits(tmp_path, [ConfigEdit(file="/etc/nope.conf", set={"A": "1"})])


@needs_root
def test_apply_modes(tmp_path: Path) -> None:
    etc = _fake_etc(tmp_path)
    (etc / "sudoers.d").mkdir()
    (etc / "sudoers.d/90-admin").write_text("x\n")
    (etc / "sudoers.d/README").write_text("x\n")
    target = tmp_path / "target-of-link"
    target.write_text("x\n")
    os.chmod(target, 0o644)
    os.symlink(target, etc / "sudoers.d/link")
    (etc / "shadow-").write_text("backup\n")
    os.chmod(etc / "shadow-", 0o600)
    os.chmod(etc / "shadow", 0o600)
    modes = {"/etc/shadow": FileMode("0640", "root:shadow"), "/etc/sudoers.d/*": FileMode("0440")}

    n = apply_modes(tmp_path, modes)

    assert n == 3
    st = (etc / "shadow").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (0, 42)
    assert mode(etc / "sudoers.d/90-admin") == 0o440 and mode(etc / "sudoers.d/README") == 0o440
    assert mode(target) == 0o644  # symlinks are not followed
    assert mode(etc / "shadow-") == 0o600  # not matched by '/etc/shadow'


def test_apply_modes_unknown_owner(tmp_path: Path) -> None:
    etc = _fake_etc(tmp_path)
    (etc / "x.conf").write_text("")
    with pytest.raises(ConfigError, match="'nosuchgroup'"):
        apply_modes(tmp_path, {"/etc/x.conf": FileMode("0644", "root:nosuchgroup")})


def test_remove_machine_identity(tmp_path: Path) -> None:
    ssh = tmp_path / "etc/ssh"
    ssh.mkdir(parents=True)
    for n in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key", "sshd_config"):
        (ssh / n).write_text("k\n")
    (tmp_path / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    for rel in ("var/lib/dbus/machine-id", "var/lib/systemd/random-seed"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")

    remove_machine_identity(tmp_path)

    assert sorted(p.name for p in ssh.iterdir()) == ["sshd_config"]
    mid = tmp_path / "etc/machine-id"
    assert mid.read_text() == "" and mode(mid) == 0o444  # a new id at boot, no systemd first boot
    assert not (tmp_path / "var/lib/dbus/machine-id").exists()
    assert not (tmp_path / "var/lib/systemd/random-seed").exists()


def test_node_modules_ship_their_bytecode(tmp_path: Path) -> None:
    """firstboot and the hooks' helpers are byte-compiled at build time (compiling them on a
    node is time on its emulated path to SSH) and the node's Python uses that bytecode."""
    import sys

    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    tag = sys.implementation.cache_tag
    (tmp_path / f"usr/lib/python{ver}").mkdir(parents=True)
    (tmp_path / "usr/lib/systemd/system").mkdir(parents=True)
    install_firstboot(REPO_ROOT / "firstboot", tmp_path)
    lib = tmp_path / FIRSTBOOT_DIR
    assert (lib / "sohocloud-firstboot").read_bytes() == (REPO_ROOT / "firstboot/sohocloud-firstboot").read_bytes()
    modules = sorted(p.stem for p in (REPO_ROOT / "firstboot/sohocloud_firstboot").glob("*.py"))
    assert {"main", "seedrules"} <= set(modules)
    for folder, name in [(lib / "sohocloud_firstboot", m) for m in modules] + [(lib, "sohocloud_hooks")]:
        assert (folder / f"{name}.py").is_file()
        pyc = folder / "__pycache__" / f"{name}.{tag}.pyc"
        assert pyc.stat().st_size > 100, pyc
    assert sorted(p.name for p in (tmp_path / "usr/lib/systemd/system").iterdir()) == \
        ["sohocloud-firstboot.service", "sohocloud-online.service"]
    # Python takes the shipped .pyc (an unchecked-hash one): the source may even be newer.
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); sys.dont_write_bytecode = True; "
             "import sohocloud_hooks, sohocloud_firstboot.main as m; print(sohocloud_hooks.__cached__, m.__cached__)")
    for p in [lib / "sohocloud_hooks.py", *(lib / "sohocloud_firstboot").glob("*.py")]:
        os.utime(p)
    p = subprocess.run([sys.executable, "-c", probe, str(lib)], capture_output=True, text=True, check=True)
    hooks_pyc, main_pyc = p.stdout.split()
    assert hooks_pyc.endswith(f"sohocloud_hooks.{tag}.pyc") and main_pyc.endswith(f"main.{tag}.pyc")


def test_node_modules_import_nothing_slow(tmp_path: Path) -> None:
    """The first boot's start-up: firstboot and the hooks' helpers keep dataclasses, typing and
    http.client (email, ssl) out of their imports; each costs a second or more under emulation."""
    import sys

    probe = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); "
             "import sohocloud_firstboot.main, sohocloud_hooks; "
             "print(' '.join(sorted(set(sys.modules) - before)))")
    p = subprocess.run([sys.executable, "-c", probe, str(REPO_ROOT / "firstboot")], capture_output=True, text=True,
                       check=True)
    loaded = set(p.stdout.split())
    assert {"sohocloud_firstboot.main", "sohocloud_hooks", "yaml"} <= loaded  # we are looking at the right imports
    assert not loaded & {"dataclasses", "inspect", "ast", "typing", "http.client", "email", "ssl", "urllib.request"}


def test_build_applies_the_preset_not_the_first_boot(tmp_path: Path) -> None:
    """The build applies the role's preset (systemd's first-boot preset-all, enable-only) with the
    host's systemctl; the image's machine-id is empty, so the node's systemd skips it."""
    from builder.image.schema import Services

    unit_dir = tmp_path / "usr/lib/systemd/system"
    unit_dir.mkdir(parents=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    for name in ("wanted.service", "stray.service"):
        (unit_dir / name).write_text("[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    write_preset(tmp_path, Services(enable=("wanted.service",), disable=(), mask=()))
    apply_preset(tmp_path)
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == ["wanted.service"]


def test_remove_machine_identity_replaces_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "host-machine-id"
    outside.write_text("hostid\n")
    (tmp_path / "root/etc").mkdir(parents=True)
    os.symlink(outside, tmp_path / "root/etc/machine-id")
    remove_machine_identity(tmp_path / "root")
    assert not (tmp_path / "root/etc/machine-id").is_symlink()
    assert outside.read_text() == "hostid\n"


# --------------------------------------------------------------------------- network


def _ini(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_network_units_router(router) -> None:
    units = network_units(router)
    assert set(units) == {
        "etc/systemd/network/20-sohocloud-wan.link", "etc/systemd/network/20-sohocloud-lan.link",
        "etc/systemd/network/50-sohocloud-wan.network", "etc/systemd/network/50-sohocloud-lan.network"}
    for i, name in enumerate(("wan", "lan")):
        link = _ini(units[f"etc/systemd/network/20-sohocloud-{name}.link"])
        assert link == ["[Match]", f"Path={router.target.nic_paths[i]}", "[Link]", f"Name={name}"]
    # PCI slot 3 and 4: on q35 (ACPI) and on arm64 virt's device-tree PCIe host alike
    assert [p.split()[0] for p in router.target.nic_paths[:2]] == ["pci-0000:00:03.0", "pci-0000:00:04.0"]
    assert router.target.nic_paths[0].split()[1] == "platform-*.pcie-pci-0000:00:03.0"

    lan = _ini(units["etc/systemd/network/50-sohocloud-lan.network"])
    assert "Name=lan" in lan and "Address=10.44.0.1/24" in lan
    assert not any(line.startswith("DHCP") for line in lan)
    assert not any(line.startswith("Gateway") for line in lan)

    wan = _ini(units["etc/systemd/network/50-sohocloud-wan.network"])
    assert "Name=wan" in wan and "DHCP=ipv4" in wan
    assert not any(line.startswith("Address=") for line in wan)


# --------------------------------------------------------------------------- packages


def test_installed_packages(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(
        "Package: zlib1g\nStatus: install ok installed\nPriority: optional\nVersion: 1:1.2.13.dfsg-1\n"
        "Description: compression library\n multi-line\n .\n more\n\n"
        "Package: oldpkg\nStatus: deinstall ok config-files\nVersion: 1.0\n\n"
        "Package: half\nStatus: install reinstreq half-installed\nVersion: 2.0\n\n"
        "Package: dnsmasq\nStatus: install ok installed\nVersion: 2.89-1\n")
    assert installed_packages(tmp_path) == {"dnsmasq": "2.89-1", "zlib1g": "1:1.2.13.dfsg-1"}
    assert list(installed_packages(tmp_path)) == ["dnsmasq", "zlib1g"]


def test_clear_setid_clears_only_the_setid_bits_of_regular_files(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    su, wall, plain = tmp_path / "usr/bin/su", tmp_path / "usr/bin/wall", tmp_path / "usr/bin/plain"
    for p, m in ((su, 0o4755), (wall, 0o2755), (plain, 0o755)):
        p.write_text("x")
        os.chmod(p, m)
    (tmp_path / "usr/bin/link").symlink_to("su")
    assert clear_setid(tmp_path) == ["/usr/bin/su", "/usr/bin/wall"]
    assert (mode(su), mode(wall), mode(plain)) == (0o755, 0o755, 0o755)


def test_the_desktop_template_is_locked_down_as_data() -> None:
    p = resolve(Repo(REPO_ROOT), "desktop", target="oci").profile
    assert p.setid == "strip"
    assert {"/usr/bin/apt*", "/usr/bin/dpkg*", "/usr/lib/apt"} <= set(p.strip_paths)
    assert not {"sudo", "gcc", "cc", "build-essential", "apt"} & set(p.packages)
