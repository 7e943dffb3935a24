"""Recipient verification at qpsmtpd's RCPT: the real qpsmtpd-forkserver with the queue/router
plugin and `verify-recipients 1`, a real qrouter daemon with local delivery through aliases,
swaks (and Python's SMTP client for a run of 1,000 recipients) as the client. The client
127.0.0.1 is not a relay client here: it sends to the domains of `rcpthosts`, as mail from
the internet does."""

from __future__ import annotations

import random
import smtplib
import string
import time

import pytest

from tests.daemon import wait_for
from tests.qpsmtpd_server import swaks
from tests.test_qpsmtpd import queued_as
from tests.unix_users import owned_dir, script
from workers.command import Account

NOT_A_RELAY_CLIENT = {"relayclients": "", "rcpthosts": "local.test\nblocked.test\nlater.test\n"}


@pytest.fixture
def site(tmp_path, daemons, world_dir):
    """A daemon delivering local.test through aliases (alice, bob<digits>) to an agent that
    files each message in `site.delivered`, refusing blocked.test by a queue/error rule, holding
    later.test back by a queue/retry rule, and reporting failures to senders (`send-ndr yes`)."""
    out = owned_dir(world_dir, Account.named("nobody"))
    agent = script(world_dir, "agent", f'cat > "{out}/$$.$(date +%s%N)"\n')
    (tmp_path / "aliases").write_text("root nobody\nalice nobody\nbob[0-9]+ nobody\n")
    (tmp_path / "transports").write_text(f"local.test {agent}\n"
                                         "blocked.test queue/error 5.7.1 we take no mail for blocked.test\n"
                                         "later.test queue/retry 4.2.0 held for maintenance\n")
    daemon = daemons("--transports", str(tmp_path / "transports"), "--aliases", str(tmp_path / "aliases"),
                     "--send-ndr", "yes", maildir=False)
    daemon.delivered = lambda: sorted(out.iterdir())
    return daemon


def smtp(server, *recipients: str, sender: str = "victim@innocent.test") -> tuple[int, str]:
    result = swaks(server.port, "--from", sender, "--to", ",".join(recipients))
    return result.returncode, result.stdout.decode(errors="replace")


def nothing_queued_nor_reported(daemon) -> None:
    for queue in ("incoming", "active", "deferred", "hold"):
        assert daemon.files(queue) == [], queue
    assert daemon.status()["counters"] == {"sent": 0, "deferred": 0, "bounced": 0}
    assert "to=<" not in daemon.log(), "no recipient was tried, no report sent"


def test_an_unknown_local_user_is_refused_at_rcpt_and_nothing_is_queued_or_reported(site, qpsmtpd):
    server = qpsmtpd(site.spool, "verify-recipients", "1", own_daemon=False, config=NOT_A_RELAY_CLIENT)
    code, out = smtp(server, "carol@local.test")
    assert code != 0
    assert "<** 550 5.1.1 no alias for local part 'carol' in" in out
    assert "DATA" not in out.split("<** 550")[1], "no message was sent"
    assert "refused recipient <carol@local.test>: 550 5.1.1 no alias for local part 'carol'" in server.log()
    nothing_queued_nor_reported(site)
    assert site.delivered() == []


@pytest.mark.parametrize("recipient", ["alice@local.test", "Bob42@local.test"], ids=["alias", "regex-alias"])
def test_a_known_alias_is_accepted_and_delivered(site, qpsmtpd, recipient):
    server = qpsmtpd(site.spool, "verify-recipients", "1", own_daemon=False, config=NOT_A_RELAY_CLIENT)
    result = swaks(server.port, "--from", "victim@innocent.test", "--to", recipient)
    assert f"<-  250 <{recipient}>, recipient ok" in result.stdout.decode()
    queue_id = queued_as(result)
    wait_for(lambda: f"{queue_id}: removed" in site.log(), what="the delivery")
    assert len(site.delivered()) == 1


def test_a_queue_error_rule_gives_its_text_at_rcpt_and_the_others_still_go(site, qpsmtpd):
    server = qpsmtpd(site.spool, "verify-recipients", "1", own_daemon=False, config=NOT_A_RELAY_CLIENT)
    result = swaks(server.port, "--from", "victim@innocent.test", "--to", "anyone@blocked.test,alice@local.test")
    out = result.stdout.decode()
    assert "<** 550 5.7.1 we take no mail for blocked.test" in out
    queue_id = queued_as(result)
    wait_for(lambda: f"{queue_id}: removed" in site.log(), what="the delivery to alice")
    assert "blocked.test" not in site.log()


