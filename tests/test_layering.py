"""The code's layering, checked from the source: no import cycles between modules, and no import against
the layers' direction (core < demo world < registry < serving engine < server < applications). Lazy
imports inside functions count too: they hide a cycle or an upward import, they do not remove it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: where each installed package's source lives (pyproject's package-dir mapping)
PACKAGE_DIRS = {
    "expertlib": ROOT / "expertlib",
    "expertlib.registry": ROOT / "registry",
    "expertlib.server": ROOT / "server",
    "expertlib.cli": ROOT / "cli",
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [] if rel.name == "__init__" and len(rel.parts) == 1 else list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules that module `name` (source at `path`) imports anywhere, functions included."""
    is_package = path.name == "__init__.py"
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the deepest project module the name refers to
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                deps.add(t)
    return deps


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source (not counting its own
    subpackages' `__init__` re-exports)."""
    mods = modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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


#: the ESFT pipeline, one package (expertlib/esft/): data -> scores -> selection -> training -> patch
ESFT_MODULES = [
    "data",
    "scoring",
    "selection",
    "memory_plan",
    "training",
    "state",
    "distributed",
    "pipeline",
    "diagnostics",
    "reference",
    "reference_logs",
    "keep",
    "profiling",
    "base_data",
]
#: what serves sets; training never needs it
SERVING = (
    "expertlib.engine",
    "expertlib.vllm_plugin",
    "expertlib.server",
    "expertlib.cli",
    "expertlib.registry",
)


def test_graph_sees_the_code():
    graph = import_graph()
    assert "expertlib.patch" in graph["expertlib.apply"]
    assert "expertlib.server.state" in graph["expertlib.server.app"]
    assert "expertlib.esft.training" in graph["expertlib.esft.pipeline"]


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_core_does_not_import_server_or_cli():
    lower = ("expertlib.server", "expertlib.cli")
    offenders = {
        (m, d)
        for m, deps in import_graph().items()
        if not m.startswith(lower) and not m.startswith("expertlib.demo")
        for d in deps
        if d.startswith(lower)
    }
    assert offenders == set()


def test_esft_pipeline_lives_in_its_package():
    mods = modules()
    assert {m for m in mods if m.startswith("expertlib.esft.")} == {
        f"expertlib.esft.{m}" for m in ESFT_MODULES
    }
    # moved, not copied: no module of the pipeline is left (or shimmed) at the package's top level
    flat = {"expertlib.training_state", "expertlib.esft_reference"} | {f"expertlib.{m}" for m in ESFT_MODULES}
    assert flat & set(mods) == set()


def test_esft_does_not_import_the_serving_side():
    offenders = {
        (m, d)
        for m, deps in import_graph().items()
        if m.startswith("expertlib.esft")
        for d in deps
        if d.startswith(SERVING)
    }
    assert offenders == set()


#: the layers, lowest first; a module may import its own layer and those below (the last that matches wins)
LAYERS = [
    ("core", ("expertlib",)),
    ("demo world", ("expertlib.demo",)),  # toy tasks, the demo base, its evaluation: a sample world
    ("registry", ("expertlib.registry",)),
    ("serving engine", ("expertlib.engine", "expertlib.vllm_plugin")),
    ("server", ("expertlib.server",)),
    # what runs the whole product: the CLI, and the demo's driver (train, publish, serve, ask) and facade
    ("application", ("expertlib.cli", "expertlib.demo.run", "expertlib.demo.serving")),
]
#: the demo package's `__init__` is its facade (`from expertlib.demo import run_demo`)
FACADES = {"expertlib.demo": "application"}
#: helpers for tests and benchmarks: they may import anything, and nothing shipped imports them
TEST_HELPERS = ("expertlib.testing", "expertlib.registry.testing", "expertlib.vllm_plugin.testing")


def layer_of(module: str) -> int:
    names = [name for name, _ in LAYERS]
    if module in FACADES:
        return names.index(FACADES[module])
    return max(i for i, (_, prefixes) in enumerate(LAYERS) if module.startswith(prefixes))


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(module, what it imports) for every import against the layers, test helpers included."""
    found = set()
    for m, deps in graph.items():
        if m.startswith(TEST_HELPERS):
            continue
        for d in deps:
            if d.startswith(TEST_HELPERS) or layer_of(d) > layer_of(m):
                found.add((m, d))
    return found


def test_layering_sees_an_upward_import_hidden_in_a_function(tmp_path):
    source = "def f():\n    from expertlib.registry import Registry\n    return Registry\n"
    lazy = tmp_path / "lazy.py"
    lazy.write_text(source)
    graph = {**import_graph(), "expertlib.evaluation": imports_of("expertlib.evaluation", lazy, modules())}
    assert ("expertlib.evaluation", "expertlib.registry") in upward_imports(graph)
    assert ("expertlib.demo.base", "expertlib.testing") in upward_imports(
        {"expertlib.demo.base": {"expertlib.testing"}}
    )


def test_an_esft_step_reaching_into_the_demo_fails(tmp_path):
    """What the ESFT steps once did (the demo's tasks for `builtin` data, inside a function) is an
    upward import, with no list of exceptions to hide it."""
    lazy = tmp_path / "diagnostics.py"
    lazy.write_text(
        "def builtin():\n    from expertlib.demo.tasks import GENERAL_TASKS\n    return GENERAL_TASKS\n"
    )
    name = "expertlib.esft.diagnostics"
    graph = {**import_graph(), name: imports_of(name, lazy, modules())}
    assert upward_imports(graph) == {(name, "expertlib.demo.tasks")}


def test_no_upward_imports():
    """The core never reaches into the demo, the registry or the serving side; the shipped demo
    never takes a test helper; the registry never imports the engine or the server; ..."""
    assert upward_imports(import_graph()) == set()
