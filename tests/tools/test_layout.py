"""The import graph of the package points down: the tools import the model, never the other way, and no two
modules import each other (directly or round a cycle). The benchmarks are not part of the package. A clone works
on its own: no file reads data from beside it, none is over 1 MiB, and the sample data is package data."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

import retnet_hf


PACKAGE = Path(retnet_hf.__file__).parent
SHIMS = {"modeling_retnet", "configuration_retnet", "retention"}  # the old import paths of 0.1 (deprecated in 0.2.0)
SHIMS_REMOVED_IN = "0.3.0"  # the release without them (CHANGELOG, 0.2.0: they work for that release only)


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


def test_the_old_import_paths_warn_naming_the_new_path_and_the_removal_version():
    for name in sorted(name for name in SHIMS if (PACKAGE / f"{name}.py").exists()):
        source = (PACKAGE / f"{name}.py").read_text()
        assert f"removed in {SHIMS_REMOVED_IN}" in ast.get_docstring(ast.parse(source)), name
        sys.modules.pop(f"retnet_hf.{name}", None)  # imported before: import it afresh, as a user's first import
        expected = rf"retnet_hf\.{name} is deprecated .* removed in retnet-hf {re.escape(SHIMS_REMOVED_IN)}: import "
        with pytest.warns(FutureWarning, match=expected + rf"retnet_hf\.model\.{name} instead"):
            module = importlib.import_module(f"retnet_hf.{name}")
        assert module is importlib.import_module(f"retnet_hf.model.{name}")


def test_the_old_import_paths_are_gone_by_their_removal_version():
    """Fails once the package's version reaches the release that drops the old paths while they are still here:
    delete the modules and SHIMS, and say so in that release's CHANGELOG."""
    left = sorted(name for name in SHIMS if (PACKAGE / f"{name}.py").exists())
    if Version(retnet_hf.__version__) >= Version(SHIMS_REMOVED_IN):
        assert left == [], f"retnet_hf {retnet_hf.__version__} still has {left}, to be removed in {SHIMS_REMOVED_IN}"


def test_the_layout_in_docs_names_every_module():
    """docs/design.md's "Layout" block names each module of the package (the map a newcomer reads first)."""
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    layout = text.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"([a-z_]+)\.py", layout))
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules <= named, f"docs/design.md's Layout leaves out {sorted(modules - named)}"


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


# ------------------------------------------------------------------------------- a clone that works on its own

REPOSITORY = PACKAGE.parent
# where the project was first built, data sat in a folder beside the clone; no file may read from there
OUTSIDE_DATA = re.compile(
    "|".join([re.escape(".." + "/shared"), r"[\"']shared[\"']\s*/\s*[\"']data", "shared" + "/data"])
)


def repository_files() -> list:
    """The files a clone has: git's list where this is a checkout, else every file outside venvs and caches."""
    try:
        names = (
            subprocess.run(["git", "ls-files", "-z"], cwd=REPOSITORY, capture_output=True, check=True, timeout=60)
            .stdout.decode()
            .split("\0")
        )
        return [REPOSITORY / name for name in names if name and (REPOSITORY / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = re.compile(r"^(\.venv|\.git|build|dist|.*\.egg-info|__pycache__|\.pytest_cache)")
        return [
            path
            for path in REPOSITORY.rglob("*")
            if path.is_file() and not any(skip.match(part) for part in path.relative_to(REPOSITORY).parts)
        ]


def test_nothing_reads_data_from_beside_the_clone():
    files = repository_files()
    assert any(path.name == "run" and path.parent.name == ".ci" for path in files)  # the listing was read at all
    offenders = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [
            f"{path.relative_to(REPOSITORY)}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1)
            if OUTSIDE_DATA.search(line)
        ]
    assert offenders == [], "read from the package's sample data (retnet_hf.sample_data) instead:\n" + "\n".join(
        offenders
    )


def test_the_repository_holds_no_file_over_a_megabyte():
    large = [
        f"{p.relative_to(REPOSITORY)}: {p.stat().st_size:,} bytes"
        for p in repository_files()
        if p.stat().st_size > 2**20
    ]
    assert large == []


def test_the_sample_data_is_in_the_package():
    from retnet_hf import sample_data

    for path in (sample_data.SHAKESPEARE_TRAIN, sample_data.SHAKESPEARE_HELD_OUT, sample_data.GUANACO):
        assert path.is_file() and path.parent == PACKAGE / "sample_data"
        assert path.name in (PACKAGE / "sample_data" / "README.md").read_text()  # its origin and licence beside it
    train, held_out = sample_data.SHAKESPEARE_TRAIN.read_text(), sample_data.SHAKESPEARE_HELD_OUT.read_text()
    assert held_out[:2000] not in train and len(train) == 399_862 and len(held_out) == 115_320
