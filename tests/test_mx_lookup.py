"""MX routing's DNS half against a real name server on loopback: order, fallbacks, failures."""

from __future__ import annotations

import dataclasses
import random
import socket
import time
from collections import Counter

import pytest

from router.config.dns_servers import ResolverConfigError, parse_dns_servers
from tests.dns_server import DNSServer, Query
from workers.mx_lookup import (
    MXHost,
    MXLookupError,
    lookup_mx,
    make_resolver,
    next_hops,
    resolve_host,
)

TIMEOUT = 0.3  # the resolver's lifetime where a test waits out a silence
ANSWER_TIMEOUT = 4.0  # where it expects answers: the DNS server is a thread of this process, which load may hold up

ZONE = """
ordered       MX 30 mx3
              MX 10 mx1
              MX 20 mx2
shuffled      MX 10 mx1
              MX 10 mx2
              MX 20 mx3
mx1           A 127.0.0.2
              AAAA ::1
mx2           A 127.0.0.3
mx3           A 127.0.0.4
implicit      A 127.0.0.5
              AAAA ::1
v6only        AAAA ::1
nomail        TXT "no mail here"
nullmx        MX 0 .
mixednull     MX 0 .
              MX 10 mx1
partly        MX 10 gone
              MX 20 mx2
deadhosts     MX 10 gone
              MX 20 broken
broken        A 127.0.0.6
dup           MX 10 mx1
              MX 20 mx1
              MX 30 mx2
alias         MX 10 mxalias
mxalias       CNAME mx2
both          MX 10 mx2
              A 127.0.0.8
relay         A 127.0.0.7
xn--bcher-kva MX 10 mx1
""" + "".join(f"big A 127.0.1.{i}\n" for i in range(1, 121))


@pytest.fixture
def server():
    with DNSServer(ZONE) as running:
        yield running


@pytest.fixture
def resolver(server):
    return make_resolver(server.servers, ANSWER_TIMEOUT)


def _closed_udp_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _failure(destination: str, resolver) -> MXLookupError:
    with pytest.raises(MXLookupError) as caught:
        next_hops(destination, resolver)
    return caught.value


# Ordering and addresses


def test_mx_hosts_come_in_preference_order_with_their_addresses(resolver):
    assert lookup_mx("ordered.test", resolver) == [
        MXHost("mx1.test", 10, ("127.0.0.2", "::1")),
        MXHost("mx2.test", 20, ("127.0.0.3",)),
        MXHost("mx3.test", 30, ("127.0.0.4",)),
    ]


def test_next_hops_of_a_domain_is_its_mx_lookup(resolver):
    assert next_hops("ordered.test", resolver) == lookup_mx("ordered.test", resolver)


def test_trailing_dot_and_case_do_not_change_the_answer(resolver):
    assert [h.name for h in lookup_mx("ORDERED.Test.", resolver)] == ["mx1.test", "mx2.test", "mx3.test"]


def test_equal_preferences_come_in_both_orders_with_a_seeded_random(resolver):
    rng = random.Random(7)
    orders = [tuple(h.name for h in lookup_mx("shuffled.test", resolver, rng)) for _ in range(30)]
    assert set(orders) == {("mx1.test", "mx2.test", "mx3.test"), ("mx2.test", "mx1.test", "mx3.test")}


def test_equal_preferences_are_shuffled_on_every_call(resolver):
    firsts = Counter(lookup_mx("shuffled.test", resolver)[0].name for _ in range(100))
    assert set(firsts) == {"mx1.test", "mx2.test"}
    assert min(firsts.values()) >= 20, firsts  # about half each; under 20 of 100 by chance is below 1e-9


