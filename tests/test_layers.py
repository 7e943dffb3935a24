"""The layer contract of docs/architecture.md: every import of the project's own code points down.

Read from the source with the ast module, so imports inside functions count as much as those at
the top of a file: a lazy import that points up is still a dependency that points up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom first. A module may import its own layer and those below it, never one above.
LAYERS = (
    ("router.spool",),  # the queue file, its names and directories, the grammars of mail
    ("policy",),  # the administrator's files and the decisions they make; no processes
    ("router.logs",),  # what a log line says and where it goes
    ("router.config",),  # the daemon's keys, who runs as whom
    ("workers",),  # one delivery attempt: transports, local agents, reports
    ("router.daemon",),  # the supervisor, the dispatcher, the status socket
    ("router.front",),  # the front doors: sendmail, the SMTP queue handler
    ("router.admin", "router.__main__"),  # the qrouter command and its views
)
PACKAGES = ("router", "workers", "policy")


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix naming `module`'s layer. The package `router`
    itself is the bottom: every import of a module under it runs its (empty) __init__."""
    if module == "router":
        return 0
    best, found = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    if found is None:
        raise AssertionError(f"{module} belongs to no layer of docs/architecture.md")
    return found


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def own_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for each import of router, workers or policy in the file, resolved to the
    module it names (`from router.spool import trace` is router.spool.trace or router.spool)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    for path in sources():
        layer_of(module_name(path))


def upward_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Each import of `path` that points to a layer above its own, as FILE:LINE: what."""
    here = layer_of(module_name(path, root))
    return [f"{path.relative_to(root)}:{line}: imports {name} ({LAYERS[layer_of(name)][0]}, a layer above "
            f"{LAYERS[here][0]})" for line, name in own_imports(path) if layer_of(name) > here]


@pytest.mark.parametrize("path", sources(), ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_point_down(path: Path):
    upward = upward_imports(path)
    assert not upward, "\n".join(upward)


def test_the_contract_sees_an_upward_import(tmp_path: Path):
    """The check itself: a policy module importing the supervisor, even inside a function, is
    named with its line; the same import from the admin layer is fine."""
    (tmp_path / "policy").mkdir()
    (tmp_path / "router" / "admin").mkdir(parents=True)
    text = "import os\n\n\ndef later():\n    from router.daemon.supervisor import Supervisor\n"
    (tmp_path / "policy" / "probe.py").write_text(text)
    (tmp_path / "router" / "admin" / "probe.py").write_text(text)
    assert upward_imports(tmp_path / "policy" / "probe.py", tmp_path) == [
        "policy/probe.py:5: imports router.daemon.supervisor.Supervisor (router.daemon, a layer above policy)"]
    assert upward_imports(tmp_path / "router" / "admin" / "probe.py", tmp_path) == []
