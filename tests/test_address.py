"""RFC 5321 paths (router/spool/address.py): which envelope addresses qrouter accepts, and why not."""

from __future__ import annotations

import pytest

from router.spool import Spool, SpoolError
from router.spool.address import AddressError, parse_path, split_address
from tests.daemon import qrouter

LABEL_63 = "a" * 63
LONG_DOMAIN = ".".join([LABEL_63] * 3) + ".example"  # 199 octets

VALID = [
    ("<user@example.org>", "user@example.org"),
    ("user@example.org", "user@example.org"),
    ("<USER@Example.ORG>", "USER@Example.ORG"),
    ("<first.last+tag@example.org>", "first.last+tag@example.org"),
    ("<!#$%&'*+/=?^_`{|}~-@example.org>", "!#$%&'*+/=?^_`{|}~-@example.org"),
    ("<user@localhost>", "user@localhost"),
    ("<user@xn--bcher-kva.example>", "user@xn--bcher-kva.example"),
    ("<user@a-b.c0.example>", "user@a-b.c0.example"),
    ("<user@1.2.3.4.example>", "user@1.2.3.4.example"),
    ('<"john smith"@example.org>', '"john smith"@example.org'),
    ('<"a\\"b\\\\c"@example.org>', '"a\\"b\\\\c"@example.org'),
    ('<""@example.org>', '""@example.org'),
    ('<"user@home"@example.org>', '"user@home"@example.org'),
    ('<"a..b."@example.org>', '"a..b."@example.org'),
    ('<"grüße"@example.org>', '"grüße"@example.org'),
    ("<jörg@bücher.example>", "jörg@bücher.example"),
    ("<用户@例子.广告>", "用户@例子.广告"),
    ("<δοκιμή@παράδειγμα.δοκιμή>", "δοκιμή@παράδειγμα.δοκιμή"),
    ("<postmaster@[127.0.0.1]>", "postmaster@[127.0.0.1]"),
    ("<root@[IPv6:::1]>", "root@[IPv6:::1]"),
    ("<root@[ipv6:2001:DB8::1]>", "root@[ipv6:2001:DB8::1]"),
    ("<root@[IPv6:::ffff:192.0.2.1]>", "root@[IPv6:::ffff:192.0.2.1]"),
    ("<root@[x-tag:some-content]>", "root@[x-tag:some-content]"),
    ("<@relay.example:user@example.org>", "user@example.org"),
    ("<@one.example,@two.example:user@example.org>", "user@example.org"),
    ("<" + "a" * 64 + "@example.org>", "a" * 64 + "@example.org"),
    ("<" + "é" * 32 + "@example.org>", "é" * 32 + "@example.org"),  # 64 octets
    (f"<user@{LABEL_63}.example>", f"user@{LABEL_63}.example"),
    (f"<{'a' * 54}@{LONG_DOMAIN}>", f"{'a' * 54}@{LONG_DOMAIN}"),  # 254 octets, the limit
]


@pytest.mark.parametrize(("text", "mailbox"), VALID, ids=[v[1][:40] for v in VALID])
def test_valid_path(text, mailbox):
    assert parse_path(text) == mailbox
    assert parse_path(text, null_ok=True) == mailbox


