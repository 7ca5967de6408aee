"""The import structure of albef/: no cycles among module-level imports, and the models
import nothing from the data, engine or tasks layers."""
import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "albef"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module_level_only: bool) -> set[str]:
    """albef modules imported by `path` (module level: outside functions and `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text())
    found = set()

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if not module_level_only:
                    visit(child, False)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                if not module_level_only:
                    visit(child, top)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("albef"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("albef"):
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child, top)

    visit(tree, True)
    return found


def _graph(module_level_only: bool = True) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path, module_level_only) if m in modules and m != name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_albef():
    graph = _graph()
    # a package's __init__ importing its own modules is how packages work, not a cycle to report
    graph = {m: {d for d in deps if not (m.startswith(d + ".") and d.count(".") >= 1)} for m, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_task_imports_a_private_name_of_another_task():
    for path in (PACKAGE / "tasks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("albef.tasks."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_models_import_nothing_from_data_engine_or_tasks():
    graph = _graph(module_level_only=False)
    upward = {(m, d) for m, deps in graph.items() if m.startswith("albef.models")
              for d in deps if d.startswith(("albef.data", "albef.engine", "albef.tasks"))}
    assert not upward, sorted(upward)
