"""A real authoritative name server on loopback, so DNS code is tested over real UDP and TCP.

The test writes the zone in zone-file syntax; the server adds the SOA and NS records a zone
needs. It answers what an authoritative server answers (records, CNAME chains inside the zone,
NXDOMAIN, NODATA, REFUSED outside the zone) and truncates UDP answers that do not fit, so the
client's retry over TCP is exercised too. Chosen names can answer SERVFAIL or get no answer at
all, to reproduce broken and unreachable servers. Every question received is recorded, so a
test can show what was, and what was not, asked.
"""

from __future__ import annotations

import selectors
import socket
import struct
import sys
import textwrap
import threading
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

UDP_LIMIT_WITHOUT_EDNS = 512


@dataclass(frozen=True)
class Query:
    name: str  # without the final dot
    rdtype: str  # MX, A, AAAA...
    transport: str  # udp or tcp


def zone_file(zone_text: str, origin: str | dns.name.Name) -> str:
    """The zone of `zone_text` (zone-file syntax, indented as a test writes it) for `origin`, as
    a file: with the SOA and NS records a zone needs, which the test does not write."""
    origin = dns.name.from_text(str(origin))
    return (f"$ORIGIN {origin}\n$TTL 60\n@ IN SOA ns.{origin} hostmaster.{origin} 1 60 60 60 60\n"
            f"@ IN NS ns.{origin}\n" + textwrap.dedent(zone_text))


class DNSServer:
    """Serves one zone on `host` (127.0.0.1 or ::1), UDP and TCP on the same free port.

    Use as a context manager; `servers` is the matching `dns-servers` value. With `authentic`
    every answer carries the AD bit, as from a resolver that claims to have validated it.
    """

    def __init__(self, zone_text: str, origin: str = "test.", host: str = "127.0.0.1", authentic: bool = False):
        self.origin = dns.name.from_text(origin)
        self.authentic = authentic
        self.zone = dns.zone.from_text(zone_file(zone_text, self.origin), self.origin, relativize=False)
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._servfail: set[tuple[dns.name.Name, int | None]] = set()
        self._silent: set[tuple[dns.name.Name, int | None]] = set()
        self._queries: list[Query] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._wake_reader, self._wake_writer = socket.socketpair()

    @property
    def servers(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def queries(self) -> list[Query]:
        with self._lock:
            return list(self._queries)

    def servfail(self, name: str, rdtype: str | None = None) -> None:
        """Answer SERVFAIL for `name` (a full name; one type, or all), as a broken server does."""
        with self._lock:
            self._servfail.add(self._key(name, rdtype))

    def silence(self, name: str, rdtype: str | None = None) -> None:
        """Never answer for `name` (a full name; one type, or all), as an unreachable server looks."""
        with self._lock:
            self._silent.add(self._key(name, rdtype))

    def _key(self, name: str, rdtype: str | None) -> tuple[dns.name.Name, int | None]:
        return dns.name.from_text(name), dns.rdatatype.from_text(rdtype) if rdtype else None

    def start(self) -> DNSServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        else:
            raise RuntimeError(f"no port free for both UDP and TCP on {self.host}")
        self._thread = threading.Thread(target=self._serve, name=f"dns-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake_writer.send(b"x")  # ends the wait in select() now rather than at its timeout
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the client
        for sock in (self._udp, self._tcp, self._wake_reader, self._wake_writer):
            if sock is not None:
                sock.close()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ)
            selector.register(self._tcp, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._wake_reader:
                        return
                    if key.fileobj is self._udp:
                        try:
                            self._serve_udp()
                        except Exception as exc:  # one bad question must not end the server, silently
                            print(f"dns server {self.host}:{self.port}: {exc!r}", file=sys.stderr)
                    else:
                        connection, _ = self._tcp.accept()
                        threading.Thread(target=self._serve_tcp, args=(connection,), daemon=True).start()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        wire, peer = self._udp.recvfrom(65535)
        query = self._parse(wire)
        response = self._answer(query, "udp") if query else None
        if response is None:
            return
        limit = max(UDP_LIMIT_WITHOUT_EDNS, query.payload) if query.edns >= 0 else UDP_LIMIT_WITHOUT_EDNS
        try:
            data = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            for section in (response.answer, response.authority, response.additional):
                section.clear()
            response.flags |= dns.flags.TC
            data = response.to_wire(max_size=limit)
        self._udp.sendto(data, peer)

    def _serve_tcp(self, connection: socket.socket) -> None:
        connection.settimeout(5)
        with self._lock:
            self._connections.add(connection)
        try:
            while not self._stop.is_set():
                header = _read_exactly(connection, 2)
                query = self._parse(_read_exactly(connection, struct.unpack("!H", header)[0]))
                response = self._answer(query, "tcp") if query else None
                if response is not None:
                    data = response.to_wire()
                    connection.sendall(struct.pack("!H", len(data)) + data)
        except (OSError, EOFError):
            pass  # the client is done, or the server is stopping
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()

    @staticmethod
    def _parse(wire: bytes) -> dns.message.Message | None:
        try:
            return dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None

    def _answer(self, query: dns.message.Message, transport: str) -> dns.message.Message | None:
        """The response to `query`, or None to stay silent."""
        response = dns.message.make_response(query)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self._lock:
            self._queries.append(Query(qname.to_text(omit_final_dot=True), dns.rdatatype.to_text(qtype), transport))
            silent = (qname, None) in self._silent or (qname, qtype) in self._silent
            broken = (qname, None) in self._servfail or (qname, qtype) in self._servfail
        if silent:
            return None
        if broken:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if question.rdclass != dns.rdataclass.IN or not qname.is_subdomain(self.origin):
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.flags |= dns.flags.AA | (dns.flags.AD if self.authentic else 0)
        self._resolve(response, qname, qtype)
        return response

    def _resolve(self, response: dns.message.Message, name: dns.name.Name, qtype: int) -> None:
        """Fill in the answer, following CNAMEs as far as they stay inside the zone."""
        for _ in range(8):
            node = self.zone.get_node(name)
            if node is None:
                if not any(owner.is_subdomain(name) for owner in self.zone.nodes):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                self._add_soa(response)
                return
            rdataset = node.get_rdataset(dns.rdataclass.IN, qtype)
            if rdataset is not None:
                response.answer.append(dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset)))
                return
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None:
                self._add_soa(response)
                return
            response.answer.append(dns.rrset.from_rdata_list(name, cname.ttl, list(cname)))
            name = cname[0].target
            if not name.is_subdomain(self.origin):
                return

    def _add_soa(self, response: dns.message.Message) -> None:
        soa = self.zone.find_rdataset(self.origin, dns.rdatatype.SOA)
        response.authority.append(dns.rrset.from_rdata_list(self.origin, soa.ttl, list(soa)))


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data
