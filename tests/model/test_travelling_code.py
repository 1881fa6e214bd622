"""The rules of the code that travels with every checkpoint (`retnet_hf/model/`), as checks.

`save_pretrained` copies the model files next to the weights and `trust_remote_code` runs them where retnet-hf is
not installed: so they may import only torch, transformers, the standard library and each other, relatively, and
they must parse under the oldest Python that transformers 4.48 supports. One optional import is allowed: fla
(flash-linear-attention) in `fla_retention.py`, inside a function and guarded by `except ImportError`, so that a
folder loads where fla is not installed.
"""

import ast
import sys
from pathlib import Path

import pytest

import retnet_hf.model


MODEL_DIR = Path(retnet_hf.model.__file__).parent
TRAVELLING = sorted(path for path in MODEL_DIR.glob("*.py") if path.name != "__init__.py")
ALLOWED_TOP_LEVEL = {"torch", "transformers"} | set(sys.stdlib_module_names)
OPTIONAL = {"fla_retention.py": "fla"}  # the file, and the package it may import when guarded


def test_the_model_folder_holds_the_four_travelling_files():
    assert [path.name for path in TRAVELLING] == [
        "configuration_retnet.py",
        "fla_retention.py",
        "modeling_retnet.py",
        "retention.py",
    ]


def _guarded_imports(tree: ast.AST) -> set:
    """The import nodes inside a function body's `try` whose handlers catch ImportError."""
    guarded = set()
    for function in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        for node in ast.walk(function):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers
            ):
                guarded |= {id(n) for statement in node.body for n in ast.walk(statement)}
    return guarded


def _disallowed_imports(source: str, name: str, siblings: set) -> list:
    """`file:line imports X` for each import of `source` (the file `name`) that the rules above do not allow."""
    tree = ast.parse(source, filename=name)
    optional = OPTIONAL.get(name)
    guarded = _guarded_imports(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: a sibling travelling file, nothing above the folder
                if node.level != 1 or node.module not in siblings:
                    found.append(f"{name}:{node.lineno} imports .{node.module or ''}")
                continue
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top not in ALLOWED_TOP_LEVEL and not (top == optional and id(node) in guarded):
                found.append(f"{name}:{node.lineno} imports {module}")
    return found


@pytest.mark.parametrize("path", TRAVELLING, ids=lambda path: path.name)
def test_imports_only_torch_transformers_the_standard_library_and_each_other(path):
    assert _disallowed_imports(path.read_text(), path.name, {other.stem for other in TRAVELLING}) == []


def test_the_optional_fla_import_must_be_guarded_in_a_function():
    guarded = "def kernels():\n    try:\n        from fla.ops import simple_gla\n    except ImportError:\n        return None\n"
    assert _disallowed_imports(guarded, "fla_retention.py", set()) == []
    assert _disallowed_imports(guarded, "modeling_retnet.py", set()) == ["modeling_retnet.py:3 imports fla.ops"]
    assert _disallowed_imports("import fla\n", "fla_retention.py", set()) == ["fla_retention.py:1 imports fla"]
    unguarded = "def kernels():\n    from fla.ops import simple_gla\n"
    assert _disallowed_imports(unguarded, "fla_retention.py", set()) == ["fla_retention.py:2 imports fla.ops"]


@pytest.mark.parametrize("path", TRAVELLING, ids=lambda path: path.name)
def test_parses_under_python_3_9(path):
    """transformers 4.48 runs on Python 3.9: no `X | Y` annotations evaluated at runtime, no `match`."""
    tree = ast.parse(path.read_text(), feature_version=(3, 9))
    for node in ast.walk(tree):
        annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
        if annotation is not None:
            assert not any(isinstance(n, ast.BinOp) for n in ast.walk(annotation)), f"{path.name}:{node.lineno}"
