"""The code's shape, as the README's "How it is built" describes it: builder/ shows its parts, the
pipeline package lists its stages in order, imports form no circle, no stage imports a later one,
no module takes another's private names, and imports sit at the top (a lazy one says why)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "builder"


def modules() -> dict[str, Path]:
    """Every module of builder/, by dotted name (a package by its own name)."""
    out = {}
    for p in sorted(BUILDER.rglob("*.py")):
        parts = p.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = modules()


def absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, ast.stmt, list[str]]]:
    """(imported module, the statement, names taken from it) of every import of *module*."""
    path = MODULES[module]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, path, node)
            for a in node.names:
                sub = f"{source}.{a.name}"
                out.append((sub, node, []) if sub in MODULES else (source, node, [a.name]))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _n, _names in imports(m) if target in MODULES and target != m} for m in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_builder_shows_its_three_parts_and_shared_helpers_at_its_root():
    entries = {p.name for p in BUILDER.iterdir() if p.name != "__pycache__"}
    packages = {p.name for p in BUILDER.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"image", "fleet", "machine"}
    assert entries - packages == {"__init__.py", "cli.py", "errors.py", "proc.py", "progress.py", "seed.py"}


def test_the_pipeline_package_lists_its_stages_in_order():
    stages = sorted(p.stem for p in (BUILDER / "image").iterdir() if re.match(r"s\d_", p.name))
    assert stages == ["s1_resolve", "s2_rootfs", "s3_customise", "s4_initrd", "s5_assemble", "s6_manifest"]
    assert (BUILDER / "image/s5_assemble/__init__.py").is_file()  # one module per output kind below it
    assert {"backend.py", "debian.py"} <= {p.name for p in (BUILDER / "image/distro").iterdir()}


def test_no_import_circles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def stage_of(module: str) -> int | None:
    m = re.match(r"builder\.image\.(?:s(\d)_\w+|(distro))", module)
    if not m:
        return None
    return int(m.group(1)) if m.group(1) else 2  # the distro backends are stage 2's


def test_no_stage_imports_a_later_stage():
    late = [f"{m} imports {t}" for m, targets in graph().items() for t in targets
            if stage_of(m) is not None and stage_of(t) is not None and stage_of(t) > stage_of(m)]
    assert late == []


def test_the_pipeline_helpers_import_no_stage():
    helpers = ["builder.image.cache", "builder.image.config", "builder.image.schema", "builder.image.yamlsrc",
               "builder.image.identity"]
    assert {m: sorted(t for t in graph()[m] if stage_of(t) is not None) for m in helpers} == {m: [] for m in helpers}


def test_the_parts_depend_one_way():
    """cli -> fleet -> machine -> image: the site runtime boots machines, machines boot artefacts."""
    rank = {"builder.cli": 4, "builder.fleet": 3, "builder.machine": 2, "builder.image": 1}
    part = lambda m: next((p for p in rank if m == p or m.startswith(p + ".")), None)  # noqa: E731
    upward = [f"{m} imports {t}" for m, targets in graph().items() for t in targets
              if part(m) and part(t) and rank[part(t)] > rank[part(m)]]
    assert upward == []


def test_no_module_imports_another_modules_private_names():
    taken = [f"{m} takes {name} from {source}" for m in MODULES for source, _node, names in imports(m)
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert taken == []


def test_imports_sit_at_the_top_and_a_lazy_one_says_why():
    problems = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        first_code = next((n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))), None)
        for n in body:
            if isinstance(n, (ast.Import, ast.ImportFrom)) and first_code and n.lineno > first_code.lineno:
                problems.append(f"{path.relative_to(REPO)}:{n.lineno}: module import after the first statement")
        top = {id(n) for n in body}
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top:
                said = lines[n.lineno - 1] + " " + lines[n.lineno - 2]
                if "lazy" not in said:
                    problems.append(f"{path.relative_to(REPO)}:{n.lineno}: an import inside code without a "
                                    "`lazy: why` comment")
    assert problems == []


@pytest.mark.parametrize("name", ["fleet_up", "_check", "build", "parser"])
def test_the_long_functions_read_as_named_steps(name):
    """The four the structure issue named; each is now a short list of named steps."""
    where = {"fleet_up": "fleet/up.py", "_check": "fleet/sitefile.py", "build": "image/pipeline.py",
             "parser": "cli.py"}[name]
    fn = next(n for n in ast.walk(ast.parse((BUILDER / where).read_text()))
              if isinstance(n, ast.FunctionDef) and n.name == name)
    assert fn.end_lineno - fn.lineno + 1 <= 40


# A hook's only ways to write a file: sohocloud_hooks.write (temp file, fsync, rename) or
# firstboot's write_atomic. The exceptions, each with why.
DIRECT_WRITE_RE = re.compile(r"\.write_text\(|\.write_bytes\(|os\.fdopen\(|os\.open\(|\bopen\([^)]*['\"][wax]")
DIRECT_WRITES_ALLOWED = {
    "control/usr/lib/sohocloud/firstboot.d/40-control": "the LDIFs slapadd loads, in a TemporaryDirectory "
                                                        "removed after: never a file the node keeps",
}


def test_every_role_hook_writes_its_files_atomically():
    found = {}
    for hook in sorted(REPO.glob("overlays/*/usr/lib/sohocloud/*.d/*")):
        if hook.is_file() and not hook.name.endswith(".pyc"):
            lines = [i + 1 for i, line in enumerate(hook.read_text().splitlines()) if DIRECT_WRITE_RE.search(line)]
            rel = str(hook.relative_to(REPO / "overlays"))
            if lines and rel not in DIRECT_WRITES_ALLOWED:
                found[rel] = lines
    assert not found, f"hooks writing files directly (use sohocloud_hooks.write): {found}"