INVALID = [
    ("<user@example.org\r>", "contains CR, LF or NUL"),
    ("<user@example.org>\r\n", "contains CR, LF or NUL"),
    ("<user\n@example.org>", "contains CR, LF or NUL"),
    ("<user\0@example.org>", "contains CR, LF or NUL"),
    ("<user@example.org>\r\nRCPT TO:<other@example.org>", "contains CR, LF or NUL"),
    ("\udcff@example.org", "is not valid UTF-8"),
    ("<user@example.org", "unbalanced angle brackets"),
    ("user@example.org>", "unbalanced angle brackets"),
    (" <user@example.org>", "unbalanced angle brackets"),
    ("<<user@example.org>>", "local part of '<user@example.org>' is not a valid"),
    ("<user>", "has no local part and domain"),
    ("<@example.org>", "has no local part and domain"),
    ("<user@>", "has an empty domain"),
    ("<" + "a" * 65 + "@example.org>", "is longer than 64 octets"),
    ("<" + "é" * 33 + "@example.org>", "is longer than 64 octets"),
    (f"<{'a' * 55}@{LONG_DOMAIN}>", "is longer than 254 octets"),
    ("<a..b@example.org>", "is not a valid dot-string or quoted string"),
    ("<.a@example.org>", "is not a valid dot-string or quoted string"),
    ("<a.@example.org>", "is not a valid dot-string or quoted string"),
    ("<john smith@example.org>", "is not a valid dot-string or quoted string"),
    ("<a(comment)@example.org>", "is not a valid dot-string or quoted string"),
    ("<a,b@example.org>", "is not a valid dot-string or quoted string"),
    ('<"unbalanced@example.org>', "is not a valid dot-string or quoted string"),
    ('<"a"b"@example.org>', "is not a valid dot-string or quoted string"),
    ('<"a\\"@example.org>', "is not a valid dot-string or quoted string"),
    ('<"tab\there"@example.org>', "is not a valid dot-string or quoted string"),
    ("<user@-example.org>", "is not a valid host name"),
    ("<user@example-.org>", "is not a valid host name"),
    ("<user@exa_mple.org>", "is not a valid host name"),
    ("<user@example..org>", "is not a valid host name"),
    ("<user@.example.org>", "is not a valid host name"),
    ("<user@example.org.>", "is not a valid host name"),
    ("<user@exa mple.org>", "is not a valid host name"),
    (f"<user@{'a' * 64}.example>", "is not a valid host name"),
    ("<user@[127.0.0.256]>", "is not a valid address literal"),
    ("<user@[127.0.0]>", "is not a valid address literal"),
    ("<user@[127.0.0.1>", "is not a valid address literal"),
    ("<user@[IPv6:::g]>", "is not a valid address literal"),
    ("<user@[IPv6:1:2:3:4:5:6:7:8:9]>", "is not a valid address literal"),
    ("<user@[IPv6:fe80::1%eth0]>", "is not a valid address literal"),
    ("<user@[IPv6:fe80::1%a b]>", "is not a valid address literal"),
    ("<user@[::1]>", "is not a valid address literal"),
    ("<user@[tag:]>", "is not a valid address literal"),
    ("<user@[tag:a b]>", "is not a valid address literal"),
    ("<user@[]>", "is not a valid address literal"),
    ("<>", "the null address <> is only valid as a sender"),
    ("", "the null address <> is only valid as a sender"),
]


@pytest.mark.parametrize(("text", "reason"), INVALID, ids=[repr(t)[:40] for t, _ in INVALID])
def test_invalid_path(text, reason):
    with pytest.raises(AddressError) as info:
        parse_path(text)
    assert reason in str(info.value)


@pytest.mark.parametrize(("text", "reason"), INVALID[:-2], ids=[repr(t)[:40] for t, _ in INVALID[:-2]])
def test_invalid_path_is_invalid_as_sender_too(text, reason):
    with pytest.raises(AddressError) as info:
        parse_path(text, null_ok=True)
    assert reason in str(info.value)


def test_null_path_only_with_null_ok():
    assert parse_path("<>", null_ok=True) == ""
    assert parse_path("", null_ok=True) == ""
    with pytest.raises(AddressError, match="only valid as a sender"):
        parse_path("<>")
    with pytest.raises(AddressError):
        parse_path("< >", null_ok=True)


def test_source_route_leading_to_nothing_is_rejected():
    with pytest.raises(AddressError, match="has no local part and domain"):
        parse_path("<@relay.example:>", null_ok=True)


def test_split_address_uses_the_last_at_sign():
    assert split_address('"user@home"@example.org') == ('"user@home"', "example.org")
    assert split_address("jörg@bücher.example") == ("jörg", "bücher.example")


def test_enqueue_refuses_invalid_addresses_before_queueing(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    with pytest.raises(SpoolError, match="contains CR, LF or NUL") as info:
        spool.enqueue("a@example.org", ["b@example.org", "c@example.org\r\nDATA"], b"x")
    assert info.value.temporary is False
    with pytest.raises(SpoolError, match="only valid as a sender"):
        spool.enqueue("a@example.org", ["<>"], b"x")
    assert spool.list("incoming") == spool.list("tmp") == []
    queue_id = spool.enqueue("<@relay.example:a@example.org>", ["<jörg@bücher.example>"], b"x")
    assert spool.list("incoming") == [queue_id]


def test_command_line_address_that_is_not_utf8_is_a_usage_error(tmp_path):
    """An argument with a byte that is not UTF-8 gets an error message, not a traceback."""
    result = qrouter("enqueue", "--queue-dir", str(tmp_path / "spool"), "-f", "a@example.org",
                     "b\udcff@example.org", stdin=b"x\n")
    assert result.returncode == 64
    assert b"is not valid UTF-8" in result.stderr and b"Traceback" not in result.stderr
    incoming = tmp_path / "spool" / "incoming"
    assert not incoming.exists() or not any(incoming.iterdir())  # nothing queued (the address is checked first)