def test_a_temporary_verdict_is_450_at_rcpt(site, qpsmtpd):
    server = qpsmtpd(site.spool, "verify-recipients", "1", own_daemon=False, config=NOT_A_RELAY_CLIENT)
    code, out = smtp(server, "anyone@later.test")
    assert code != 0 and "<** 450 4.2.0 held for maintenance" in out
    nothing_queued_nor_reported(site)


def test_1000_random_recipients_are_1000_refusals_with_nothing_queued(site, qpsmtpd, capsys):
    server = qpsmtpd(site.spool, "verify-recipients", "1", own_daemon=False, config=NOT_A_RELAY_CLIENT)
    rng = random.Random(21)
    locals_ = {"".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(1000)}
    assert len(locals_) == 1000 and "alice" not in locals_
    replies = []
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.example.test", timeout=60) as client:
        client.ehlo()
        assert client.mail("victim@innocent.test")[0] == 250
        started = time.perf_counter()
        for local in sorted(locals_):
            replies.append(client.rcpt(f"{local}@local.test"))
        took = time.perf_counter() - started
        client.rset()
    assert [code for code, _ in replies] == [550] * 1000
    assert all(text.startswith(b"5.1.1 no alias for local part") for _, text in replies)
    assert server.log().count("refused recipient <") == 1000
    assert site.status()["verify"]["refused"] == 1000
    nothing_queued_nor_reported(site)
    with capsys.disabled():
        print(f"\n  1,000 refused RCPTs through qpsmtpd: {took / 1000 * 1000:.1f} ms each")


def test_with_the_daemon_stopped_the_plugin_fails_open_and_logs(site, qpsmtpd):
    server = qpsmtpd(site.spool, "verify-recipients", "1", own_daemon=False, config=NOT_A_RELAY_CLIENT)
    assert site.stop() == 0
    result = swaks(server.port, "--from", "victim@innocent.test", "--to", "carol@local.test")
    queued_as(result)
    assert "cannot verify recipient <carol@local.test>: cannot reach the qrouter daemon at" in server.log()
    assert "accepted (verify-fail open)" in server.log()


def test_with_the_daemon_stopped_and_verify_fail_closed_the_answer_is_451(site, qpsmtpd):
    server = qpsmtpd(site.spool, "verify-recipients", "1", "verify-fail", "closed", own_daemon=False,
                     config=NOT_A_RELAY_CLIENT)
    assert site.stop() == 0
    code, out = smtp(server, "alice@local.test")
    assert code != 0
    assert "<** 451 4.3.0 Cannot verify the recipient now, try again later" in out
    assert "refused for now (verify-fail closed)" in server.log()
    assert site.files("incoming") == []


def test_relay_clients_are_not_checked_unless_configured(site, qpsmtpd):
    relaying = qpsmtpd(site.spool, "verify-recipients", "1", own_daemon=False)  # 127.0.0.1 may relay
    queued_as(swaks(relaying.port, "--from", "victim@innocent.test", "--to", "carol@local.test"))
    checked = qpsmtpd(site.spool, "verify-recipients", "1", "verify-relay-clients", "1", own_daemon=False)
    code, out = smtp(checked, "carol@local.test")
    assert code != 0 and "<** 550 5.1.1 no alias for local part 'carol'" in out


def test_without_verify_recipients_nothing_is_asked_and_the_forged_sender_gets_a_report(site, qpsmtpd):
    """The backscatter the check prevents: accepted at RCPT, bounced by qrouter, reported to
    whoever the sender claims to be."""
    server = qpsmtpd(site.spool, own_daemon=False, config=NOT_A_RELAY_CLIENT)
    queue_id = queued_as(swaks(server.port, "--from", "victim@innocent.test", "--to", "carol@local.test"))
    wait_for(lambda: f"{queue_id}: sender non-delivery notification:" in site.log(), what="the report to the sender")
    assert "to=<carol@local.test>, relay=none" in site.log() and "dsn=5.1.1, status=bounced" in site.log()
    counts = site.status()["verify"]
    assert counts["deliverable"] == counts["refused"] == counts["temporary"] == 0


@pytest.mark.parametrize(("args", "error"), [
    (["verify-recipients", "maybe"], "verify-recipients must be 1 or 0"),
    (["verify-fail", "ajar"], "verify-fail must be open or closed"),
])
def test_bad_verify_settings_keep_qpsmtpd_from_starting(site, qpsmtpd, args, error):
    server = qpsmtpd(site.spool, *args, own_daemon=False, start=False)
    server.start(wait=False)
    assert server.wait_exit() != 0
    assert error in server.log()
