"""The package's layering, read from its import graph (ast), so that the arrows keep pointing down.

- Lower layers (config, data, models, losses, runtime) never import upper ones (training, eval, hf,
  scaling, checkpoint, the driver `megatron_lcl.train`).
- eval, hf and scaling never import `megatron_lcl.training` internals; the driver entry
  `megatron_lcl.train` is the one thing they may run.
- Only `runtime/` adapts megatron-core to the CPU: training/ and checkpoint/ never import `runtime.cpu`
  (it is installed at distributed initialisation).
- No import cycle among the package's modules at module level (imports in function bodies run later,
  so they close no cycle at import time).
- Nothing edits sys.path: the package is installed, tests get their folders from pytest.ini.
Imports inside functions count too for the layering rules (lazy imports are still dependencies).
"""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megatron_lcl"
LOWER = {"config", "data", "models", "losses", "runtime"}
UPPER = {"training", "eval", "hf", "scaling", "checkpoint", "train"}
NO_TRAINING_INTERNALS = {"eval", "hf", "scaling"}
NO_CPU_ADAPTATION = {"training", "checkpoint"}
CPU_ADAPTATION = "megatron_lcl.runtime.cpu"


def imported_modules(source: str, module: str, module_level_only: bool = False) -> Set[str]:
    """Absolute names of the megatron_lcl modules `source` (the module `module`) imports; with
    `module_level_only`, those its top level runs (also under a top-level `if`/`try`), not those of
    function or class bodies."""
    found = set()
    nodes = _module_level(ast.parse(source).body) if module_level_only else ast.walk(ast.parse(source))
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parts = module.split(".")[:-node.level]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "megatron_lcl" or m.startswith("megatron_lcl.")}


def _module_level(body: List[ast.stmt]) -> Iterable[ast.stmt]:
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            yield from _module_level(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body)


def layer_of(module: str) -> str:
    """megatron_lcl.data.loader -> data; megatron_lcl.train -> train."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(graph: Dict[str, Set[str]]) -> List[str]:
    out = []
    for module, imports in sorted(graph.items()):
        layer = layer_of(module)
        for target in sorted(imports):
            to = layer_of(target)
            if layer in LOWER and to in UPPER:
                out.append(f"{module} (lower layer {layer}/) imports {target} (upper layer)")
            if layer in NO_TRAINING_INTERNALS and to == "training":
                out.append(f"{module} ({layer}/) imports training internals: {target}")
    return out


def package_graph(module_level_only: bool = False) -> Dict[str, Set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] + ["__init__"]  # relative imports resolve against the package itself
        module = ".".join(parts)
        graph[module] = imported_modules(path.read_text(), module, module_level_only)
    return graph


def cpu_adaptation_imports(graph: Dict[str, Set[str]]) -> List[str]:
    return [f"{module} imports {CPU_ADAPTATION}" for module, imports in sorted(graph.items())
            if layer_of(module) in NO_CPU_ADAPTATION and CPU_ADAPTATION in imports]


def import_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of module-level imports (as a list of modules, first == last), or None.

    `from megatron_lcl.x import y` names both the package x (its `__init__`) and x.y; only names that
    are modules count."""
    def resolve(name: str) -> Optional[str]:
        return name + ".__init__" if name + ".__init__" in graph else (name if name in graph else None)

    edges = {module: {resolve(t) for t in imports} - {None, module} for module, imports in graph.items()}
    try:
        TopologicalSorter(edges).prepare()
    except CycleError as e:
        return e.args[1]
    return None


def test_the_checker_sees_violations():
    bad = {"megatron_lcl.data.loader": imported_modules(
        "def f():\n    from megatron_lcl.training.trainer import Trainer\n", "megatron_lcl.data.loader"),
        "megatron_lcl.eval.x": imported_modules("from ..training import pipeline\n", "megatron_lcl.eval.x"),
        "megatron_lcl.hf.y": imported_modules("import megatron_lcl.train\n", "megatron_lcl.hf.y")}
    found = violations(bad)
    assert any("megatron_lcl.data.loader (lower layer data/) imports megatron_lcl.training" in v for v in found)
    assert any("megatron_lcl.eval.x (eval/) imports training internals" in v for v in found)
    assert not any(v.startswith("megatron_lcl.hf.y") for v in found)  # the driver entry is allowed


def test_package_layering():
    graph = package_graph()
    assert len(graph) > 40 and graph["megatron_lcl.training.trainer"]  # the graph was really read
    assert violations(graph) == []


def test_the_checkers_see_cpu_imports_and_cycles():
    a = "megatron_lcl.data.a"
    lazy = {a: imported_modules("def f():\n    from megatron_lcl.data import b\n", a, module_level_only=True),
            "megatron_lcl.data.b": {a}}
    assert import_cycle(lazy) is None  # a function-body import closes no cycle
    top = {a: imported_modules("try:\n    from megatron_lcl.data import b\nexcept ImportError:\n    pass\n", a,
                               module_level_only=True),
           "megatron_lcl.data.b": {a}, "megatron_lcl.data.__init__": set()}
    assert set(import_cycle(top)) == {a, "megatron_lcl.data.b"}
    bad = {"megatron_lcl.checkpoint.x": imported_modules("from ..runtime import cpu\n", "megatron_lcl.checkpoint.x")}
    assert cpu_adaptation_imports(bad) == ["megatron_lcl.checkpoint.x imports megatron_lcl.runtime.cpu"]


def test_only_runtime_adapts_megatron_core_to_the_cpu():
    """training/ and checkpoint/ never name the CPU adaptation: distributed initialisation installs it."""
    assert cpu_adaptation_imports(package_graph()) == []


def test_no_module_level_import_cycle():
    assert import_cycle(package_graph(module_level_only=True)) is None


def python_files() -> Iterable[Path]:
    for folder in ("megatron_lcl", "tools", "tests", "examples"):
        yield from (ROOT / folder).rglob("*.py")
    yield ROOT / "pretrain_lcl.py"


def test_nothing_edits_sys_path():
    edits = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                edits.append(str(path.relative_to(ROOT)))
    assert edits == []
