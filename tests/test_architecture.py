"""The layout rules: dependencies point one way, pipelines ask pruners only through the protocol, sizes stay small.

Layers, top to bottom: entry points (``run.py``, ...) -> ``pipelines/`` -> ``pruners/`` ->
``modules/``. A module may import its own layer or any layer below it, never one above.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"run": 0, "export": 0, "predict": 0, "pipelines": 1, "pruners": 2, "serving": 2, "modules": 3}
SOURCE_DIRS = ("pipelines", "pruners", "serving", "modules")
#: what predict.py runs must import nothing of the training stack (requirements-serve.txt)
TRAINING_STACK = {"torch", "lightning", "transformers", "torchmetrics", "hydra_zen"}


def source_files() -> list[Path]:
    """Every project source file: the entry points and the packages (tests and benchmarks excluded)."""
    files = [p for p in ROOT.glob("*.py") if p.stem in LAYERS]
    for d in SOURCE_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return files


def layer_of(path: Path, root: Path = ROOT) -> int:
    """The layer of a file under ``root`` (a copy of the source tree's layout), from its top-level folder or name."""
    rel = path.relative_to(root)
    return LAYERS[rel.parts[0].removesuffix(".py")]


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import in ``path``, function-level imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in LAYERS]
    return out


def test_dependencies_point_one_way():
    wrong = []
    for path in source_files():
        for line, target in project_imports(path):
            if LAYERS[target] < layer_of(path):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (a layer above)")
    assert not wrong, "\n".join(wrong)


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in ``path``, function-level imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)]
    return out


def training_stack_imports(files: list[Path], allowed: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """Imports in ``files`` of the training stack, or of a project module whose name starts with none of ``allowed``."""
    wrong = []
    for path in files:
        for line, name in imported_names(path):
            top = name.split(".")[0]
            if top in TRAINING_STACK:
                wrong.append(f"{path.relative_to(root)}:{line} imports {name}")
            if top in LAYERS and not (name + ".").startswith(allowed):
                wrong.append(f"{path.relative_to(root)}:{line} imports {name} (allowed: {', '.join(a + '*' for a in allowed)})")
    return wrong


CORE_FILES = sorted((ROOT / "modules" / "core").glob("*.py"))


def test_serving_imports_nothing_of_the_training_stack():
    """predict.py and serving/ import no training package, and of modules/ only the torch-free modules.core."""
    files = [ROOT / "predict.py", *sorted((ROOT / "serving").glob("*.py"))]
    wrong = training_stack_imports(files, ("modules.core.", "serving."))
    assert not wrong, "\n".join(wrong)


def test_modules_core_imports_no_torch_and_nothing_above_it():
    """modules/core is the torch-free floor: no training stack, no other project package (only itself)."""
    assert {p.name for p in CORE_FILES} >= {"errors.py", "files.py", "plots.py", "features.py"}
    wrong = training_stack_imports(CORE_FILES, ("modules.core.",))
    assert not wrong, "\n".join(wrong)


def test_the_core_check_sees_a_torch_import(tmp_path):
    """The check used on modules/core reports a function-level torch import and a modules.nn import."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import torch\n    from modules.nn.bert import NotBertError\n")
    assert imported_names(probe) == [(2, "torch"), (3, "modules.nn.bert")]
    assert training_stack_imports([probe], ("modules.core.",), root=tmp_path) == [
        "probe.py:2 imports torch", "probe.py:3 imports modules.nn.bert (allowed: modules.core.*)"]


def test_the_layer_check_sees_an_import_against_the_order(tmp_path):
    """A probe in a copy of the layout (under tmp_path: no test writes into the source tree)."""
    bad = tmp_path / "modules" / "_probe_for_test.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from pruners.base import Pruner\n    return Pruner\n")
    assert project_imports(bad) == [(2, "pruners")] and layer_of(bad, tmp_path) > LAYERS["pruners"]


def test_pipelines_ask_pruners_only_through_the_protocol():
    from pipelines.configs import selectable_pruners

    pruner_classes = {cls.__name__ for cls in selectable_pruners()} | {"MaskedDistillation", "TeacherPruner"}
    wrong = []
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
                wrong.append(f"{path.name}:{node.lineno} calls {node.func.id}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pruners") and node.module != "pruners.base":
                wrong.append(f"{path.name}:{node.lineno} imports {node.module} (only pruners.base, the protocol)")
            if isinstance(node, ast.Name) and node.id in pruner_classes:
                wrong.append(f"{path.name}:{node.lineno} names {node.id}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_file_over_700_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 700, f"{path.relative_to(ROOT)} has {lines} lines"


def test_no_constructor_takes_more_than_20_arguments():
    import importlib
    import pkgutil

    wrong = []
    for package in ("modules", "pruners"):
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
            module = importlib.import_module(info.name)
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != module.__name__ or "__init__" not in vars(cls):
                    continue
                params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
                if len(params) > 20:
                    wrong.append(f"{module.__name__}.{name}: {len(params)} arguments")
    assert not wrong, "\n".join(wrong)
