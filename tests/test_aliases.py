"""The aliases file for local delivery: entries, regexes, the root rule, and routing through it."""

from __future__ import annotations

import re

import pytest

from policy.aliases import load_aliases
from policy.next_hop import ERROR, MDA
from policy.routing import load_policy
from policy.transport_map import PolicyError
from router.config import load
from router.spool import Spool
from tests.daemon import qrouter, wait_for
from tests.unix_users import script

ALIASES = "# virtual   unix\nroot        daemon\npostmaster  daemon\n.*master    nobody\njohn.doe    nobody\n"


def aliases_file(tmp_path, text=ALIASES):
    path = tmp_path / "aliases"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("local", "user", "line"), [
    ("root", "daemon", 2),
    ("ROOT", "daemon", 2),
    ("postmaster", "daemon", 3),  # the exact entry on line 3 comes before the regex on line 4
    ("webmaster", "nobody", 4),
    ("Webmaster", "nobody", 4),
    ("john.doe", "nobody", 5),
])
def test_lookup(tmp_path, local, user, line):
    alias = load_aliases(str(aliases_file(tmp_path)), local_delivery=True).lookup(local)
    assert (alias.user, alias.where) == (user, f"{tmp_path / 'aliases'}:{line}")


@pytest.mark.parametrize("local", ["johnXdoe", "master-of-none", "nobody"])
def test_no_alias(tmp_path, local):
    assert load_aliases(str(aliases_file(tmp_path)), local_delivery=True).lookup(local) is None


@pytest.mark.parametrize(("text", "error"), [
    ("root daemon\nbob\n", ":2: expected 'virtual-user unix-user'"),
    ("root daemon\nbob@example.org nobody\n", ":2: 'bob@example.org': aliases take local parts, not addresses"),
    ("root daemon\n(bob nobody\n", ":2: bad regex '(bob'"),
    ("root daemon\nbob no-such-user-here\n", ":2: no such unix user 'no-such-user-here'"),
    ("root daemon\nbob root\n", ":2: bob -> root: local delivery never runs as root"),
    ("bob nobody\n", ": no entry for root (local delivery never delivers to root: alias it)"),
])
def test_errors(tmp_path, text, error):
    with pytest.raises(PolicyError) as caught:
        load_aliases(str(aliases_file(tmp_path, text)), local_delivery=True)
    assert str(caught.value).startswith(str(tmp_path / "aliases"))
    assert error in str(caught.value)


def test_root_entry_only_required_with_local_delivery(tmp_path):
    assert load_aliases(str(aliases_file(tmp_path, "bob nobody\n")), local_delivery=False).lookup("bob")


def test_policy_routes_local_delivery_through_aliases(tmp_path):
    (tmp_path / "transports").write_text("local.example /usr/bin/maildrop\n")
    config = load(None, {"transports": str(tmp_path / "transports"), "aliases": str(aliases_file(tmp_path))})
    policy = load_policy(config)
    routed = policy.route("Webmaster@local.example")
    assert (routed.next_hop.kind, routed.next_hop.user) == (MDA, "nobody")
    assert routed.reason.endswith(f"alias {tmp_path / 'aliases'}:4 (.*master -> nobody)")
    refused = policy.route("stranger@local.example")
    assert refused.next_hop.kind == ERROR
    assert refused.next_hop.argument == f"5.1.1 no alias for local part 'stranger' in {tmp_path / 'aliases'}"
    assert policy.route("x@elsewhere.example").next_hop.user == ""


def test_local_delivery_without_aliases_file_is_refused(tmp_path):
    (tmp_path / "transports").write_text("local.example /usr/bin/maildrop\n")
    with pytest.raises(PolicyError, match=r"local delivery \(/usr/bin/maildrop\) needs an aliases file"):
        load_policy(load(None, {"transports": str(tmp_path / "transports")}))
    result = qrouter("check-config", "--default-transport", "/usr/bin/procmail")
    assert result.returncode == 78 and b"needs an aliases file" in result.stderr


def test_route_command_names_the_alias(tmp_path):
    (tmp_path / "qrouter.conf").write_text(f"default-transport /usr/bin/maildrop\naliases {aliases_file(tmp_path)}\n")
    answer = qrouter("route", "--config", str(tmp_path / "qrouter.conf"), "webmaster@local.example", check=True)
    expected = f"reason:    default-transport, alias {tmp_path / 'aliases'}:4 (.*master -> nobody)"
    assert expected in answer.stdout.decode()


def test_unaliased_local_recipient_bounces_and_aliased_one_runs_as_its_user(daemons, tmp_path, world_dir):
    agent = script(world_dir, "agent", 'cat >/dev/null; echo "busy as $(id -un)"; exit 75\n')
    daemon = daemons("--default-transport", agent, "--aliases", str(aliases_file(tmp_path)),
                     "--archive-failed", "yes")
    Spool(daemon.spool).enqueue("s@example.org", ["stranger@local.example", "root@local.example"], b"x\n")
    root = wait_for(lambda: re.search(rf"to=<root@local\.example>, relay=local\[(\w+):{agent}\], .*"
                                      r"status=deferred \(busy as (\w+)\)", daemon.log()), what="the agent's run")
    assert root[1] == root[2] == "daemon", "as the aliases file names for root"
    # the local worker may run root's part before the network worker logs the bounce
    stranger = wait_for(lambda: next((ln for ln in daemon.log().splitlines() if "to=<stranger@local.example>" in ln),
                                     None), what="the stranger's line")
    assert "dsn=5.1.1, status=bounced (no alias for local part 'stranger' in" in stranger