def test_results_are_frozen():
    host = MXHost("mx1.test", 10, ("127.0.0.2",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        host.name = "other"  # type: ignore[misc]


# Implicit MX and null MX


def test_domain_without_mx_is_its_own_mail_host(resolver):
    assert lookup_mx("implicit.test", resolver) == [MXHost("implicit.test", 0, ("127.0.0.5", "::1"))]


def test_implicit_mx_with_only_an_ipv6_address(resolver):
    assert lookup_mx("v6only.test", resolver) == [MXHost("v6only.test", 0, ("::1",))]


def test_domain_with_neither_mx_nor_address_bounces(resolver):
    error = _failure("nomail.test", resolver)
    assert (error.dsn, error.temporary) == ("5.1.2", False)
    assert "nomail.test" in str(error) and "no MX, A or AAAA" in str(error)


def test_implicit_mx_whose_address_lookup_fails_is_deferred(server, resolver):
    server.servfail("implicit.test", "A")
    server.servfail("implicit.test", "AAAA")
    error = _failure("implicit.test", resolver)
    assert (error.dsn, error.temporary) == ("4.4.3", True)
    assert "implicit.test" in str(error) and "SERVFAIL" in str(error)


def test_null_mx_bounces_with_5_1_10_and_asks_no_addresses(server, resolver):
    error = _failure("nullmx.test", resolver)
    assert (error.dsn, error.temporary) == ("5.1.10", False)
    assert "nullmx.test" in str(error) and "null MX" in str(error)
    assert server.queries == [Query("nullmx.test", "MX", "udp")]


def test_null_mx_beside_real_mx_records_is_ignored(resolver):
    assert lookup_mx("mixednull.test", resolver) == [MXHost("mx1.test", 10, ("127.0.0.2", "::1"))]


# Failures


def test_nxdomain_bounces_with_5_1_2(resolver):
    error = _failure("nowhere.test", resolver)
    assert (error.dsn, error.temporary) == ("5.1.2", False)
    assert "nowhere.test" in str(error) and "NXDOMAIN" in str(error)


def test_servfail_is_temporary(server, resolver):
    server.servfail("ordered.test")
    error = _failure("ordered.test", resolver)
    assert (error.dsn, error.temporary) == ("4.4.3", True)
    assert "ordered.test" in str(error) and "SERVFAIL" in str(error)


def test_timeout_is_temporary_and_bounded(server):
    server.silence("ordered.test")
    resolver = make_resolver(server.servers, TIMEOUT)
    started = time.monotonic()
    error = _failure("ordered.test", resolver)
    assert time.monotonic() - started < TIMEOUT + 1
    assert (error.dsn, error.temporary) == ("4.4.3", True)
    assert "ordered.test" in str(error) and f"within {TIMEOUT:g}s" in str(error)
    assert Query("ordered.test", "MX", "udp") in server.queries


def test_no_server_listening_is_temporary():
    error = _failure("ordered.test", make_resolver(f"127.0.0.1:{_closed_udp_port()}", TIMEOUT))
    assert (error.dsn, error.temporary) == ("4.4.3", True)
    assert "ordered.test" in str(error)


def test_refused_answer_is_temporary(resolver):
    error = _failure("outside.example", resolver)
    assert (error.dsn, error.temporary) == ("4.4.3", True)
    assert "outside.example" in str(error) and "REFUSED" in str(error)


def test_temporary_follows_the_status_code():
    assert MXLookupError("4.4.3", "x").temporary and not MXLookupError("5.1.2", "x").temporary
    assert str(MXLookupError("5.1.2", "example.test: gone")) == "example.test: gone"


# MX hosts whose addresses cannot be found


def test_mx_host_that_does_not_exist_is_skipped(resolver):
    assert lookup_mx("partly.test", resolver) == [MXHost("mx2.test", 20, ("127.0.0.3",))]


def test_mx_host_whose_lookup_fails_is_skipped(server, resolver):
    server.servfail("mx1.test")
    assert lookup_mx("ordered.test", resolver) == [MXHost("mx2.test", 20, ("127.0.0.3",)),
                                                  MXHost("mx3.test", 30, ("127.0.0.4",))]


def test_mx_host_that_times_out_is_skipped(server):
    server.silence("mx3.test")
    resolver = make_resolver(server.servers, 1.0)  # mx3's silence is waited out twice; the others must answer
    assert [h.name for h in lookup_mx("ordered.test", resolver)] == ["mx1.test", "mx2.test"]


def test_no_mx_host_with_an_address_is_temporary(server, resolver):
    server.servfail("broken.test")
    error = _failure("deadhosts.test", resolver)
    assert (error.dsn, error.temporary) == ("4.4.3", True)
    assert "deadhosts.test" in str(error) and "gone.test" in str(error) and "broken.test" in str(error)


def test_one_address_family_failing_keeps_the_other(server, resolver):
    server.servfail("mx1.test", "AAAA")
    assert lookup_mx("ordered.test", resolver)[0] == MXHost("mx1.test", 10, ("127.0.0.2",))


def test_mx_host_listed_twice_is_tried_once_at_its_best_preference(resolver):
    assert lookup_mx("dup.test", resolver) == [MXHost("mx1.test", 10, ("127.0.0.2", "::1")),
                                              MXHost("mx2.test", 30, ("127.0.0.3",))]


def test_mx_host_behind_a_cname_is_followed(resolver):
    assert lookup_mx("alias.test", resolver) == [MXHost("mxalias.test", 10, ("127.0.0.3",))]


def test_answer_too_large_for_udp_is_fetched_over_tcp(server, resolver):
    addresses = resolve_host("big.test", resolver)
    assert sorted(addresses) == sorted(f"127.0.1.{i}" for i in range(1, 121))
    assert Query("big.test", "A", "tcp") in server.queries


# IDNA and syntax


@pytest.mark.parametrize("domain", ["bücher.test", "BÜCHER.test"])
def test_unicode_domain_is_looked_up_in_a_labels(server, resolver, domain):
    assert lookup_mx(domain, resolver) == [MXHost("mx1.test", 10, ("127.0.0.2", "::1"))]
    assert server.queries[0] == Query("xn--bcher-kva.test", "MX", "udp")
    assert all(query.name.isascii() for query in server.queries)


def test_unicode_domain_errors_name_both_forms(resolver):
    error = _failure("müller.test", resolver)
    assert error.dsn == "5.1.2"
    assert "müller.test (xn--mller-kva.test)" in str(error)


@pytest.mark.parametrize("domain", ["", ".", "a..test", "-a.test", "\u2603.test", "a" * 64 + ".test",
                                    "[nope", "a b.test"])
def test_malformed_domains_bounce_without_asking_dns(server, resolver, domain):
    error = _failure(domain, resolver)
    assert (error.dsn, error.temporary) == ("5.1.3", False)
    assert server.queries == []


# Brackets: no MX lookup


def test_bracketed_host_skips_the_mx_lookup(server, resolver):
    assert next_hops("both.test", resolver) == [MXHost("mx2.test", 10, ("127.0.0.3",))]
    before = len(server.queries)
    assert next_hops("[both.test]", resolver) == [MXHost("both.test", 0, ("127.0.0.8",))]
    assert {q.rdtype for q in server.queries[before:]} == {"A", "AAAA"}


def test_bracketed_unicode_host_is_looked_up_in_a_labels(server, resolver):
    error = _failure("[bücher.test]", resolver)
    assert error.dsn == "5.4.4" and "xn--bcher-kva.test" in str(error)
    assert server.queries[0] == Query("xn--bcher-kva.test", "A", "udp")


@pytest.mark.parametrize(("destination", "address"), [
    ("[127.0.0.2]", "127.0.0.2"), ("[IPv6:::1]", "::1"), ("[ipv6:0:0::1]", "::1"), ("[::1]", "::1")])
def test_address_literals_need_no_dns(server, resolver, destination, address):
    assert next_hops(destination, resolver) == [MXHost(address, 0, (address,))]
    assert server.queries == []


@pytest.mark.parametrize("destination", ["[300.1.1.1]", "[127.0.0]", "[IPv6:127.0.0.1]", "[IPv6:zz::1]", "[]"])
def test_bad_address_literals_bounce(server, resolver, destination):
    error = _failure(destination, resolver)
    assert (error.dsn, error.temporary) == ("5.1.3", False)
    assert server.queries == []


def test_bracketed_host_that_does_not_exist_bounces_with_5_4_4(resolver):
    error = _failure("[gone.test]", resolver)
    assert (error.dsn, error.temporary) == ("5.4.4", False)
    assert "gone.test" in str(error)


# Relay hosts


def test_resolve_host_gives_both_address_families(resolver):
    assert resolve_host("relay.test", resolver) == ("127.0.0.7",)
    assert resolve_host("mx1.test", resolver) == ("127.0.0.2", "::1")


def test_resolve_host_does_not_use_mx_records(server, resolver):
    with pytest.raises(MXLookupError) as caught:
        resolve_host("ordered.test", resolver)
    error = caught.value
    assert (error.dsn, error.temporary) == ("5.4.4", False)
    assert "ordered.test" in str(error) and "no A record" in str(error)
    assert {q.rdtype for q in server.queries} == {"A", "AAAA"}


def test_resolve_host_failure_is_temporary(server):
    server.silence("relay.test", "A")
    server.servfail("relay.test", "AAAA")
    resolver = make_resolver(server.servers, TIMEOUT)
    with pytest.raises(MXLookupError) as caught:
        resolve_host("relay.test", resolver)
    error = caught.value
    assert (error.dsn, error.temporary) == ("4.4.3", True)
    assert "relay.test" in str(error)


# dns-servers and the resolver


@pytest.mark.parametrize(("text", "servers"), [
    ("127.0.0.1:5353,[::1]:5353", [("127.0.0.1", 5353), ("::1", 5353)]),
    (" 127.0.0.1 , ::1 ", [("127.0.0.1", 53), ("::1", 53)]),
    ("[::1]", [("::1", 53)]),
    ("[0:0::1]:1", [("::1", 1)]),
    ("127.0.0.1:65535", [("127.0.0.1", 65535)]),
])
def test_dns_servers_are_parsed(text, servers):
    assert parse_dns_servers(text) == servers


@pytest.mark.parametrize(("text", "message"), [
    ("127.0.0.1:99999", "dns-servers item '127.0.0.1:99999': port '99999' must be a number from 1 to 65535"),
    ("127.0.0.1:0", "port '0' must be a number from 1 to 65535"),
    ("127.0.0.1:", "port '' must be a number from 1 to 65535"),
    ("127.0.0.1:dns", "port 'dns' must be a number from 1 to 65535"),
    ("[::1]:-5", "port '-5' must be a number from 1 to 65535"),
    ("ns.test:53", "'ns.test' must be an IPv4 or IPv6 address"),
    ("127.0.0.300", "'127.0.0.300' must be an IPv4 or IPv6 address"),
    ("[::1", "dns-servers item '[::1' must be [IPv6] or [IPv6]:PORT"),
    ("[::1]5353", "must be [IPv6] or [IPv6]:PORT"),
    ("[127.0.0.1]:53", "brackets must hold an IPv6 address"),
    ("127.0.0.1,,[::1]:53", "dns-servers item '': '' must be an IPv4 or IPv6 address"),
    ("", "dns-servers item '': '' must be an IPv4 or IPv6 address"),
])
def test_bad_dns_servers_are_explained(text, message):
    with pytest.raises(ResolverConfigError) as caught:
        parse_dns_servers(text)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_make_resolver_rejects_bad_servers_and_timeouts():
    with pytest.raises(ResolverConfigError, match="port '99999' must be"):
        make_resolver("127.0.0.1:99999")
    for timeout in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ResolverConfigError, match="must be a number of seconds above 0"):
            make_resolver("127.0.0.1", timeout)


def test_make_resolver_asks_every_server_on_its_port():
    resolver = make_resolver("127.0.0.1:5353,[::1]:5354", 4.0)
    assert [(n.address, n.port) for n in resolver.nameservers] == [("127.0.0.1", 5353), ("::1", 5354)]
    assert (resolver.lifetime, resolver.timeout) == (4.0, 2.0)


def test_second_server_answers_when_the_first_is_silent(server):
    # each query waits out the silent first server's half; the second must answer within the other half
    resolver = make_resolver(f"127.0.0.1:{_closed_udp_port()},{server.servers}", 2.0)
    assert [h.name for h in lookup_mx("ordered.test", resolver)] == ["mx1.test", "mx2.test", "mx3.test"]


def test_server_on_ipv6_loopback():
    with DNSServer(ZONE, host="::1") as server:
        assert server.servers.startswith("[::1]:")
        resolver = make_resolver(server.servers, ANSWER_TIMEOUT)
        assert lookup_mx("implicit.test", resolver) == [MXHost("implicit.test", 0, ("127.0.0.5", "::1"))]


def test_default_resolver_reads_resolv_conf(tmp_path):
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.9\nnameserver ::1\nsearch corp.test\n")
    resolver = make_resolver("", 3.0, str(resolv_conf))
    assert [str(n) for n in resolver.nameservers] == ["127.0.0.9", "::1"]
    assert resolver.search == []  # a recipient domain is never completed with the local search list
    assert (resolver.lifetime, resolver.timeout) == (3.0, 1.5)


@pytest.mark.parametrize("content", [None, "", "# no servers\nsearch corp.test\n"])
def test_resolv_conf_without_servers_is_explained(tmp_path, content):
    resolv_conf = tmp_path / "resolv.conf"
    if content is not None:
        resolv_conf.write_text(content)
    with pytest.raises(ResolverConfigError) as caught:
        make_resolver("", 1.0, str(resolv_conf))
    assert str(resolv_conf) in str(caught.value) and "dns-servers must be set" in str(caught.value)
