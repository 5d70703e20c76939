"""Tier 1: the shape of the node program, firstboot/sohocloud_firstboot (a package run by the launcher
firstboot/sohocloud-firstboot): stdlib + PyYAML only, cheap to import, lazy imports that say why,
no module reaching into another's private names, and one copy of the seed's rules (seedrules)."""

from __future__ import annotations

import ast
import base64
import json
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sohocloud_firstboot import network, seedrules, sources, steps

REPO = Path(__file__).resolve().parents[2]
FIRSTBOOT = REPO / "firstboot"
PACKAGE = FIRSTBOOT / "sohocloud_firstboot"
MODULES = sorted(PACKAGE.glob("*.py"))
HOOKS_HELPERS = FIRSTBOOT / "sohocloud_hooks.py"
BUILDER_SEED = REPO / "builder" / "seed.py"
# Each costs a second or more of an emulated first boot (dataclasses: inspect, ast, dis; http.client: email, ssl).
SLOW = {"dataclasses", "inspect", "ast", "typing", "http.client", "email", "ssl", "urllib.request"}


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def top_level_name(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The top-level packages an absolute import statement names (none for a relative one)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    return [] if node.level else [(node.module or "").split(".")[0]]


def in_function_imports(module: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found = []
    for fn in ast.walk(module):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def test_the_package_is_all_there() -> None:
    names = {p.stem for p in MODULES}
    assert {"__init__", "__main__", "main", "seedrules"} <= names and len(names) >= 10
    assert (PACKAGE / "__init__.py").stat().st_size < 400  # importing any submodule runs it


@pytest.mark.parametrize("path", MODULES + [HOOKS_HELPERS], ids=lambda p: p.name)
def test_stdlib_and_yaml_only(path: Path) -> None:
    """Nodes run minimal images: the standard library, plus python3-yaml for the program itself
    (not for seedrules, which the hooks' helpers import too, nor for those helpers)."""
    allowed = set(sys.stdlib_module_names) | {"sohocloud_firstboot"}
    if path.parent == PACKAGE and path.name != "seedrules.py":
        allowed.add("yaml")
    for node in ast.walk(tree(path)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in top_level_name(node):
                assert name in allowed, f"{path.name}:{node.lineno} imports {name!r}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_imports_at_the_top_and_lazy_ones_say_why(path: Path) -> None:
    """A module reads top-down: its imports come before its first function or class. An import
    inside a function (kept there for start-up cost) has a `# lazy: why` comment right above it
    (or above the run of imports it opens)."""
    module = tree(path)
    first_def = min((n.lineno for n in module.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))),
                    default=10**9)
    for node in module.body:
        imports = isinstance(node, (ast.Import, ast.ImportFrom)) or (
            isinstance(node, ast.If) and any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body))
        assert not imports or node.lineno < first_def, f"{path.name}:{node.lineno}: an import below the first def"
    lines = path.read_text().splitlines()
    lazy = in_function_imports(module)
    lazy_lines = {n.lineno for n in lazy}
    for node in lazy:
        above = node.lineno - 1
        while above in lazy_lines:
            above -= 1
        assert lines[above - 1].strip().startswith("# lazy: "), \
            f"{path.name}:{node.lineno}: an in-function import without a '# lazy: why' comment right above it"


@pytest.mark.parametrize("path", MODULES + [HOOKS_HELPERS, BUILDER_SEED], ids=lambda p: p.name)
def test_no_module_imports_another_modules_private_names(path: Path) -> None:
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{path.name}:{node.lineno} imports private {private} from {node.module}"


def test_one_copy_of_the_seed_rules() -> None:
    """builder/seed.py (what `sohocloud` writes), the node program (what it accepts) and the hooks'
    helpers use the very objects of seedrules, not copies of them."""
    from builder import seed as builder_seed

    sys.path.insert(0, str(FIRSTBOOT))
    try:
        import sohocloud_hooks
    finally:
        sys.path.remove(str(FIRSTBOOT))
    for name in ("SSH_KEY_TYPES", "is_public_key", "HOSTNAME_RE", "IFACE_ID_RE", "SEED_FILES", "ADMIN"):
        assert getattr(builder_seed, name) is getattr(seedrules, name), f"builder.seed.{name}"
    assert builder_seed.CIDATA_LABEL in seedrules.CIDATA_LABELS
    assert sohocloud_hooks.SSH_KEY_TYPES is seedrules.SSH_KEY_TYPES
    assert sohocloud_hooks.NAME_RE is seedrules.LABEL_RE
    assert steps.is_public_key is seedrules.is_public_key and steps.valid_hostname is seedrules.valid_hostname
    assert steps.ADMIN is seedrules.ADMIN
    assert network.IFACE_ID_RE is seedrules.IFACE_ID_RE
    assert sources.SEED_FILES is seedrules.SEED_FILES and sources.CIDATA_LABELS is seedrules.CIDATA_LABELS
    # The hooks' ssh_key() is seedrules' check (an empty value is refused, not an IndexError).
    blob = len(b"ssh-ed25519").to_bytes(4, "big") + b"ssh-ed25519" + (32).to_bytes(4, "big") + bytes(range(32))
    key = f"ssh-ed25519 {base64.b64encode(blob).decode()} alice@test"
    assert sohocloud_hooks.ssh_key(f" {key} ", "k") == key
    for bad in ("", "ssh-ed25519 AAAA", key + "\nssh-ed25519 x", 42):
        with pytest.raises(SystemExit):
            sohocloud_hooks.ssh_key(bad, "k")
    # No copy of a rule's text left anywhere but seedrules.
    hostname_re = seedrules.HOSTNAME_RE.pattern
    for path in [p for p in MODULES if p.name != "seedrules.py"] + [HOOKS_HELPERS, BUILDER_SEED]:
        text = path.read_text()
        assert '"ssh-ed25519"' not in text and "def is_public_key" not in text, path.name
        assert hostname_re not in text and seedrules.IFACE_ID_RE.pattern not in text, path.name
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
                value = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
                assert not value.startswith(seedrules.USER_DATA_HEADER), f"{path.name}:{node.lineno}"


