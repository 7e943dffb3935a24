"""What the daemon's own user can reach: the files it reads again at every reload and the
directories its Maildir next hops write under.

Started as root, the daemon reads its config (and the relay-auth file it names) as root, then
becomes its user; from then on, at every reload and every delivery, it is that user that opens
them. A root-owned 0600 file or a root-owned Maildir base passes a check made as root and fails
later, at the first `systemctl reload` or the first message. So `qrouter check-config` makes the
check as that user (in a child that becomes it), and the supervisor makes it again once it has
become it, before it serves.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
from collections.abc import Callable, Iterable
from typing import NoReturn

from policy.next_hop import MAILDIR, NextHop
from policy.routing import Policy
from router.config import Config, privileges


def files_read(config: Config, config_path: str | None) -> list[tuple[str, str]]:
    """(what, path) of every file a reload reads."""
    named = [("config", config_path or ""), ("transports", config.transports),
             ("transport-defs", config.transport_defs), ("aliases", config.aliases),
             ("rewriting", config.rewriting), ("destinations", config.destinations),
             ("smtp-tls-ca", config.smtp_tls_ca), ("tls-report-dkim-key", config.tls_report_dkim_key),
             ("relay-auth", config.relay_auth.path if config.relay_auth else "")]
    return [(what, path) for what, path in named if path]


def maildir_bases(policy: Policy) -> list[tuple[str, str]]:
    """(where, directory) for each Maildir next hop: the directory its template is under, before
    the first placeholder (`/var/mail` for `/var/mail/%d/%u`)."""
    hops: list[tuple[str, NextHop | None]] = [("default-transport", policy.default_transport)]
    if policy.transport_map is not None:
        hops += [(rule.where, rule.next_hop) for rule in policy.transport_map.rules]
    return [(where, os.path.dirname(hop.argument.split("%", 1)[0]) or "/")
            for where, hop in hops if hop is not None and hop.kind == MAILDIR]


def problems(files: Iterable[tuple[str, str]], bases: Iterable[tuple[str, str]]) -> list[str]:
    """What this process cannot read of `files`, or make Maildirs under of `bases`."""
    user = pwd.getpwuid(os.getuid()).pw_name
    found = []
    for what, path in files:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY))
        except PermissionError:
            found.append(f"{what} {path}: user {user} cannot read it ({_owner(path)}), and reads it again at "
                         "every reload: give it to that user or to a group of it")
        except OSError:
            continue  # missing or otherwise unreadable: the check of the file itself says so
    for where, base in bases:
        existing = _existing_ancestor(base)
        if not os.access(existing, os.W_OK | os.X_OK):
            found.append(f"{where}: Maildirs under {base}: user {user} cannot make directories in {existing} "
                         f"({_owner(existing)}), and delivers as that user: its mail would be deferred")
    return found


def problems_as(entry: pwd.struct_passwd, spool_group: str, files: list[tuple[str, str]],
                bases: list[tuple[str, str]]) -> list[str]:
    """problems(), asked of a child that has become `entry`'s user (with `spool_group`, as the
    daemon does): the kernel's answer for that user, ACLs and all."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _answer_as(entry, spool_group, files, bases, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        data = answer.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        return [f"cannot check what user {entry.pw_name} can reach (the check ended with status {status})"]
    return json.loads(data)


def _answer_as(entry: pwd.struct_passwd, spool_group: str, files: list[tuple[str, str]],
               bases: list[tuple[str, str]], answer_fd: int) -> NoReturn:
    """In the child of problems_as: become the user, write the problems it has, and end."""
    status = 1
    try:
        privileges.become(entry, spool_group)
        os.write(answer_fd, json.dumps(problems(files, bases)).encode())
        status = 0
    finally:
        os._exit(status)


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _owner(path: str) -> str:
    """`root:mail 2775`, as ls would show who may do what."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return f"{_name(pwd.getpwuid, info.st_uid)}:{_name(grp.getgrgid, info.st_gid)} {info.st_mode & 0o7777:o}"


def _name(lookup: Callable[[int], tuple], number: int) -> str:
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)
