"""The layer contract, read from the source with `ast` (nothing is imported):

    shared  <-  services.engine  <-  services.{ingress,predictor,scheduler,worker}
                                  <-  offline  <-  bench, loadtest

- `shared` imports nothing of the project's other packages;
- a runtime service imports only `shared`, itself and `services.engine` (never another service);
- `services.engine` imports only `shared` and itself;
- `offline` imports only shared, services and offline; `bench` and `loadtest` may add themselves;
  nothing below them imports bench or loadtest;
- `services/` holds only the serving path's packages;
- no import cycle among the project's modules (module-level imports only: an import inside a
  function or under `if TYPE_CHECKING:` does not run at import time).

Every import counts for the layer rules, including those inside functions and under
TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "services", "offline", "bench", "loadtest")
RUNTIME_SERVICES = ("ingress", "predictor", "scheduler", "worker")
ENGINE = "services.engine"


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # the project module it names (a submodule when `from pkg import submodule`)
    path: str  # the importing file, relative to the root
    line: int
    module_level: bool  # runs at import time: not in a function, not under TYPE_CHECKING


@dataclass(frozen=True)
class Graph:
    modules: dict[str, str]  # module name -> file, relative to the root
    imports: list[Import]


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.found: list[tuple[str, list[str], int, bool]] = []  # (base, names, line, top)
        self._deferred = 0  # depth inside functions and TYPE_CHECKING blocks

    def _defer(self, node: ast.AST) -> None:
        self._deferred += 1
        self.generic_visit(node)
        self._deferred -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _defer

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._deferred += 1
        for child in node.body:
            self.visit(child)
        self._deferred -= 1
        for child in node.orelse:  # the `else:` of `if TYPE_CHECKING` runs
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno, self._deferred == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.split(".")
            if not self.is_package:
                package = package[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [a.name for a in node.names if a.name != "*"]
        self.found.append((base, names, node.lineno, self._deferred == 0))


def collect(root: Path, packages: Sequence[str] = PACKAGES) -> Graph:
    """Every import of a project module by a module under `root`'s `packages`."""
    files = sorted(p for pkg in packages if (root / pkg).is_dir()
                   for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p.relative_to(root)): str(p.relative_to(root)) for p in files}
    imports: list[Import] = []
    for name, rel in modules.items():
        tree = ast.parse((root / rel).read_text(encoding="utf-8"), filename=rel)
        collector = _Collector(name, rel.endswith("__init__.py"))
        collector.visit(tree)
        for base, names, line, top in collector.found:
            if base.split(".")[0] not in packages:
                continue
            # `from pkg import x` names the submodule pkg.x when there is one, else pkg itself.
            targets = [f"{base}.{n}" if f"{base}.{n}" in modules else base for n in names]
            for target in dict.fromkeys(targets or [base]):
                imports.append(Import(name, target, rel, line, top))
    return Graph(modules, imports)


def _within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Rule:
    name: str
    applies: Callable[[str], bool]  # to the importing module
    allows: Callable[[str, str], bool]  # (importer, imported)


def _service_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


RULES = (
    Rule("shared imports nothing from services, offline, bench or loadtest",
         lambda m: _within(m, "shared"), lambda _m, i: _within(i, "shared")),
    Rule("a runtime service imports only shared, itself and services.engine",
         lambda m: _within(m, *(f"services.{s}" for s in RUNTIME_SERVICES)),
         lambda m, i: _within(i, "shared", ENGINE, _service_of(m))),
    Rule("services.engine imports only shared and itself",
         lambda m: _within(m, ENGINE), lambda _m, i: _within(i, "shared", ENGINE)),
    Rule("offline imports only shared, services and offline",
         lambda m: _within(m, "offline"),
         lambda _m, i: _within(i, "shared", "services", "offline")),
    Rule("bench imports only shared, services, offline and bench",
         lambda m: _within(m, "bench"),
         lambda _m, i: _within(i, "shared", "services", "offline", "bench")),
    Rule("loadtest imports only shared, services, offline and loadtest",
         lambda m: _within(m, "loadtest"),
         lambda _m, i: _within(i, "shared", "services", "offline", "loadtest")),
)


