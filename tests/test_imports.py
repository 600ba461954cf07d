"""The library's import graph: no cycle among lens_jax modules (function-level imports included) and nothing
in lens_jax imports tools/ or tests/."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "lens_jax")


def _modules():
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(path, modules):
    """lens_jax modules (and any tools/tests imports) named by every import statement of a file."""
    found, foreign = set(), set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in ("tools", "tests"):
                foreign.add(n)
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found, foreign


def test_no_import_cycles_and_no_tools_imports():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps, foreign = _imports(path, modules)
        assert not foreign, f"{name} imports {sorted(foreign)}"
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}   # a package's own __init__
    state, stack = {}, []

    def visit(n):
        state[n] = "active"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "active":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"
    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert "lens_jax.build" in graph and "lens_jax.phases.pretrain" in graph


def test_tools_do_not_load_each_other_by_path():
    for f in os.listdir(os.path.join(REPO, "lens_jax", "train")):
        if f.endswith(".py"):
            assert "spec_from_file_location" not in open(os.path.join(REPO, "lens_jax", "train", f)).read(), f