def test_the_package_imports_nothing_slow() -> None:
    """The first boot's start-up (ported from test_customise's check of the single-file program): the
    program and the hooks' helpers keep dataclasses, typing and http.client out of their imports, and
    the program keeps urllib.request, socket and runpy until a seed needs them."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); "
             "import sohocloud_firstboot.main; print(' '.join(sorted(set(sys.modules) - before))); "
             "import sohocloud_hooks; print(' '.join(sorted(set(sys.modules) - before)))")
    p = subprocess.run([sys.executable, "-c", probe, str(FIRSTBOOT)], capture_output=True, text=True, check=True)
    program, with_helpers = (set(line.split()) for line in p.stdout.splitlines())
    assert {"sohocloud_firstboot.main", "sohocloud_firstboot.seedrules", "yaml"} <= program  # the right imports
    assert "sohocloud_hooks" in with_helpers
    assert not with_helpers & SLOW
    assert not program & {"socket", "runpy", "traceback"}


def test_runs_from_its_bytecode_beside_the_launcher(tmp_path: Path) -> None:
    """A node's layout: the launcher and the package side by side in /usr/lib/sohocloud, the package
    byte-compiled at build time (unchecked hash, as the image build does): the launcher runs it, and
    Python takes the shipped bytecode even when the source looks newer."""
    lib = tmp_path / "usr/lib/sohocloud"
    lib.mkdir(parents=True)
    shutil.copy2(FIRSTBOOT / "sohocloud-firstboot", lib)
    shutil.copytree(PACKAGE, lib / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    for src in sorted((lib / PACKAGE.name).glob("*.py")):
        pyc = src.parent / "__pycache__" / f"{src.stem}.{sys.implementation.cache_tag}.pyc"
        py_compile.compile(str(src), cfile=str(pyc), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    main_py = lib / PACKAGE.name / "main.py"
    main_py.write_text(main_py.read_text() + "\nFROM_SOURCE = True\n")  # newer source: the bytecode still wins
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import sohocloud_firstboot.main as m; "
             "print(m.__file__, hasattr(m, 'FROM_SOURCE'))")
    p = subprocess.run([sys.executable, "-c", probe, str(lib)], capture_output=True, text=True, check=True, env=env)
    assert p.stdout.split() == [str(main_py), "False"]
    r = subprocess.run([sys.executable, str(lib / "sohocloud-firstboot"), "--help"], capture_output=True, text=True,
                       check=False, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: sohocloud-firstboot")


SYS_PATH_HOOK = """#!/usr/bin/python3
import json, os, sys
with open(os.environ["REPORT"], "w") as f:
    json.dump({"path": sys.path, "forked": "sohocloud_firstboot" in sys.modules}, f)
"""


def test_a_forked_hook_does_not_see_the_launchers_folder(tmp_path: Path) -> None:
    """Run by the launcher, firstboot's folder (the package's parent) is first on sys.path; a
    Python hook forked from it gets the sys.path of `python3 HOOK`, without that folder."""
    from test_firstboot import make_root, make_seed  # a sibling: tests/unit is on sys.path

    root = make_root(tmp_path / "root")
    hook_dir = root / "usr/lib/sohocloud/firstboot.d"
    hook_dir.mkdir(parents=True)
    hook = hook_dir / "10-report"
    hook.write_text(SYS_PATH_HOOK)
    hook.chmod(0o755)
    env = {**os.environ, "SOHOCLOUD_RUN_HOOKS": "1", "REPORT": str(tmp_path / "fork.json")}
    env.pop("PYTHONPATH", None)  # the launcher finds the package beside it; nothing else puts firstboot/ on the path
    r = subprocess.run([sys.executable, str(FIRSTBOOT / "sohocloud-firstboot"), "--root", str(root), "--no-system",
                        "--seed-dir", str(make_seed(tmp_path / "seed"))], capture_output=True, text=True, check=False,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    forked = json.loads((tmp_path / "fork.json").read_text())
    env["REPORT"] = str(tmp_path / "exec.json")
    subprocess.run([sys.executable, str(hook)], env=env, check=True, timeout=60)
    execed = json.loads((tmp_path / "exec.json").read_text())
    assert forked["forked"] and not execed["forked"]
    assert forked["path"] == execed["path"] and str(FIRSTBOOT) not in forked["path"]


def test_runs_as_a_module() -> None:
    r = subprocess.run([sys.executable, "-m", "sohocloud_firstboot", "--help"], capture_output=True, text=True,
                       check=False, cwd=FIRSTBOOT, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: sohocloud-firstboot")