def violations(graph: Graph, rule: Rule) -> list[str]:
    return [f"{imp.importer} imports {imp.imported} ({imp.path}:{imp.line}): "
            f"breaks rule '{rule.name}'"
            for imp in graph.imports
            if rule.applies(imp.importer) and not rule.allows(imp.importer, imp.imported)]


def services_layout_violations(graph: Graph) -> list[str]:
    allowed = {"services", ENGINE, *(f"services.{s}" for s in RUNTIME_SERVICES)}
    return [f"{m} ({path}) is not part of the serving path: services/ holds only "
            f"{', '.join(sorted(allowed - {'services'}))}; offline tools belong in offline/"
            for m, path in graph.modules.items()
            if _within(m, "services") and m != "services" and _service_of(m) not in allowed]


def _owner(graph: Graph, module: str) -> str | None:
    """The collected module an import resolves to (the nearest enclosing package if the exact
    module is not one: `import shared` names shared/__init__.py)."""
    parts = module.split(".")
    while parts:
        if ".".join(parts) in graph.modules:
            return ".".join(parts)
        parts.pop()
    return None


def module_level_edges(graph: Graph) -> dict[str, dict[str, Import]]:
    edges: dict[str, dict[str, Import]] = {m: {} for m in graph.modules}
    for imp in graph.imports:
        target = _owner(graph, imp.imported)
        if imp.module_level and target is not None and target not in edges[imp.importer]:
            edges[imp.importer][target] = imp
    return edges


def find_cycles(edges: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component of more
    than one module, or of one module importing itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in edges:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    components.append(sorted(component))

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Breadth-first inside the component from start back to start: the shortest cycle.
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child in sorted(edges[node]):
                    if child == start:
                        found = node
                        break
                    if child in members and child not in previous:
                        previous[child] = node
                        nxt.append(child)
                if found is not None:
                    break
            frontier = nxt
        assert found is not None
        path = [found]
        while path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def cycle_messages(graph: Graph) -> list[str]:
    edges = module_level_edges(graph)
    out = []
    for cycle in find_cycles(edges):
        hops = [f"{a} imports {b} ({edges[a][b].path}:{edges[a][b].line})"
                for a, b in itertools.pairwise(cycle)]
        out.append(f"import cycle {' -> '.join(cycle)}: " + "; ".join(hops)
                   + ": breaks rule 'no import cycles among the project's modules'")
    return out


@pytest.fixture(scope="module")
def graph() -> Graph:
    return collect(ROOT)


def test_reads_the_whole_project(graph: Graph) -> None:
    assert len(graph.modules) >= 40, sorted(graph.modules)
    for known in ("shared.schemas", "services.predictor.main", "services.engine.vllm",
                  "offline.cli", "offline.workload.catalog", "bench.simulator"):
        assert known in graph.modules
    assert len(graph.imports) >= 100
    assert any(i.importer == "services.predictor.main" and i.imported == "shared.settings"
               for i in graph.imports)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name.split(" imports")[0])
def test_layer_rule(graph: Graph, rule: Rule) -> None:
    assert any(rule.applies(m) for m in graph.modules), f"no module is under '{rule.name}'"
    found = violations(graph, rule)
    assert not found, "\n".join(found)


def test_services_hold_only_the_serving_path(graph: Graph) -> None:
    found = services_layout_violations(graph)
    assert not found, "\n".join(found)


def test_no_import_cycles(graph: Graph) -> None:
    found = cycle_messages(graph)
    assert not found, "\n".join(found)


# The checker itself, on a synthetic project: it must see what it is meant to see.

