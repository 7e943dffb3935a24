"""Write qrouter(8) and qrouter.conf(5) from the command line and the key table themselves, so the
pages cannot drift from them: the commands and their options as `qrouter --help` shows them, the
keys as `qrouter keys` lists them. docutils' manpage writer makes the troff.

    python packaging/man/generate.py [DIR]      (default: packaging/man)

tests/test_packaging.py runs it and compares with the pages in the tree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from docutils.core import publish_string
from docutils.writers import manpage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from router.admin import cli  # noqa: E402  (the checkout's, not an installed copy)
from router.config import KEYS, described  # noqa: E402

COMMAND_PAGE = """\
=======
qrouter
=======

-------------------------------------------------------
policy mail router and spooler that runs beside qpsmtpd
-------------------------------------------------------

:Manual section: 8
:Manual group: qrouter

SYNOPSIS
========

**qrouter** *COMMAND* [*OPTIONS*] [*ARGUMENTS*]

DESCRIPTION
===========

qrouter takes mail that qpsmtpd (or **qrouter enqueue**, **qrouter-sendmail**) has queued in its
spool and delivers it by the policy in force: relay hosts, DNS MX routing, LMTP, local delivery
agents run as the aliased user, pipes, Maildirs. Once a message is queued it is on disk and is
never lost; it is delivered, or its sender hears why not.

Every command that reads the configuration takes **--config** *FILE* (see **qrouter.conf**\\(5)) and,
as flags, the configuration keys it uses (**qrouter keys** lists them all). Exit codes follow
sysexits: 64 for a usage error, 75 for a temporary failure, 77 for a permission denied, 78 for a
configuration error.

COMMANDS
========

{commands}
SEE ALSO
========

**qrouter.conf**\\(5), **qpsmtpd**\\(8), **postqueue**\\(1), **postsuper**\\(1), the README of the
project.
"""

CONFIG_PAGE = """\
============
qrouter.conf
============

-------------------------------------
configuration of the qrouter daemon
-------------------------------------

:Manual section: 5
:Manual group: qrouter

DESCRIPTION
===========

The configuration file has one *key value* a line; a **#** at the start of a line or after a
space starts a comment. Relative paths are taken from the file's directory. Every key is also a
flag of **qrouter run** and **qrouter check-config** (**--max-age 2**), which wins over the file.
**qrouter check-config** names every error as *FILE:LINE*; **SIGHUP** reloads the file and the
policy files it names, and a bad one is refused while the running configuration stays.

KEYS
====

{keys}
SEE ALSO
========

**qrouter**\\(8)
"""


def _escape(text: str) -> str:
    """Text as reStructuredText shows it literally."""
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("`", "\\`").replace("|", "\\|")


def _commands() -> str:
    """A definition per command: its synopsis, its help and the options other than config keys."""
    entries = []
    for name, command in _walk(cli.typer.main.get_command(cli.app), "qrouter"):
        options = [param for param in command.params if param.name.replace("_", "-") not in KEYS]
        lines = [f"**{name}**", ""]
        lines += [f"   {_escape(line)}" if line else "" for line in (command.help or "").strip().splitlines()]
        for param in options:
            names = ", ".join(f"**{_escape(option)}**" for option in param.opts) if param.param_type_name == "option" \
                else f"*{_escape(param.metavar or param.name.upper())}*"
            metavar = f" *{_escape(param.metavar)}*" if param.param_type_name == "option" and param.metavar else ""
            lines += ["", f"   {names}{metavar}", f"      {_escape(param.help or '')}"]
        entries.append("\n".join(lines) + "\n")
    return "\n".join(entries)


def _walk(group, prefix: str):
    """(`qrouter queue list`, its command) for every command, in the order of `qrouter --help`."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _walk(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def _keys() -> str:
    return "\n".join(f"**{key}** *{_escape(KEYS[key].metadata['metavar'])}*\n   {_escape(described(key))}\n"
                     for key in KEYS)


def pages() -> dict[str, bytes]:
    """File name -> troff."""
    sources = {"qrouter.8": COMMAND_PAGE.format(commands=_commands()),
               "qrouter.conf.5": CONFIG_PAGE.format(keys=_keys())}
    return {name: publish_string(source, writer=manpage.Writer(),
                                 settings_overrides={"report_level": 2, "halt_level": 2})
            for name, source in sources.items()}


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    for name, troff in pages().items():
        (target / name).write_bytes(troff)


if __name__ == "__main__":
    main()
