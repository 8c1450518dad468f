"""The package's layering, read from its import graph (ast), so that the arrows keep pointing down.

- Lower layers (config, data, models, losses, runtime) never import upper ones (training, eval, hf,
  scaling, checkpoint, the driver `megatron_lcl.train`).
- eval, hf and scaling never import `megatron_lcl.training` internals; the driver entry
  `megatron_lcl.train` is the one thing they may run.
- Nothing edits sys.path: the package is installed, tests get their folders from pytest.ini.
Imports inside functions count too (lazy imports are still dependencies).
"""

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megatron_lcl"
LOWER = {"config", "data", "models", "losses", "runtime"}
UPPER = {"training", "eval", "hf", "scaling", "checkpoint", "train"}
NO_TRAINING_INTERNALS = {"eval", "hf", "scaling"}


def imported_modules(source: str, module: str) -> Set[str]:
    """Absolute names of the megatron_lcl modules `source` (the module `module`) imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
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


def package_graph() -> Dict[str, Set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] + ["__init__"]  # relative imports resolve against the package itself
        module = ".".join(parts)
        graph[module] = imported_modules(path.read_text(), module)
    return graph


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
