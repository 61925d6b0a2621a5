"""The package's shape, read from the source with `ast`: layers, import loops, sizes.

The layer order is the one the README's "Architecture" section documents; a module may import
its own layer and any layer below, never one above, and no chain of imports may loop. Imports
inside functions count too, and are allowed only for an optional or heavy dependency, with a
comment on the line saying which ('# optional: ...' or '# heavy: ...').
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

from conftest import REPO

PKG = REPO / "gptjax"

# Bottom up. A module's layer is that of its longest matching prefix.
LAYERS = [
    ("config + sharding", ["gptjax.config", "gptjax.sharding", "gptjax.defaults",
                           "gptjax.plotting", "gptjax.multihost", "gptjax.checks",
                           "gptjax.glibc"]),
    ("nn", ["gptjax.nn"]),
    ("data", ["gptjax.data"]),
    ("runs", ["gptjax.runs"]),
    ("train | inference", ["gptjax.train", "gptjax.inference"]),
    ("eval", ["gptjax.eval"]),
    ("finetune", ["gptjax.finetune"]),
    ("sweep + cli", ["gptjax.sweep", "gptjax.cli"]),
]
# Packages on one floor are siblings: none imports another, though both stand on the floors below.
SIBLINGS = [p for _, prefixes in LAYERS if len(prefixes) > 1 and all(
    (PKG / q.split(".", 1)[1]).is_dir() for q in prefixes) for p in prefixes]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_ENTRY_SCRIPT_LINES = 80
ENTRY_SCRIPTS = ["train.py", "finetune.py", "sample.py", "eval.py", "serve.py"]
LOCAL_IMPORT_REASON = re.compile(r"#.*\b(optional|heavy)\b")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py's LAYERS: add it "
                             "there and to the README's architecture section")
    return best


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The gptjax modules an import statement loads (a package's __init__ counts as a module)."""
    targets = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            is_pkg = MODULES[importer].name == "__init__.py"
            base = importer.split(".")
            base = base[: len(base) - node.level + (1 if is_pkg else 0)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        names = []
        for a in node.names:
            sub = f"{mod}.{a.name}"
            names.append(sub if sub in MODULES else mod)
    for name in names:
        if not name.startswith("gptjax"):
            continue
        while name and name not in MODULES:  # `import gptjax.x.y` where y is an attribute
            name = name.rpartition(".")[0]
        if name:
            targets.append(name)
    return targets


def _imports():
    """{module: [(target, lineno, function_local, line_text)]} over the whole package."""
    out = {}
    for mod, path in MODULES.items():
        src = path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        found = []

        def visit(node, local):
            for child in ast.iter_child_nodes(node):
                is_local = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    found.append((child, local, lines[child.lineno - 1]))
                visit(child, is_local)

        visit(tree, False)
        out[mod] = found
    return out


IMPORTS = _imports()


def _edges(include_parents: bool = True) -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for mod, found in IMPORTS.items():
        for node, _, _ in found:
            graph[mod].update(t for t in _resolve(mod, node) if t != mod)
        if include_parents:  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = mod.split(".")
            for i in range(2, len(parts)):
                graph[mod].add(".".join(parts[:i]))
    return graph


def test_every_module_is_in_a_layer():
    for m in MODULES:
        if m != "gptjax":
            _layer(m)


def test_no_import_reaches_a_higher_layer():
    bad = []
    for mod, targets in _edges(include_parents=False).items():
        if mod == "gptjax":  # the top-level facade re-exports from every layer
            continue
        for t in targets:
            if t == "gptjax":
                bad.append(f"{mod} imports the top-level package gptjax (import the module)")
            elif _layer(t) > _layer(mod):
                bad.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {t} "
                           f"({LAYERS[_layer(t)][0]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def _package(module: str) -> str:
    """The sibling package (of SIBLINGS) a module belongs to, or '' for none."""
    return next((p for p in SIBLINGS if module == p or module.startswith(p + ".")), "")


def test_siblings_on_one_floor_never_import_each_other():
    assert {"gptjax.train", "gptjax.inference"} <= set(SIBLINGS)
    bad = []
    for mod, targets in _edges(include_parents=False).items():
        for t in targets:
            if _package(mod) and _package(t) and _package(mod) != _package(t):
                bad.append(f"{mod} imports its sibling {t}")
    assert not bad, "siblings import each other:\n" + "\n".join(sorted(bad))


def test_inference_and_eval_never_import_training():
    """Function-local imports included: inference and evaluation read runs through gptjax.runs."""
    bad = [f"{mod} imports {t}" for mod, targets in _edges(include_parents=False).items()
           if mod.startswith(("gptjax.inference", "gptjax.eval"))
           for t in targets if t == "gptjax.train" or t.startswith("gptjax.train.")]
    assert not bad, "\n".join(sorted(bad))


def _find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    color, stack, cycles = {}, [], []

    def dfs(m):
        color[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if color.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in color:
                dfs(t)
        stack.pop()
        color[m] = 2

    for m in sorted(graph):
        if m not in color:
            dfs(m)
    return cycles


def test_no_import_cycle():
    # Explicit imports only: a package's __init__ importing its own modules, which import their
    # package first, is how Python packages work, not a loop between concepts.
    graph = _edges(include_parents=False)
    graph.pop("gptjax", None)
    for targets in graph.values():
        targets.discard("gptjax")
    cycles = _find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_find_a_planted_loop_and_an_upward_import():
    assert _find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _find_cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("gptjax.nn.model") < _layer("gptjax.train.loop")
    assert _layer("gptjax.config") == 0 and _layer("gptjax.cli") == len(LAYERS) - 1


def test_serving_sampling_and_eval_never_load_the_training_loop():
    graph = _edges()
    forbidden = {m for m in MODULES if m == "gptjax.train.loop"}
    assert forbidden, "gptjax.train.loop moved: update this test"
    for start in MODULES:
        if not start.startswith(("gptjax.inference", "gptjax.eval")):
            continue
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            for t in graph.get(m, ()):
                if t not in seen and t != "gptjax":
                    seen.add(t)
                    todo.append(t)
        assert not (seen & forbidden), f"{start} loads {sorted(seen & forbidden)}"


def test_function_local_imports_say_why():
    bad = []
    for mod, found in IMPORTS.items():
        for node, local, text in found:
            if local and not LOCAL_IMPORT_REASON.search(text):
                bad.append(f"{MODULES[mod].relative_to(REPO)}:{node.lineno}: {text.strip()}")
    assert not bad, ("function-local imports without '# optional: ...' or '# heavy: ...' "
                     "(import at the top of the module instead):\n" + "\n".join(bad))


def test_no_module_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def _allowed_long_functions() -> set[str]:
    """`module.function` names the README's architecture section lists as long on purpose."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(gptjax(?:\.\w+)+)`\s*\(\d+ lines\)", section))


def test_no_function_over_80_lines_unless_the_readme_says_why():
    allowed = _allowed_long_functions()
    long = []
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{mod}.{node.name}" not in allowed:
                    long.append(f"{mod}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_entry_scripts_are_thin(script):
    n = len((REPO / script).read_text().splitlines())
    assert n < MAX_ENTRY_SCRIPT_LINES, f"{script} has {n} lines"


def test_readme_documents_the_layers():
    readme = (REPO / "README.md").read_text()
    assert "## Architecture" in readme
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for name, prefixes in LAYERS:
        for p in prefixes:
            shown = p.replace("gptjax.", "") + ("/" if (PKG / p.split(".", 1)[1]).is_dir()
                                                 else ".py")
            assert shown in section, f"the README's architecture section does not name {shown}"


def test_readme_diagram_lists_the_layers_in_this_order():
    """The README's layer diagram (top layer first) is the order this test enforces."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    diagram = section.split("```", 2)[1].splitlines()

    def row(prefix):
        shown = prefix.replace("gptjax.", "")
        shown += "/" if (PKG / shown).is_dir() else ".py"
        rows = [i for i, line in enumerate(diagram) if shown in re.split(r"\s{2,}", line.strip())]
        assert rows, f"the README's layer diagram does not show {shown}"
        return rows[0]

    rows = [max(row(p) for p in prefixes) for _, prefixes in LAYERS]
    assert rows == sorted(rows, reverse=True) and len(set(rows)) == len(rows), (
        f"the README diagram's rows {rows} are not LAYERS' order, top layer first")

