"""Who each process of the daemon runs as, and the one right some of them keep.

Started as root, the daemon becomes its unprivileged `user` (default `qrouter`) before it reads
a queue file: the supervisor and every worker run with that uid, and the spool belongs to it.
Only the right to switch users survives, as the capabilities CAP_SETUID and CAP_SETGID, with
CAP_KILL to kill a program that overstays its time limit (a user may not signal another's):

- the supervisor keeps them permitted but not effective: it uses none, and only hands them on
  to the local delivery workers it forks;
- local delivery workers (pipes, local agents) make them effective, to start each program as
  the user it must run as (workers/command.py); the program itself gets none (execve drops
  capabilities a non-root process holds without file capabilities or ambient ones);
- network workers (SMTP, LMTP, Maildir, the queue transports) drop them for good and set
  no_new_privs: a worker that parses a hostile server's replies can never become anyone else.

Started as another user, nothing changes: the daemon runs as that user, and a local agent can
run only as that user too (or as any user, when a service manager gave the capabilities, as the
systemd unit in packaging/systemd does).
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd

CAP_KILL, CAP_SETGID, CAP_SETUID = 5, 6, 7
SWITCH_USERS = (1 << CAP_SETGID) | (1 << CAP_SETUID)
KEPT = SWITCH_USERS | (1 << CAP_KILL)  # and to kill the programs that outlive their time limit
_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4

_libc = ctypes.CDLL(None, use_errno=True)


class PrivilegeError(RuntimeError):
    """The daemon cannot take the identity it must run as; the message says what to do."""


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def capabilities() -> tuple[int, int]:
    """(effective, permitted) capability bits 0-31 of this thread."""
    data = (_Data * 2)()
    _check(_libc.capget(ctypes.byref(_Header(_CAPABILITY_VERSION_3, 0)), data), "capget")
    return data[0].effective, data[0].permitted


def _set_capabilities(effective: int, permitted: int) -> None:
    """Set the capabilities (bits 0-31; none above) with no inheritable ones, and clear the
    ambient set, so that no program this process starts inherits any."""
    data = (_Data * 2)()
    data[0].effective, data[0].permitted = effective, permitted
    _check(_libc.capset(ctypes.byref(_Header(_CAPABILITY_VERSION_3, 0)), data), "capset")
    clear_ambient()


def clear_ambient() -> None:
    """Empty this thread's ambient capabilities, which execve would hand on to any program (a
    service manager's AmbientCapabilities put them there). Capabilities belong to a thread: the
    threads it starts afterwards, and the processes they fork, inherit its sets. A kernel older
    than 4.3 has none and refuses: nothing to clear."""
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def can_switch_users() -> bool:
    """Whether this process may start programs as other users (root, or the two capabilities)."""
    return os.geteuid() == 0 or capabilities()[1] & SWITCH_USERS == SWITCH_USERS


def current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def fixed_agent_user() -> str | None:
    """The only user a local agent or pipe can run as, or None when any can be chosen."""
    return None if can_switch_users() else current_user()


def account(user: str) -> pwd.struct_passwd:
    """The daemon's unprivileged user; PrivilegeError when there is none (the daemon refuses to
    run as root rather than fall back to it)."""
    try:
        entry = pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise PrivilegeError(f"started as root, but the unprivileged user {user!r} (the user key) does not "
                             f"exist: create it (useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin "
                             f"{user}) or set user to an existing one") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"user {user!r} is root: the daemon needs an unprivileged user")
    return entry


def give_tree(path: str, entry: pwd.struct_passwd) -> int:
    """Make `path` and everything under it belong to `entry`'s uid (its group kept), without
    following links; returns how many entries changed. Done as root before the daemon becomes
    its user, for a spool that is not its yet (new, or written by an earlier version running as
    root); front doors running as root give each file they queue to the spool's owner."""
    changed = 0
    for directory, names, files in os.walk(path):
        for name in [directory, *(os.path.join(directory, n) for n in (*names, *files))]:
            info = os.lstat(name)
            if info.st_uid != entry.pw_uid:
                os.lchown(name, entry.pw_uid, -1)
                changed += 1
    return changed


def become(entry: pwd.struct_passwd, spool_group: str = "") -> None:
    """Turn this root process into `entry`'s user (its groups, and `spool_group`, so that files
    front doors queue with that group can be read), keeping the capabilities of KEPT permitted
    only."""
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    if spool_group:
        groups.add(grp.getgrnam(spool_group).gr_gid)
    _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups(sorted(groups))
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    _set_capabilities(0, KEPT)
    _check(_libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)


def keep_only_switching() -> None:
    """A supervisor started as a user with capabilities (systemd's AmbientCapabilities): keep the
    right to switch users permitted but not effective, and nothing else, inherited by nothing."""
    _set_capabilities(0, capabilities()[1] & KEPT)


def for_local_worker() -> None:
    """A local delivery worker: the right to switch users, if the supervisor has it, effective.
    As root without having become a user (never the daemon's way), it changes nothing."""
    if os.geteuid() != 0:
        permitted = capabilities()[1] & KEPT
        _set_capabilities(permitted, permitted)


def for_network_worker() -> None:
    """A network worker: no capabilities, now or after any execve (no_new_privs)."""
    if os.geteuid() != 0:
        _set_capabilities(0, 0)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
