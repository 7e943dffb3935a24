"""Address rewriting (policy/rewriting.py): the rules file, envelope addresses, and the From:,
To: and Cc: header fields, where nothing but the domains of addresses may change."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.rewriting import Rewriter, RewritingError, load_rewriting, parse_rewriting

WHERE = "rw.conf"
PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def rules(text: str) -> Rewriter:
    return parse_rewriting(text, WHERE)


# -- envelope addresses ----------------------------------------------------------------------

DESIGN = r"""
from *.servers.company.foo company.foo
to /.*\.foo\.bar/ foo.bar
"""

# (rules, direction, address, rewritten address, line of the rule that did it or None)
ENVELOPE = [
    # the original design's examples
    (DESIGN, "from", "host1.servers.company.foo", None, None),  # no @: not an address
    (DESIGN, "from", "root@host1.servers.company.foo", "root@company.foo", 2),
    (DESIGN, "from", "root@a.b.servers.company.foo", "root@company.foo", 2),
    (DESIGN, "from", "root@servers.company.foo", None, None),
    (DESIGN, "from", "root@xservers.company.foo", None, None),
    (DESIGN, "to", "root@host1.servers.company.foo", None, None),
    (DESIGN, "to", "user@x.y.foo.bar", "user@foo.bar", 3),
    (DESIGN, "to", "user@X.Y.FOO.Bar", "user@foo.bar", 3),
    (DESIGN, "to", "user@y.foo.bar", "user@foo.bar", 3),
    (DESIGN, "to", "user@foo.bar", None, None),
    (DESIGN, "to", "user@xfoo.bar", None, None),
    (DESIGN, "to", "user@x.foo.bar.example", None, None),
    (DESIGN, "from", "user@x.y.foo.bar", None, None),
    # a plain domain: that domain only, any case
    ("both old.example new.example", "from", "u@old.example", "u@new.example", 1),
    ("both old.example new.example", "to", "u@OLD.Example", "u@new.example", 1),
    ("both OLD.EXAMPLE New.Example", "to", "u@old.example", "u@New.Example", 1),
    ("both old.example new.example", "to", "u@sub.old.example", None, None),
    ("both old.example new.example", "to", "u@old.example.org", None, None),
    ("from old.example new.example", "to", "u@old.example", None, None),
    ("to old.example new.example", "from", "u@old.example", None, None),
    ("both [192.0.2.1] example.org", "to", "u@[192.0.2.1]", "u@example.org", 1),
    ("both [IPv6:2001:db8::1] example.org", "to", "u@[ipv6:2001:DB8::1]", "u@example.org", 1),
    ("both old.example [192.0.2.1]", "to", "u@old.example", "u@[192.0.2.1]", 1),
    # a wildcard: any subdomain, not the domain itself
    ("to *.example org.example", "to", "u@a.example", "u@org.example", 1),
    ("to *.example org.example", "to", "u@A.B.EXAMPLE", "u@org.example", 1),
    ("to *.example org.example", "to", "u@example", None, None),
    ("to *.example org.example", "to", "u@aexample", None, None),
    # a regex: whole domain, case-insensitive
    ("both /mx[0-9]+\\.example/ example", "from", "u@MX12.example", "u@example", 1),
    ("both /mx[0-9]+\\.example/ example", "from", "u@mx12.example.org", None, None),
    ("both /mx[0-9]+\\.example/ example", "from", "u@a.mx12.example", None, None),
    ("both /mx|relay/ example", "from", "u@relay", "u@example", 1),
    ("both /mx|relay/ example", "from", "u@mx.relay", None, None),
    ("both /\\[[0-9.]+\\]/ example", "from", "u@[192.0.2.1]", "u@example", 1),
    # IDNA: a U-label rule matches the A-label form and the other way round
    ("both bücher.example books.example", "to", "u@xn--bcher-kva.example", "u@books.example", 1),
    ("both xn--bcher-kva.example books.example", "to", "u@bücher.example", "u@books.example", 1),
    ("both XN--BCHER-KVA.example books.example", "to", "u@BÜCHER.example", "u@books.example", 1),
    ("both bücher.example books.example", "to", "u@bu\u0308cher.example", "u@books.example", 1),
    ("both straße.example street.example", "to", "u@xn--strae-oqa.example", "u@street.example", 1),
    ("both straße.example street.example", "to", "u@strasse.example", None, None),
    ("to *.bücher.example books.example", "to", "u@a.xn--bcher-kva.example", "u@books.example", 1),
    ("to *.xn--bcher-kva.example books.example", "to", "u@a.bücher.example", "u@books.example", 1),
    ("to *.bücher.example books.example", "to", "u@xn--bcher-kva.example", None, None),
    ("to /.*\\.bücher\\.example/ books.example", "to", "u@a.xn--bcher-kva.example", "u@books.example", 1),
    ("to /xn--bcher-kva\\..*/ books.example", "to", "u@bücher.example", "u@books.example", 1),
    ("to xn--zz.example new.example", "to", "u@xn--zz.example", "u@new.example", 1),  # not a real A-label
    ("both books.example bücher.example", "to", "u@books.example", "u@bücher.example", 1),
    # only the domain changes: the local part stays byte for byte
    ("both old.example new.example", "to", "First.Last+Tag@old.example", "First.Last+Tag@new.example", 1),
    ("both old.example new.example", "to", '"John Smith"@old.example', '"John Smith"@new.example', 1),
    ("both old.example new.example", "to", '"a@old.example"@old.example', '"a@old.example"@new.example', 1),
    ("both old.example new.example", "to", "Jörg@old.example", "Jörg@new.example", 1),
    ("both old.example new.example", "from", "", None, None),  # the null sender
    ("both old.example new.example", "from", "u@", None, None),
    # precedence: the first rule that applies and matches wins
    ("both a.example first.example\nboth a.example second.example", "to", "u@a.example", "u@first.example", 1),
    ("both *.example first.example\nboth a.example second.example", "to", "u@a.example", "u@first.example", 1),
    ("both a.example first.example\nboth *.example second.example", "to", "u@b.example", "u@second.example", 2),
    ("to a.example to.example\nboth a.example both.example", "to", "u@a.example", "u@to.example", 1),
    ("to a.example to.example\nboth a.example both.example", "from", "u@a.example", "u@both.example", 2),
    ("from a.example from.example\nto a.example to.example", "to", "u@a.example", "u@to.example", 2),
    ("to /.*/ any.example\nfrom a.example from.example", "from", "u@a.example", "u@from.example", 2),
    ("to /.*/ any.example\nfrom a.example from.example", "to", "u@a.example", "u@any.example", 1),
    ("# rules\n\nfrom b.example x.example  # not this one\nboth a.example y.example\n", "from", "u@a.example",
     "u@y.example", 4),
    # the new domain is not looked up again: rewriting is one step
    ("both a.example b.example\nboth b.example c.example", "to", "u@a.example", "u@b.example", 1),
]


@pytest.mark.parametrize(("text", "direction", "address", "rewritten", "line"), ENVELOPE,
                         ids=[f"{e[1]}-{e[2]}-{i}" for i, e in enumerate(ENVELOPE)])
def test_envelope_rewriting(text, direction, address, rewritten, line):
    new, rule = rules(text).rewrite(direction, address)
    assert new == (address if rewritten is None else rewritten)
    assert (rule.line if rule else None) == line
    if rule:
        assert rule.where == f"{WHERE}:{line}"
        assert rules(text).rule_for(direction, address.rpartition("@")[2]) == rule


def test_rule_explains_itself():
    _, rule = rules(DESIGN).rewrite("from", "root@host1.servers.company.foo")
    assert str(rule) == "rw.conf:2: from *.servers.company.foo company.foo"
    assert (rule.source, rule.line, rule.direction, rule.old, rule.new, rule.kind) == (
        WHERE, 2, "from", "*.servers.company.foo", "company.foo", "wildcard")


def test_no_rules_change_nothing():
    empty = Rewriter()
    assert empty.rules == ()
    assert empty.rewrite("from", "u@old.example") == ("u@old.example", None)
    message = b"From: u@old.example\nTo: v@old.example\n\nbody\n"
    assert empty.rewrite_headers(message) is message
    assert rules("# nothing here\n\n").rules == ()


def test_direction_must_be_from_or_to():
    with pytest.raises(ValueError, match="direction must be 'from' or 'to', not 'both'"):
        rules(DESIGN).rewrite("both", "u@x.foo.bar")


# -- the file ----------------------------------------------------------------------------------

ERRORS = [
    ("sender a.example b.example", "rw.conf:1: unknown direction 'sender' (known: from, to, both)"),
    ("From a.example b.example", "rw.conf:1: unknown direction 'From' (known: from, to, both)"),
    ("from", "rw.conf:1: missing old and new domains (a rule is 'direction old new')"),
    ("from a.example", "rw.conf:1: missing new domain (a rule is 'direction old new')"),
    ("from a.example # b.example", "rw.conf:1: missing new domain (a rule is 'direction old new')"),
    ("from a.example b.example c d",
     "rw.conf:1: unexpected 'c d' after the new domain (a rule is 'direction old new')"),
    ("to /(/ b.example", "rw.conf:1: bad regex /(/: missing ), unterminated subpattern at position 0"),
    ("to /a{2,1}/ b.example", "rw.conf:1: bad regex /a{2,1}/: min repeat greater than max repeat at position 2"),
    ("to /abc b.example", "rw.conf:1: regex '/abc' does not end with '/' (write /regex/)"),
    ("to / b.example", "rw.conf:1: regex '/' does not end with '/' (write /regex/)"),
    ("to // b.example", "rw.conf:1: empty regex '//'"),
    ("to a.example b..example", "rw.conf:1: new domain 'b..example' is not a valid host name"),
    ("to a.example -b.example", "rw.conf:1: new domain '-b.example' is not a valid host name"),
    ("to a.example *.b.example", "rw.conf:1: new domain '*.b.example' is not a valid host name"),
    ("to a.example /b/", "rw.conf:1: new domain '/b/' is not a valid host name"),
    ("to a.example [192.0.2]", "rw.conf:1: new domain '[192.0.2]' is not a valid address literal"),
    (f"to a.example {'a' * 64}.example", f"rw.conf:1: new domain '{'a' * 64}.example' is not a valid host name"),
    (f"to a.example {'a.' * 128}example",
     f"rw.conf:1: new domain '{'a.' * 128}example' is longer than 255 octets"),
    ("to *.bad..example b.example", "rw.conf:1: wildcard '*.bad..example': 'bad..example' is not a valid host name"),
    ("to *. b.example", "rw.conf:1: wildcard '*.': '' is empty"),
    ("to *.*.example b.example", "rw.conf:1: wildcard '*.*.example': '*.example' is not a valid host name"),
    ("to *.[192.0.2.1] b.example",
     "rw.conf:1: wildcard '*.[192.0.2.1]': '[192.0.2.1]' is an address literal, which has no subdomains"),
    ("to a.*.example b.example",
     "rw.conf:1: wildcard 'a.*.example': a wildcard is '*.' and a domain, e.g. *.example.org"),
    ("to *example b.example", "rw.conf:1: wildcard '*example': a wildcard is '*.' and a domain, e.g. *.example.org"),
    ("to a_b.example b.example", "rw.conf:1: old domain 'a_b.example' is not a valid host name"),
    ("to [300.1.1.1] b.example", "rw.conf:1: old domain '[300.1.1.1]' is not a valid address literal"),
    ("# header\n\nfrom a.example b.example   # fine\n  \nnope\n",
     "rw.conf:5: missing old and new domains (a rule is 'direction old new')"),
    ("from a.example b.example\r\nto x.example\r\n", "rw.conf:2: missing new domain (a rule is 'direction old new')"),
]


@pytest.mark.parametrize(("text", "error"), ERRORS, ids=[e[1][9:50] for e in ERRORS])
def test_file_errors_name_file_line_and_problem(text, error):
    with pytest.raises(RewritingError) as caught:
        rules(text)
    assert str(caught.value) == error


def test_load_reads_a_file_and_names_it(tmp_path):
    path = tmp_path / "rewriting"
    path.write_bytes(b"# outgoing\r\nfrom *.servers.company.foo company.foo\r\n\r\nto old.example new.example # in\r\n")
    rewriter = load_rewriting(str(path))
    assert [str(rule) for rule in rewriter.rules] == [
        f"{path}:2: from *.servers.company.foo company.foo", f"{path}:4: to old.example new.example"]
    path.write_bytes(b"from a.example b.example\nto x.example\n")
    with pytest.raises(RewritingError, match=rf"^{re.escape(str(path))}:2: missing new domain"):
        load_rewriting(str(path))


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "rewriting"
    path.write_bytes(b"from a.example b.example\nto b\xe4cker.example c.example\n")
    with pytest.raises(RewritingError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8$"):
        load_rewriting(str(path))


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(RewritingError, match=rf"^{re.escape(str(path))}: cannot read rewriting rules: No such file"):
        load_rewriting(str(path))


def test_a_comment_needs_white_space_before_it():
    rewriter = rules("both /a#b/ new.example # x\n")
    assert rewriter.rewrite("to", "u@a#b") == ("u@new.example", rewriter.rules[0])
    with pytest.raises(RewritingError, match=r"new domain 'new\.example#x' is not a valid host name"):
        rules("both a.example new.example#x\n")


# -- header fields -----------------------------------------------------------------------------

HEADER_RULES = r"""
from *.servers.company.foo company.foo
to /.*\.foo\.bar/ foo.bar
both old.example new.example
from sender.example out.example
to rcpt.example in.example
both bücher.example books.example
"""

# (message, rewritten message); "\n" stands for the message's line end, tested as LF and CRLF
HEADERS = [
    # the forms of an address
    ("From: u@old.example\n\nbody\n", "From: u@new.example\n\nbody\n"),
    ("From: <u@old.example>\n\n", "From: <u@new.example>\n\n"),
    ("From: John Doe <u@old.example>\n\n", "From: John Doe <u@new.example>\n\n"),
    ("From:u@old.example\n\n", "From:u@new.example\n\n"),
    ("From: u@host1.servers.company.foo\n\n", "From: u@company.foo\n\n"),
    ("From: First.Last+Tag@OLD.Example\n\n", "From: First.Last+Tag@new.example\n\n"),
    ('To: "John Smith"@old.example\n\n', 'To: "John Smith"@new.example\n\n'),
    ('To: "a@old.example"@old.example\n\n', 'To: "a@old.example"@new.example\n\n'),
    ("To: u @ old.example\n\n", "To: u @ new.example\n\n"),
    ("To: first . last@old.example\n\n", "To: first . last@new.example\n\n"),
    ("To: <@old.example,@relay.example:u@old.example>\n\n", "To: <@old.example,@relay.example:u@new.example>\n\n"),
    ("To: u@[192.0.2.1], v@old.example\n\n", "To: u@[192.0.2.1], v@new.example\n\n"),
    # display names with commas, quotes, dots, encoded words and raw UTF-8
    ('From: "Doe, John" <u@old.example>\n\n', 'From: "Doe, John" <u@new.example>\n\n'),
    ('From: "Doe, \\"JD\\" <x@old.example>" <u@old.example>\n\n',
     'From: "Doe, \\"JD\\" <x@old.example>" <u@new.example>\n\n'),
    ("From: John Q. Public <u@old.example>\n\n", "From: John Q. Public <u@new.example>\n\n"),
    ("From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <u@old.example>\n\n",
     "From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <u@new.example>\n\n"),
    ("From: =?utf-8?b?SsO2cmc=?= <u@old.example>\n\n", "From: =?utf-8?b?SsO2cmc=?= <u@new.example>\n\n"),
    ('From: "=?utf-8?q?J=C3=B6rg?=" <u@old.example>\n\n', 'From: "=?utf-8?q?J=C3=B6rg?=" <u@new.example>\n\n'),
    ("From: Jörg Müller <jörg@bücher.example>\n\n", "From: Jörg Müller <jörg@books.example>\n\n"),
    ("From: Jorg <u@xn--bcher-kva.example>\n\n", "From: Jorg <u@books.example>\n\n"),
    # comments, also holding @ and nested
    ("From: u@old.example (John, x@old.example)\n\n", "From: u@new.example (John, x@old.example)\n\n"),
    ("From: (a (b@old.example) \\) c) u@old.example(c)\n\n", "From: (a (b@old.example) \\) c) u@new.example(c)\n\n"),
    ("From: John (x@old.example) <u@old.example> (y)\n\n", "From: John (x@old.example) <u@new.example> (y)\n\n"),
    ("To: u@(c)old.example\n\n", "To: u@(c)new.example\n\n"),
    ("To: u@old(c).example\n\n", "To: u@old(c).example\n\n"),  # a domain in pieces is left alone
    ("To: u@old .example\n\n", "To: u@old .example\n\n"),
    # groups
    ("To: undisclosed: a@old.example, B <b@rcpt.example>;\n\n",
     "To: undisclosed: a@new.example, B <b@in.example>;\n\n"),
    ("To: undisclosed-recipients:;\n\n", "To: undisclosed-recipients:;\n\n"),
    ('To: "Team, A": a@old.example;, c@x.y.foo.bar, Group:,,b@old.example,;\n\n',
     'To: "Team, A": a@new.example;, c@foo.bar, Group:,,b@new.example,;\n\n'),
    ("To: a@old.example,, ,b@old.example,\n\n", "To: a@new.example,, ,b@new.example,\n\n"),
    # folding: continuation lines keep their white space and line ends
    ("To: a@old.example,\n\tB <b@x.foo.bar>,\n  c@rcpt.example\n\n",
     "To: a@new.example,\n\tB <b@foo.bar>,\n  c@in.example\n\n"),
    ('To: "Doe,\n John" <u@old.example>\n\n', 'To: "Doe,\n John" <u@new.example>\n\n'),
    ("To: John\n (c@old.example\n x)\n <u@old.example>\n\n", "To: John\n (c@old.example\n x)\n <u@new.example>\n\n"),
    ("To:\n u@old.example\n\n", "To:\n u@new.example\n\n"),
    # several fields, names in any case, the direction of each
    ("From: a@old.example\nTo: b@old.example\nCc: c@old.example\nTo: d@rcpt.example\nCC: e@rcpt.example\n\n",
     "From: a@new.example\nTo: b@new.example\nCc: c@new.example\nTo: d@in.example\nCC: e@in.example\n\n"),
    ("FROM: a@sender.example\nto: b@sender.example\ncc: c@rcpt.example\nfrom: d@rcpt.example\n\n",
     "FROM: a@out.example\nto: b@sender.example\ncc: c@in.example\nfrom: d@rcpt.example\n\n"),
    ("To : a@old.example\nFrom\t: b@old.example\n\n", "To : a@new.example\nFrom\t: b@new.example\n\n"),
    ("From: a@host1.servers.company.foo\nTo: b@host1.servers.company.foo\n\n",
     "From: a@company.foo\nTo: b@host1.servers.company.foo\n\n"),
    # fields that are not From:, To: or Cc:, and the body, never change
    ("Reply-To: a@old.example\nSender: b@old.example\nResent-To: c@old.example\nResent-From: d@old.example\n"
     "Bcc: e@old.example\nDelivered-To: f@old.example\nX-To: g@old.example\nTo-Do: h@old.example\n"
     "Received: from a.old.example by b.old.example for <i@old.example>;\n Mon, 1 Jan 2024 00:00:00 +0000\n"
     "Return-Path: <j@old.example>\nFromage: k@old.example\nSubject: To: l@old.example\nTo: m@old.example\n\n"
     "To: n@old.example\nFrom: o@old.example\nCc: p@old.example\n",
     "Reply-To: a@old.example\nSender: b@old.example\nResent-To: c@old.example\nResent-From: d@old.example\n"
     "Bcc: e@old.example\nDelivered-To: f@old.example\nX-To: g@old.example\nTo-Do: h@old.example\n"
     "Received: from a.old.example by b.old.example for <i@old.example>;\n Mon, 1 Jan 2024 00:00:00 +0000\n"
     "Return-Path: <j@old.example>\nFromage: k@old.example\nSubject: To: l@old.example\nTo: m@new.example\n\n"
     "To: n@old.example\nFrom: o@old.example\nCc: p@old.example\n"),
    ("From a@old.example Mon Jan  1 00:00:00 2024\nFrom: a@old.example\n\n",
     "From a@old.example Mon Jan  1 00:00:00 2024\nFrom: a@new.example\n\n"),
    ("From: a@old.example\n\n\nFrom: b@old.example\n", "From: a@new.example\n\n\nFrom: b@old.example\n"),
    ("\nFrom: a@old.example\n", "\nFrom: a@old.example\n"),  # no header at all
    (" From: a@old.example\nTo: b@old.example\n\n", " From: a@old.example\nTo: b@new.example\n\n"),
    ("To: a@old.example\n", "To: a@new.example\n"),  # a header without a body
    ("To: a@old.example", "To: a@new.example"),
    # fields that do not parse are left as they are, the others are still rewritten
    ("To: a@old.example, broken <b@old.example\nCc: c@old.example\n\n",
     "To: a@old.example, broken <b@old.example\nCc: c@new.example\n\n"),
    ('To: "unterminated a@old.example\n\n', 'To: "unterminated a@old.example\n\n'),
    ("To: (unterminated a@old.example\n\n", "To: (unterminated a@old.example\n\n"),
    ("To: a@old.example)\n\n", "To: a@old.example)\n\n"),
    ("From: a@old.example <a@old.example>\n\n", "From: a@old.example <a@old.example>\n\n"),
    ("From: John Doe a@old.example\n\n", "From: John Doe a@old.example\n\n"),
    ("From: a@old.example.\n\n", "From: a@old.example.\n\n"),
    ("To: a@old.example; b@old.example\n\n", "To: a@old.example; b@old.example\n\n"),
    ("To: g: a@old.example, h: b@old.example;;\n\n", "To: g: a@old.example, h: b@old.example;;\n\n"),
    ("To: g: a@old.example\n\n", "To: g: a@old.example\n\n"),
    ("To: <>\n\n", "To: <>\n\n"),
    ("To: a@old.example\x00\n\n", "To: a@old.example\x00\n\n"),
    ("To: a\\b@old.example\n\n", "To: a\\b@old.example\n\n"),
    ("To: a@[old.example\n\n", "To: a@[old.example\n\n"),
]


@pytest.mark.parametrize("eol", ["\n", "\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize(("message", "rewritten"), HEADERS, ids=[h[0][:40] for h in HEADERS])
def test_header_rewriting(message, rewritten, eol):
    before = message.replace("\n", eol).encode()
    after = rules(HEADER_RULES).rewrite_headers(before)
    assert after == rewritten.replace("\n", eol).encode()
    if message == rewritten:
        assert after is before


def test_bytes_that_are_not_utf8_survive():
    message = b"From: J\xf6rg M\xfcller <u@old.example>\r\nTo: u@old\xff.example, v@old.example\r\n\r\n\xff\xfe\r\n"
    assert rules(HEADER_RULES).rewrite_headers(message) == (
        b"From: J\xf6rg M\xfcller <u@new.example>\r\nTo: u@old\xff.example, v@new.example\r\n\r\n\xff\xfe\r\n")


def test_mixed_line_ends_are_kept():
    message = b"To: a@old.example,\r\n b@old.example\nCc: c@old.example\r\n\nbody\r\n"
    assert rules(HEADER_RULES).rewrite_headers(message) == (
        b"To: a@new.example,\r\n b@new.example\nCc: c@new.example\r\n\nbody\r\n")


def test_header_uses_the_same_rules_as_the_envelope():
    rewriter = rules("to a.example to.example\nboth a.example both.example\n")
    assert rewriter.rewrite_headers(b"From: u@a.example\nTo: u@a.example\n\n") == (
        b"From: u@both.example\nTo: u@to.example\n\n")


# -- properties ----------------------------------------------------------------------------------

RULE_PIECES = ["from", "to", "both", "From", " ", "  ", "\t", "\n", "\r\n", "#", "/", "//", "*.", "*", ".", "a",
               "a.example", "xn--", "xn--bcher-kva", "bücher", "[", "]", "[192.0.2.1]", "(", ")", "\\", "{2,1}",
               "{99999999999999999999}", "?P<", "-", "é", "\udcff", "\ud800", "\x00", "\x85", "\u2028"]


def only_rewriting_errors(data: bytes | str) -> None:
    try:
        rewriter = parse_rewriting(data, WHERE)
    except RewritingError as exc:
        assert re.match(r"rw\.conf:[1-9][0-9]*: \S", str(exc)), str(exc)
        return
    for rule in rewriter.rules:
        for direction in ("from", "to"):
            rewriter.rewrite(direction, f"u@{rule.new}")
            rewriter.rewrite(direction, f"u@{rule.old}")


@PROPERTY
@given(st.text(max_size=300))
def test_any_text_loads_or_raises_rewriting_error(text):
    only_rewriting_errors(text)


@PROPERTY
@given(st.binary(max_size=300))
def test_any_bytes_load_or_raise_rewriting_error(data):
    only_rewriting_errors(data)


@PROPERTY
@given(st.lists(st.sampled_from(RULE_PIECES), max_size=30))
def test_rule_like_text_loads_or_raises_rewriting_error(pieces):
    only_rewriting_errors("".join(pieces))


EVERYTHING = rules("both /.*/ everything.example\n")
HEADER_REWRITER = rules(HEADER_RULES)


def split_body(data: bytes) -> tuple[bytes, bytes]:
    """Header and body, the body starting with the first empty line."""
    match = re.search(rb"(?:\A|\n)(\r?\n)", data)
    return (data[:match.start(1)], data[match.start(1):]) if match else (data, b"")


@PROPERTY
@given(st.binary(max_size=1000))
def test_any_bytes_as_a_message_never_raise_and_keep_the_body(data):
    for rewriter in (EVERYTHING, HEADER_REWRITER):
        out = rewriter.rewrite_headers(data)
        assert out.endswith(split_body(data)[1])


HEADER_PIECES = ["From:", "To:", "Cc:", "cc :", "Reply-To:", "X:", " ", "\t", "\n", "\r\n", "\n ", "\r\n\t",
                 "old.example", "u", "J\u00f6rg", "@", "<", ">", "(", ")", '"', ",", ";", ":", "\\", "[", "]", ".",
                 "=?utf-8?q?J=C3=B6rg?=", "Name", "\xff", "\x00", "\r"]
MARK = "zz-mark.test"


@PROPERTY
@given(st.lists(st.sampled_from(HEADER_PIECES), max_size=60))
def test_address_like_headers_change_only_in_domains(pieces):
    """Undoing the one replacement there is gives back the input byte for byte, and nothing
    was replaced after the end of the header."""
    data = "".join(pieces).encode("utf-8", "surrogateescape")
    out = rules(f"both old.example {MARK}\n").rewrite_headers(data)
    assert out.replace(MARK.encode(), b"old.example") == data
    assert MARK.encode() not in split_body(out)[1]
    EVERYTHING.rewrite_headers(data)


# Generated messages: built from pieces, where a domain piece is ("domain", name) and is expected
# to come out as the rules say when it stands in an address of a From:, To: or Cc: field.

EXPECTED = {  # domain -> (rewritten in From:, rewritten in To:/Cc:) under HEADER_RULES
    "old.example": ("new.example", "new.example"),
    "OLD.Example": ("new.example", "new.example"),
    "host1.servers.company.foo": ("company.foo", None),
    "servers.company.foo": (None, None),
    "x.y.foo.bar": (None, "foo.bar"),
    "foo.bar": (None, None),
    "sender.example": ("out.example", None),
    "rcpt.example": (None, "in.example"),
    "xn--bcher-kva.example": ("books.example", "books.example"),
    "BÜCHER.example": ("books.example", "books.example"),
    "other.example": (None, None),
    "[192.0.2.1]": (None, None),
}
FIELDS = {"From": 0, "FROM": 0, "from": 0, "To": 1, "TO": 1, "to": 1, "Cc": 1, "CC": 1, "cc": 1,
          "Reply-To": None, "Sender": None, "Resent-To": None, "Bcc": None, "X-Cc": None}
LOCALS = ["user", "First.Last+tag", '"john smith"', '"a@old.example"', "jörg", "x"]
NAMES = ["", "John Doe ", '"Doe, John" ', '"a \\"q\\" @old.example" ', "=?utf-8?q?J=C3=B6rg?= ",
         "=?utf-8?b?SsO2cmc=?= ", "John Q. Public ", "Jörg ", "(c) Name ", "Name (x@old.example) "]
COMMENTS = ["", " (x@old.example)", " (nested (a@old.example) \\( c)", "(c)", " "]
GROUPS = ["undisclosed", '"Team, A"', "=?utf-8?q?Gruppe?="]
Piece = str | tuple[str, str]


@st.composite
def mailboxes(draw, eol: str) -> list[Piece]:
    local = draw(st.sampled_from(LOCALS))
    domain = ("domain", draw(st.sampled_from(list(EXPECTED))))
    comment = draw(st.sampled_from(COMMENTS)).replace("@", f"{eol} @" if draw(st.booleans()) else "@")
    if draw(st.booleans()):
        return [f"{local}@", domain, comment]
    return [f"{draw(st.sampled_from(NAMES))}<{local}@", domain, ">", comment]


@st.composite
def address_lists(draw, eol: str) -> list[Piece]:
    pieces: list[Piece] = []
    for number in range(draw(st.integers(1, 4))):
        if number:
            pieces.append("," + draw(st.sampled_from([" ", "", f"{eol} ", f"{eol}\t", f" {eol}  "])))
        if draw(st.integers(0, 4)) == 0:
            members = [draw(mailboxes(eol)) for _ in range(draw(st.integers(0, 3)))]
            pieces.append(f"{draw(st.sampled_from(GROUPS))}:")
            for index, member in enumerate(members):
                pieces += [", " if index else " ", *member]
            pieces.append(";")
        else:
            pieces += draw(mailboxes(eol))
    return pieces


@st.composite
def messages(draw) -> tuple[list[Piece], list[int | None]]:
    """The pieces of a message and, for each piece, which rules apply to it (0 from, 1 to)."""
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    pieces: list[Piece] = []
    applies: list[int | None] = []
    if draw(st.booleans()):
        pieces.append(f"Received: from a.old.example by b.old.example{eol}\tfor <u@old.example>; today{eol}")
        applies.append(None)
    for _ in range(draw(st.integers(1, 6))):
        name = draw(st.sampled_from(list(FIELDS)))
        value = draw(address_lists(eol))
        pieces += [f"{name}:{draw(st.sampled_from(['', ' ', f'{eol} ']))}", *value, eol]
        applies += [FIELDS[name]] * (len(value) + 2)
    body = draw(st.lists(st.sampled_from(["To: x@old.example", "From: y@old.example", "Cc: <z@rcpt.example>",
                                          "", "hello", "From a@old.example"]), max_size=5))
    pieces.append(eol + "".join(line + eol for line in body))
    applies.append(None)
    return pieces, applies


def render(pieces: list[Piece], applies: list[int | None], rewritten: bool) -> bytes:
    out = []
    for piece, direction in zip(pieces, applies, strict=True):
        if isinstance(piece, str):
            out.append(piece)
        else:
            new = EXPECTED[piece[1]][direction] if rewritten and direction is not None else None
            out.append(new or piece[1])
    return "".join(out).encode()


@PROPERTY
@given(messages())
def test_generated_messages_change_only_in_the_expected_domains(message):
    pieces, applies = message
    before = render(pieces, applies, rewritten=False)
    assert HEADER_REWRITER.rewrite_headers(before) == render(pieces, applies, rewritten=True)
    assert Rewriter().rewrite_headers(before) == before
