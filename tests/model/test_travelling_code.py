"""The rules of the code that travels with every checkpoint (`retnet_hf/model/`), as checks.

`save_pretrained` copies the model files next to the weights and `trust_remote_code` runs them where retnet-hf is
not installed: so they may import only torch, transformers, the standard library and each other, relatively, and
they must parse under the oldest Python that transformers 4.48 supports.
"""

import ast
import sys
from pathlib import Path

import pytest

import retnet_hf.model


MODEL_DIR = Path(retnet_hf.model.__file__).parent
TRAVELLING = sorted(path for path in MODEL_DIR.glob("*.py") if path.name != "__init__.py")
ALLOWED_TOP_LEVEL = {"torch", "transformers"} | set(sys.stdlib_module_names)


def test_the_model_folder_holds_the_three_travelling_files():
    assert [path.name for path in TRAVELLING] == ["configuration_retnet.py", "modeling_retnet.py", "retention.py"]


@pytest.mark.parametrize("path", TRAVELLING, ids=lambda path: path.name)
def test_imports_only_torch_transformers_the_standard_library_and_each_other(path):
    siblings = {other.stem for other in TRAVELLING}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in ALLOWED_TOP_LEVEL, f"{path.name}:{node.lineno} imports {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            where = f"{path.name}:{node.lineno}"
            if node.level:  # relative: a sibling travelling file, nothing above the folder
                assert node.level == 1 and node.module in siblings, f"{where} imports .{node.module or ''}"
            else:
                assert node.module.split(".")[0] in ALLOWED_TOP_LEVEL, f"{where} imports {node.module}"


@pytest.mark.parametrize("path", TRAVELLING, ids=lambda path: path.name)
def test_parses_under_python_3_9(path):
    """transformers 4.48 runs on Python 3.9: no `X | Y` annotations evaluated at runtime, no `match`."""
    tree = ast.parse(path.read_text(), feature_version=(3, 9))
    for node in ast.walk(tree):
        annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
        if annotation is not None:
            assert not any(isinstance(n, ast.BinOp) for n in ast.walk(annotation)), f"{path.name}:{node.lineno}"
