"""The import graph of the package points down: the tools import the model, never the other way, and no two
modules import each other (directly or round a cycle). The benchmarks are not part of the package."""

import ast
from pathlib import Path

import retnet_hf


PACKAGE = Path(retnet_hf.__file__).parent
SHIMS = {"modeling_retnet", "configuration_retnet", "retention"}  # the old import paths, kept for this release


def imports_of(path: Path) -> set:
    """The retnet_hf modules (`model` for the model folder) that `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and path.parent == PACKAGE:
            found.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("retnet_hf."):
            found.add(node.module.split(".")[1])
    return found - {""}


def tool_graph() -> dict:
    return {
        path.stem: imports_of(path)
        for path in PACKAGE.glob("*.py")
        if path.stem not in SHIMS | {"__init__", "__main__"}
    }


def test_the_model_imports_no_tool():
    for path in (PACKAGE / "model").glob("*.py"):
        assert not any(
            isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.module or "").startswith("retnet_hf"))
            for node in ast.walk(ast.parse(path.read_text()))
        ), f"{path.name} reaches above retnet_hf/model/"


def test_no_module_imports_the_command_line_or_the_benchmarks():
    for name, imported in tool_graph().items():
        assert "cli" not in imported or name == "__main__", f"{name} imports the command line"
        source = (PACKAGE / f"{name}.py").read_text()
        assert "benchmarks" not in {
            (node.module or "").split(".")[0]
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom)
        }, f"{name} imports the benchmarks, which are not installed"


def test_the_tools_import_graph_has_no_cycle():
    graph = tool_graph()
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(trail + [name])}"
        state[name] = "open"
        for imported in graph.get(name, ()):
            visit(imported, trail + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])
    assert "model" in graph["pretraining"] and "model" in graph["finetuning"]  # the graph was read at all


def test_the_vllm_plugin_imports_the_model_and_no_tool():
    for path in (PACKAGE / "vllm_plugin").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert (node.module or "").split(".")[0] == "model", f"{path.name} imports retnet_hf.{node.module}"
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("retnet_hf"), f"{path.name}: import it relatively"
            elif isinstance(node, ast.Import):  # `import retnet_hf` registers the config with the Auto classes
                assert all(a.name == "retnet_hf" or not a.name.startswith("retnet_hf") for a in node.names)
