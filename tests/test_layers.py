"""The README's layers, checked on the source: imports point one way.

    entry points (train.py, evaluate.py, predict.py) → pipeline → methods → components
        → backbones / geometry / data / metrics;  tools on top, and nothing imports them.

Each module of src/texad belongs to one layer below (a new module must be placed); a module may import
modules of lower layers, and of its own layer only where the layer says so (the foundations share
helpers; two methods never import each other). Above the methods only the contract
(`texad.methods.base`) is known: the pipeline and the callbacks import no method module. A short AST
walk (no import is executed), so it runs in the fast tier.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass(frozen=True)
class Layer:
    name: str
    prefixes: tuple[str, ...]
    same_layer: bool = False  # may modules of different rooms of this layer import each other


# highest first; a module belongs to the first layer with a matching prefix (longest match wins below)
LAYERS = (
    Layer("tools", ("texad.tools",)),
    Layer("predict job", ("texad.predictor",)),  # predict.py's job: builds on the pipeline's checkpoint loading
    Layer("entry", ("texad.cli", "texad.pipeline")),
    Layer("callbacks", ("texad.writers", "texad.selection", "texad.resume")),
    Layer("method packages", ("texad.methods.",)),  # texad.methods.<name>: one room per method
    Layer("method bases", ("texad.methods.statistics_module",)),
    Layer("method contract", ("texad.methods.base", "texad.methods")),
    Layer("components", ("texad.methods.components",)),
    Layer("foundations", ("texad.backbones", "texad.feature_store", "texad.geometry", "texad.data", "texad.metrics"),
          same_layer=True),
    # no catch-all: a new top-level module must be placed in a layer here
    Layer("utilities", ("texad.errors", "texad.outputs", "texad.artifacts", "texad.viz"), same_layer=True),
    Layer("package", ("texad$",)),  # texad/__init__.py alone: a bare `import texad` (the version)
)
CONTRACT = "texad.methods.base"
ABOVE_METHODS = ("predict job", "entry", "callbacks")


def _matches(module: str, prefix: str) -> bool:
    if prefix.endswith("$"):  # this module alone
        return module == prefix[:-1]
    if prefix.endswith("."):
        return module.startswith(prefix)
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, room): the longest matching prefix decides; the room is the method package or the prefix."""
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer.prefixes:
            if _matches(module, prefix) and (best is None or len(prefix) > len(best[2])):
                best = (index, layer, prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer of tests/test_layers.py: place it")
    index, layer, prefix = best
    room = ".".join(module.split(".")[:3]) if prefix == "texad.methods." else prefix
    return index, room


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    """texad modules imported by a file (absolute and relative), with line numbers."""
    found = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
    return [(name, line) for name, line in found if name == "texad" or name.startswith("texad.")]


def violations(src: Path = SRC) -> list[str]:
    out = []
    for path in sorted((src / "texad").rglob("*.py")):
        module = module_name(path, src)
        here, room = layer_of(module)
        for target, line in imports_of(path, module):
            there, target_room = layer_of(target)
            where = f"{path.relative_to(src)}:{line} ({LAYERS[here].name}) imports {target} ({LAYERS[there].name})"
            if there < here:
                out.append(f"{where}: upward")
            elif there == here and room != target_room and not LAYERS[here].same_layer:
                out.append(f"{where}: a sibling of the same layer")
            elif (LAYERS[here].name in ABOVE_METHODS and target.startswith("texad.methods")
                  and not _matches(target, CONTRACT)):
                out.append(f"{where}: above the methods only {CONTRACT} is known")
    return out


def test_imports_follow_the_readme_layers():
    found = violations()
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_the_check_sees_each_kind_of_violation(tmp_path):
    """The walk itself: an upward import, a sibling method, a method module known to the pipeline."""
    files = {
        "texad/__init__.py": "",
        "texad/data/__init__.py": "from texad.methods.base import AnomalyModule\n",
        "texad/methods/__init__.py": "",
        "texad/methods/base.py": "",
        "texad/methods/a/__init__.py": "from ..b import model\n",
        "texad/methods/b/__init__.py": "",
        "texad/methods/b/model.py": "",
        "texad/pipeline.py": "import texad.methods.a\nfrom texad.methods.base import AnomalyModule\n",
        "texad/tools/__init__.py": "from texad.pipeline import train\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    assert len(found) == 3, found
    assert "texad/data/__init__.py:1" in found[0] and "upward" in found[0]
    assert "texad/methods/a/__init__.py:1" in found[1] and "texad.methods.b" in found[1] and "sibling" in found[1]
    assert "texad/pipeline.py:1" in found[2] and "only texad.methods.base" in found[2]


def test_a_module_in_no_layer_must_be_placed():
    import pytest

    with pytest.raises(AssertionError, match="place it"):
        layer_of("texad.some_new_module")
    assert layer_of("texad")[0] == len(LAYERS) - 1  # the package itself, and nothing else, is the bottom
