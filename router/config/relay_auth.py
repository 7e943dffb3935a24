"""Credentials for SMTP AUTH to relay hosts: the `relay-auth` file, `host user password` a line.

The file is refused when group or others may read it, as ssh refuses a readable private key: a
password file that anyone on the machine can read is a leak waiting to be noticed. The password
is the rest of the line; like every policy file (policy/policy_file.py), a `#` after white space
starts a comment, so a password cannot hold ` #` (it may hold `#` after anything else).
"""

from __future__ import annotations

from policy.policy_file import read_lines


class RelayAuthError(ValueError):
    pass


class Credentials(dict[str, tuple[str, str]]):
    """Relay host (as written in `relayhost`, lower case) -> (user, password), and the file they
    came from (read again at every reload)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path


def load_relay_auth(path: str) -> Credentials:
    """The credentials in the file at `path`."""
    credentials = Credentials(path)
    for number, line in read_lines(path, RelayAuthError, private=True):
        parts = line.split(None, 2)
        if len(parts) != 3:
            raise RelayAuthError(f"{path}:{number}: expected 'host user password'")
        host, user, password = parts
        credentials[host.lower()] = (user, password)
    return credentials
