"""The one header grammar (router/spool/headers.py) as its readers see it: where a header ends,
which lines are fields, and what the sendmail front door and the rewriting make of a header
with lines that are no fields."""

from __future__ import annotations

from policy.rewriting import load_rewriting
from router.front.sendmail import extract
from router.spool.headers import LINE, first_field, header_fields, header_of

MBOX = (b"From sender@example.org Mon Jan  1 00:00:00 2024\n"
        b"To: a@old.example\n"
        b"stray line without a colon\n"
        b"\tand its continuation\n"
        b"Bcc: hidden@old.example\n"
        b"Cc: c@old.example\n"
        b"\n"
        b"Bcc: body@old.example\n")


def test_a_message_that_begins_with_an_empty_line_has_an_empty_header():
    message = b"\nTo: body@example.org\n\nmore\n"
    assert header_of(message) == b"\n"
    assert header_fields(LINE.findall(message)) == []
    assert first_field(message, "to") is None


def test_lines_that_are_no_fields_are_passed_over_and_the_fields_after_them_count():
    fields = header_fields(LINE.findall(MBOX))
    assert [(f.name, f.value) for f in fields] == [
        ("to", "a@old.example"), ("bcc", "hidden@old.example"), ("cc", "c@old.example")]
    assert first_field(MBOX, "cc") == "c@old.example"
    assert first_field(MBOX, "bcc") == "hidden@old.example"  # not the body's


def test_sendmail_t_takes_out_a_bcc_field_after_a_stray_line(tmp_path):
    addresses, message = extract(MBOX)
    assert addresses == [("To: header", "a@old.example"), ("Bcc: header", "hidden@old.example"),
                         ("Cc: header", "c@old.example")]
    assert b"hidden@old.example" not in message
    assert message == MBOX.replace(b"Bcc: hidden@old.example\n", b"")


def test_rewriting_keeps_lines_that_are_no_fields_and_rewrites_the_fields(tmp_path):
    rules = tmp_path / "rewriting"
    rules.write_text("both old.example new.example\n")
    rewritten = load_rewriting(str(rules)).rewrite_headers(MBOX)
    assert rewritten == MBOX.replace(b"a@old.example", b"a@new.example").replace(
        b"Cc: c@old.example", b"Cc: c@new.example")  # Bcc: is not rewritten, the body never
