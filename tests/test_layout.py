"""The house rules of the package layout, checked on the source: imports run one way through the
rooms (no cycle, lazy imports included), no room reaches into another room's private names, no op
file into another op file's privates, and no file or function grows past the size limits.

Every import statement is seen, wherever it sits (module level, inside functions, under `if`), plus
`importlib.import_module("...")` calls with a literal name.
"""
import ast
import pathlib

import pytest

import ddpm_fast

PACKAGE = pathlib.Path(ddpm_fast.__file__).parent
# The rooms, lowest first. A module may import its own room and any room of a lower rank.
RANKS = {"config": 0, "devices": 0, "reference": 1, "ops": 2, "io": 3, "sampling": 4, "training": 5,
         "testing": 6, "cli": 7, "__main__": 8, "__init__": 9}
# The compiled extension (built from csrc/): a leaf of the ops room, imported by ops/reverse_step.py.
EXTENSION = "ddpm_fast._C"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# A longer function says why in its docstring with this marker.
LONG_MARKER = "Long on purpose:"


def _modules():
    """{dotted module name: (path, ast)} for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = (path, ast.parse(path.read_text(), str(path)))
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name][0].name == "__init__.py"


def _resolve(importer: str, level: int, module) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, tree: ast.AST):
    """(imported module, imported names) for every import in the module, lazy ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            yield _resolve(name, node.level, node.module), tuple(a.name for a in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            target = node.args[0].value
            if target.startswith("."):
                dots = len(target) - len(target.lstrip("."))
                target = _resolve(name, dots, target.lstrip(".") or None)
            yield target, ()


def _edges(name: str, tree: ast.AST):
    """Modules of the package that `name` imports: `from X import y` counts y when it is a submodule."""
    for target, names in _imports(name, tree):
        if not target.startswith("ddpm_fast"):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES or f"{target}.{n}" == EXTENSION]
        yield from subs
        if len(subs) < len(names) or not names:
            if target in MODULES:
                yield target


GRAPH = {name: sorted(set(_edges(name, tree)) - {name}) for name, (_, tree) in MODULES.items()}


def _room(name: str) -> str:
    if name == EXTENSION:
        return "ops"
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _cycles(graph):
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_lazy_and_importlib_imports():
    # The walk itself: a lazy import inside a function and an importlib call are edges.
    assert "ddpm_fast.sampling.fast_loop" in GRAPH["ddpm_fast.sampling.api"]  # imported inside _loop()
    assert "ddpm_fast.training" in GRAPH["ddpm_fast.cli"]  # imported inside run_train_from_args()
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_every_module_belongs_to_a_room():
    assert sorted({_room(n) for n in MODULES} - set(RANKS)) == []


def test_imports_point_down_the_rooms():
    wrong = [f"{a} -> {b}" for a in GRAPH for b in GRAPH[a] if RANKS[_room(b)] > RANKS[_room(a)]]
    assert wrong == []


def test_no_room_imports_another_rooms_private_names():
    bad = []
    for name, (_, tree) in MODULES.items():
        for target, names in _imports(name, tree):
            if not target.startswith("ddpm_fast") or _room(target) == _room(name):
                continue
            private = [n for n in names if n.startswith("_") and f"{target}.{n}" != EXTENSION]
            private += [p for p in target.split(".")[2:] if p.startswith("_") and p != "__init__"]
            if private:
                bad.append(f"{name} imports {target}: {private}")
    assert bad == []


def test_no_op_file_imports_another_op_files_privates():
    bad = []
    for name, (_, tree) in MODULES.items():
        if _room(name) != "ops":
            continue
        for target, names in _imports(name, tree):
            last = target.rsplit(".", 1)[-1]
            if target.startswith("ddpm_fast.ops.") and not last.startswith("_") and target != name:
                bad += [f"{name} imports {target}.{n}" for n in names if n.startswith("_")]
    assert bad == []


def test_argparse_lives_in_the_cli_only():
    users = [n for n, (_, tree) in MODULES.items() for target, _ in _imports(n, tree) if target == "argparse"]
    assert users == ["ddpm_fast.cli"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_file_and_function_sizes(name):
    path, tree = MODULES[name]
    assert path.read_text().count("\n") <= MAX_FILE_LINES, f"{path.name} is over {MAX_FILE_LINES} lines"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            assert n <= MAX_FUNCTION_LINES or LONG_MARKER in doc, \
                f"{path.name}:{node.lineno} {node.name} is {n} lines (split it, or say why with {LONG_MARKER!r})"