SYNTHETIC = {
    "shared/__init__.py": "",
    "shared/keys.py": "def f():\n    from services.scheduler import policy\n",
    "services/__init__.py": "",
    "services/tool.py": "",
    "services/engine/__init__.py": "",
    "services/engine/client.py": "from shared import keys\nimport offline.cli\n",
    "services/ingress/__init__.py": "",
    "services/ingress/app.py": (
        "from typing import TYPE_CHECKING\n"
        "from services.engine import client\n"
        "from . import tokens\n"
        "if TYPE_CHECKING:\n"
        "    from services.worker.main import app\n"
        "else:\n"
        "    import shared.keys\n"
        "def later():\n"
        "    from services.scheduler.policy import decide\n"),
    "services/ingress/tokens.py": "from .app import later\n",
    "services/scheduler/__init__.py": "",
    "services/scheduler/policy.py": "from ..ingress import app\n",
    "offline/__init__.py": "",
    "offline/cli.py": "import bench.run\n",
    "bench/__init__.py": "",
    "bench/run.py": "from offline import cli\n",
}


@pytest.fixture()
def synthetic(tmp_path: Path) -> Graph:
    for rel, text in SYNTHETIC.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return collect(tmp_path)


def test_checker_resolves_imports(synthetic: Graph) -> None:
    got = {(i.importer, i.imported, i.module_level) for i in synthetic.imports}
    assert ("services.ingress.app", "services.engine.client", True) in got  # from pkg import mod
    assert ("services.ingress.app", "services.ingress.tokens", True) in got  # relative
    assert ("services.ingress.tokens", "services.ingress.app", True) in got
    assert ("services.scheduler.policy", "services.ingress.app", True) in got  # `..`
    assert ("services.ingress.app", "services.worker.main", False) in got  # TYPE_CHECKING
    assert ("services.ingress.app", "shared.keys", True) in got  # its `else:` runs
    assert ("services.ingress.app", "services.scheduler.policy", False) in got  # in a function


def test_checker_catches_violations(synthetic: Graph) -> None:
    by_rule = {rule.name: violations(synthetic, rule) for rule in RULES}
    assert by_rule[RULES[0].name] == [
        "shared.keys imports services.scheduler.policy (shared/keys.py:2): breaks rule "
        f"'{RULES[0].name}'"]
    runtime = "\n".join(by_rule[RULES[1].name])
    assert "services.ingress.app imports services.worker.main" in runtime  # TYPE_CHECKING counts
    assert "services.ingress.app imports services.scheduler.policy" in runtime  # so do functions
    assert "services.scheduler.policy imports services.ingress.app" in runtime
    assert "imports services.engine.client" not in runtime and "tokens" not in runtime
    assert by_rule[RULES[2].name] == [
        "services.engine.client imports offline.cli (services/engine/client.py:2): breaks rule "
        f"'{RULES[2].name}'"]
    assert [v.split(" (")[0] for v in by_rule[RULES[3].name]] == ["offline.cli imports bench.run"]
    assert by_rule[RULES[4].name] == []
    assert services_layout_violations(synthetic) == [
        "services.tool (services/tool.py) is not part of the serving path: services/ holds only "
        "services.engine, services.ingress, services.predictor, services.scheduler, "
        "services.worker; offline tools belong in offline/"]


def test_checker_finds_cycles(synthetic: Graph) -> None:
    cycles = find_cycles(module_level_edges(synthetic))
    assert ["bench.run", "offline.cli", "bench.run"] in cycles
    assert ["services.ingress.app", "services.ingress.tokens", "services.ingress.app"] in cycles
    # policy -> app is module level but app -> policy is inside a function: no cycle there; the
    # TYPE_CHECKING import is not an edge either.
    assert not any("services.scheduler.policy" in c for c in cycles)
    assert len(cycles) == 2
    messages = cycle_messages(synthetic)
    assert any("offline.cli imports bench.run (offline/cli.py:1)" in m for m in messages)
    assert find_cycles({"a": {"a": 0}}) == [["a", "a"]]
    assert find_cycles({"a": {"b": 0}, "b": {"c": 0}, "c": {"a": 0, "d": 0}, "d": {}}) == [
        ["a", "b", "c", "a"]]
