"""The import graph of nanoopt by layer, read from the source (``ast``, nothing is imported).

``python docs/import_graph.py`` prints the generated part of ``docs/architecture.md`` (between the
``<!-- generated -->`` markers): a mermaid picture of which component imports which, the table of each
component's layer and imports, and every import that goes *up* the layers. ``tests/test_architecture.py``
checks that the document holds what this script prints, so the picture cannot drift from the code.

Layers, bottom to top (a component may import from its own layer and below):
0 integer spec -> 1 kernels -> 2 runtime -> 3 autograd -> 4 nn/optim/train/data/models -> 5 techniques ->
6 io/report/cli/pipeline (the face).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "nanoopt"

# (component, layer) by module prefix; the longest matching prefix wins
COMPONENTS = {
    "nanoopt.spec": ("spec", 0),
    "nanoopt.kernels": ("kernels", 1),
    "nanoopt.float_kernels": ("kernels", 1),
    "nanoopt.runtime": ("runtime", 2),
    "nanoopt.tensor": ("autograd", 3),
    "nanoopt.ops": ("autograd", 3),
    "nanoopt.ops_transformer": ("autograd", 3),
    "nanoopt.random": ("autograd", 3),
    "nanoopt.gradcheck": ("autograd", 3),
    "nanoopt.nn": ("nn", 4),
    "nanoopt.optim": ("optim/train", 4),
    "nanoopt.train": ("optim/train", 4),
    "nanoopt.train_lm": ("optim/train", 4),
    "nanoopt.data": ("data", 4),
    "nanoopt.models": ("models", 4),
    "nanoopt.models_gpt": ("models", 4),
    "nanoopt.quant": ("quant", 5),
    "nanoopt.prune": ("prune", 5),
    "nanoopt.distill": ("distill", 5),
    "nanoopt.layerwise": ("layerwise", 5),
    "nanoopt.io": ("face", 6),
    "nanoopt.report": ("face", 6),
    "nanoopt.cli": ("face", 6),
    "nanoopt.__main__": ("face", 6),
    "nanoopt.pipeline": ("face", 6),
    "nanoopt.interop": ("face", 6),
    "nanoopt.onnx": ("face", 6),
    "nanoopt.deploy": ("face", 6),
    "nanoopt.demo": ("face", 6),
    "nanoopt": ("nanoopt (root)", 6),
}


def component(module: str) -> tuple[str, int]:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in COMPONENTS:
            return COMPONENTS[prefix]
    raise KeyError(module)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _target(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    if node.module is None or base == "nanoopt":   # "from nanoopt import nn": each name may be a submodule
        return [f"{base}.{alias.name}" for alias in node.names]
    return [base]


def imports(name: str, path: Path) -> tuple[set[str], set[str], set[str]]:
    """(module-level, in-function, lazy) nanoopt imports of one module. Lazy: string module names passed to
    ``importlib.import_module`` through a module-level table (PEP 562 ``__getattr__`` hooks)."""
    tree = ast.parse(path.read_text())
    top, inner, lazy = set(), set(), set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _target(child, name, is_package):
                    if target.split(".")[0] == "nanoopt":
                        (inner if nested else top).add(target)
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) and not nested \
                    and child.value.startswith("nanoopt.") and " " not in child.value:
                lazy.add(child.value)
            visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    uses_import_module = "import_module" in path.read_text()
    return top, inner, (lazy if uses_import_module else set())


def _inner_statements(path: Path) -> int:
    """The number of ``import`` statements of nanoopt modules inside functions of one module."""
    count = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("nanoopt")):
                    count += 1
                elif isinstance(inner, ast.Import) and any(a.name.startswith("nanoopt") for a in inner.names):
                    count += 1
    return count


def graph() -> dict[str, dict[str, set[tuple[str, str]]]]:
    """component -> kind ("top", "function", "lazy") -> {(importing module, imported module)}."""
    known = modules()
    edges: dict[str, dict[str, set[tuple[str, str]]]] = defaultdict(lambda: defaultdict(set))
    for name, path in known.items():
        for kind, targets in zip(("top", "function", "lazy"), imports(name, path), strict=True):
            for target in targets:
                while target not in known and "." in target:    # "nanoopt.nn.Module" -> "nanoopt.nn"
                    target = target.rsplit(".", 1)[0]
                if target in known and target != name:
                    edges[component(name)[0]][kind].add((name, target))
    return edges


def render() -> str:
    edges = graph()
    layer_of = {comp: layer for comp, layer in COMPONENTS.values()}
    order = sorted(set(layer_of), key=lambda c: (layer_of[c], c))
    lines = ["```mermaid", "flowchart BT"]
    ids = {comp: f"c{i}" for i, comp in enumerate(order)}
    for layer in sorted(set(layer_of.values())):
        members = [c for c in order if layer_of[c] == layer]
        lines.append(f"  subgraph L{layer}[\"layer {layer}\"]")
        lines += [f"    {ids[c]}[\"{c}\"]" for c in members]
        lines.append("  end")
    for comp in order:
        for kind, arrow in (("top", "-->"), ("function", "-.->"), ("lazy", "-.->")):
            targets = sorted({component(t)[0] for _, t in edges[comp][kind]} - {comp}, key=order.index)
            for target in targets:
                if kind == "top" or target not in {component(t)[0] for _, t in edges[comp]["top"]}:
                    label = "" if kind == "top" else f"|{kind}|"
                    lines.append(f"  {ids[comp]} {arrow}{label} {ids[target]}")
    lines += ["```", "", "Solid: module-level imports. Dotted: imports only inside functions or through lazy",
              "`__getattr__` tables (drawn where no module-level import already joins the two).", "",
              "| component | layer | imports at module level | only inside functions / lazily "
              "| import statements inside functions |", "|---|---|---|---|---|"]
    for comp in order:
        top = sorted({component(t)[0] for _, t in edges[comp]["top"]} - {comp}, key=order.index)
        late = sorted(({component(t)[0] for kind in ("function", "lazy") for _, t in edges[comp][kind]}
                       - set(top) - {comp}), key=order.index)
        count = sum(_inner_statements(path) for name, path in modules().items() if component(name)[0] == comp)
        lines.append(f"| {comp} | {layer_of[comp]} | {', '.join(top) or '-'} | {', '.join(late) or '-'} | {count} |")
    lines += ["", "Imports that go up the layers (importing module -> imported module):", ""]
    upward = []
    for comp in order:
        for kind in ("top", "function", "lazy"):
            for source, target in sorted(edges[comp][kind]):
                if component(target)[1] > layer_of[comp]:
                    upward.append(f"- `{source}` -> `{target}` ({'module level' if kind == 'top' else kind})")
    lines += upward or ["- none"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
