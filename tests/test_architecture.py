"""The structure stays as docs/ARCHITECTURE.md draws it: no import loop, the library below the
harness, choice lists defined once and quoted correctly by the docs."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actuallysparse", "comparison")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every import between the project's modules, at any depth of the code (lazy ones too)."""
    modules = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import submodule` imports the submodule, not a loop through the package
                submodules = [f"{node.module}.{alias.name}" for alias in node.names
                              if f"{node.module}.{alias.name}" in modules]
                targets = submodules or [node.module]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state and (found := visit(child)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_loop_anywhere():
    assert find_cycle(import_graph()) is None


def test_the_library_imports_nothing_of_the_harness():
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if t.startswith("comparison"))
                 for name, targets in graph.items() if name.startswith("actuallysparse")}
    assert not {name: targets for name, targets in offenders.items() if targets}


def test_nni_is_imported_by_one_module_only():
    importers = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                 if re.search(r"^\s*(from|import) nni\b", path.read_text(encoding="utf-8"), re.MULTILINE)]
    assert [path.relative_to(ROOT).as_posix() for path in importers] == ["comparison/methods/nni_masks.py"]


def test_ray_is_imported_by_one_module_only():
    importers = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                 if re.search(r"^\s*(from|import) ray\b", path.read_text(encoding="utf-8"), re.MULTILINE)]
    assert [path.relative_to(ROOT).as_posix() for path in importers] == ["comparison/ray_executor.py"]


def _readme_choices(flag: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"\[{flag} ([^\]\s]+)\]", text)
    assert match, f"README's run synopsis lacks [{flag} ...]"
    return re.split(r"[|,]", match.group(1))


def test_readme_quotes_the_choice_lists():
    from comparison.config import DATASETS, DEFAULT_METHODS, DEVICES, EXECUTORS, SCHEDULES, SCOPES

    assert _readme_choices("--dataset") == list(DATASETS)
    assert _readme_choices("--methods") == list(DEFAULT_METHODS)
    assert _readme_choices("--scope") == list(SCOPES)
    assert _readme_choices("--schedule") == list(SCHEDULES)
    assert _readme_choices("--device") == list(DEVICES)
    assert _readme_choices("--executor") == list(EXECUTORS)


def test_architecture_lists_every_method_with_its_file():
    from comparison.methods import available_methods

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| `(comparison/methods/[a-z_]+\.py)` \|", text, re.MULTILINE))
    methods = available_methods()
    assert set(rows) == set(methods)
    for name, path in rows.items():
        assert methods[name].__module__.replace(".", "/") + ".py" == path


@pytest.mark.parametrize("path", ["README.md", "docs", "actuallysparse", "comparison", "results/README.md"])
def test_docs_never_point_outside_the_repository(path):
    target = ROOT / path
    files = [target] if target.is_file() else [p for p in target.rglob("*") if p.suffix in (".md", ".py", ".cpp", ".h")]
    for file in files:
        text = file.read_text(encoding="utf-8")
        assert "../shared" not in text and not re.search(r"\bshared/[A-Z]+\.md", text), file
