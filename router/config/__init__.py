"""The daemon's configuration: one table of keys, read from a file, flags or plugin parameters.

The file holds one `key value` a line, read as every policy file is (docs/policy-files.md: a `#`
at the start of a line or after white space starts a comment), the same keys the qpsmtpd plugin
line takes. Every key is also a flag of `qrouter run` (`--max-age 5`), and flags win over the
file. Errors name the file and line.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from policy.next_hop import SMTP, NextHop, NextHopError, parse_next_hop
from policy.policy_file import Problems, parse_boolean, read_lines
from policy.tls_policy import GLOBAL_LEVELS, TLS_MAY, parse_level
from router.config.dkim_key import DkimKeyError, check_dns_name, load_dkim_key
from router.config.dns_servers import parse_dns_servers
from router.config.relay_auth import Credentials, RelayAuthError, load_relay_auth
from router.config.timeouts import Timeouts
from router.logs.target import SYSLOG_TIME, TIME_FORMATS
from router.spool import DEFAULT_SIZE_LIMIT
from router.spool.address import AddressError, parse_path

QPSMTPD_ME = "/etc/qpsmtpd/me"
DNS_ENABLED, DNS_DNSSEC = "enabled", "dnssec"  # dns-support-level, as Postfix's smtp_dns_support_level
DNS_SUPPORT_LEVELS = (DNS_ENABLED, DNS_DNSSEC)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and line, or the flag."""


def _positive_int(text: str, base_dir: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


MAX_NUMBER = 1_000_000  # seconds or days: more is a typo, and a timer of more overflows poll(2)


def _non_negative(text: str, base_dir: str) -> float:
    value = float(text)
    if not 0 <= value <= MAX_NUMBER:
        raise ValueError(f"must be a number from 0 to {MAX_NUMBER}")
    return value


def _positive(text: str, base_dir: str) -> float:
    value = _non_negative(text, base_dir)
    if value == 0:
        raise ValueError(f"must be a number above 0, up to {MAX_NUMBER}")
    return value


def _boolean(text: str, base_dir: str) -> bool:
    return parse_boolean(text)


def _path(text: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, text))


def _text(text: str, base_dir: str) -> str:
    return text


def _sender(text: str, base_dir: str) -> str:
    """An envelope sender every front door would take; <> (or nothing) for the null sender."""
    try:
        return parse_path(text, null_ok=True)
    except AddressError as exc:
        raise ValueError(f"must be an address or <>: {exc}") from None


def _user(text: str, base_dir: str) -> str:
    """A unix user that exists (the daemon's own may be missing until it runs as root: see
    router/config/privileges.py, which says what to do then)."""
    pwd.getpwnam(text)
    return text


def _group(text: str, base_dir: str) -> str:
    grp.getgrnam(text)
    return text


def _next_hop(text: str, base_dir: str) -> NextHop:
    return parse_next_hop(text, base_dir)


def _relayhost(text: str, base_dir: str) -> NextHop:
    hop = parse_next_hop(text, base_dir)
    if hop.kind != SMTP:
        raise NextHopError(f"relayhost takes mail servers (host, host:port, [ip]:port, a,b), not {text!r}")
    return hop


def _redis_url(text: str, base_dir: str) -> str:
    """A Redis URL as the redis client library reads it: redis:// or rediss:// (TLS), with
    user and password, host, port and database number as the URL says."""
    scheme, separator, rest = text.partition("://")
    if not separator or scheme not in ("redis", "rediss") or not rest:
        raise ValueError("must be a redis:// or rediss:// URL, e.g. redis://127.0.0.1:6379/0")
    return text


def _addresses(text: str, base_dir: str) -> tuple[str, ...]:
    """IP addresses, comma-separated, each as ipaddress writes it (so that they compare)."""
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            found.append(str(ipaddress.ip_address(item.strip("[]"))))
        except ValueError:
            raise ValueError(f"must be IP addresses separated by commas; {item!r} is not one") from None
    return tuple(found)


def _port(text: str, base_dir: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError("must be a port number from 1 to 65535")
    return value


_LISTEN_FORM = "must be HOST:PORT or [IPv6]:PORT, e.g. 127.0.0.1:9100 or [::1]:9100"


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of `metrics-listen`. A host is required: the metrics are served without
    authentication, so listening on every address must be asked for (0.0.0.0:PORT, [::]:PORT)."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port:
        raise ValueError(_LISTEN_FORM)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("must have an IPv6 address between the brackets, e.g. [::1]:9100") from None
    elif ":" in host:
        raise ValueError("must put an IPv6 address in brackets: [ADDRESS]:PORT")
    elif any(char in host for char in "[] \t"):
        raise ValueError(_LISTEN_FORM)
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("must end with a port number from 1 to 65535")
    return host, int(port)


def _listen(text: str, base_dir: str) -> str:
    parse_listen(text)
    return text


def _dns_servers(text: str, base_dir: str) -> str:
    parse_dns_servers(text)
    return text


def _dns_support_level(text: str, base_dir: str) -> str:
    if text not in DNS_SUPPORT_LEVELS:
        raise ValueError(f"must be one of {', '.join(DNS_SUPPORT_LEVELS)}")
    return text


def _tls_policy(text: str, base_dir: str) -> str:
    return parse_level(text, GLOBAL_LEVELS)


def _existing_file(text: str, base_dir: str) -> str:
    path = _path(text, base_dir)
    if not os.path.isfile(path):
        raise ValueError(f"must be an existing file ({path} is not)")
    return path


def _dkim_key(text: str, base_dir: str) -> str:
    """The path of a key that signs: parsed here, so a bad one is refused at check-config, start
    and reload, but read again where it signs (router/config/dkim_key.py says why)."""
    path = _path(text, base_dir)
    load_dkim_key(path)
    return path


def _dns_name(text: str, base_dir: str) -> str:
    return check_dns_name(text)


def _relay_auth(text: str, base_dir: str) -> Credentials:
    return load_relay_auth(_path(text, base_dir))


def _timeouts(text: str, base_dir: str) -> Timeouts:
    """`connect=10,dot=300`: only the steps named change from RFC 5321's defaults."""
    known = {f.name for f in dataclasses.fields(Timeouts)}
    values = {}
    for item in text.split(","):
        name, _, seconds = item.strip().partition("=")
        if name not in known:
            raise ValueError(f"must name steps among {', '.join(sorted(known))} (not {name!r})")
        values[name] = _non_negative(seconds, base_dir)
        if not values[name]:  # a socket with timeout 0 never waits: every delivery would fail
            raise ValueError(f"must give each step more than 0 seconds (not {item.strip()!r})")
    return Timeouts(**values)


def _log_target(text: str, base_dir: str) -> str:
    return text if text in ("syslog", "stderr") else _path(text, base_dir)


def _log_time(text: str, base_dir: str) -> str:
    if text not in TIME_FORMATS:
        raise ValueError(f"must be one of {', '.join(TIME_FORMATS)}")
    return text


LOCAL_NAMES = ("localhost", "localhost.localdomain")


def choose_hostname(me: str, qpsmtpd_me: str, fqdn: str, hostname: str) -> tuple[str, str]:
    """The name qrouter gives itself, and where it came from: `me`, else qpsmtpd's me file,
    else the FQDN, else the host name (socket.gethostname()).

    An FQDN that is localhost or an address is passed over: getfqdn() gives `localhost` when
    the host name resolves to 127.0.0.1 and /etc/hosts names that address localhost first (VMs,
    containers), and a receiver would then stamp `Received: from localhost`; even a short host
    name tells more."""
    if me:
        return me, "the me setting"
    if qpsmtpd_me:
        return qpsmtpd_me, QPSMTPD_ME
    if fqdn and fqdn.lower() not in LOCAL_NAMES and not _is_address(fqdn):
        return fqdn, "the FQDN"
    return hostname or fqdn, "the host name"


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _first_line(path: str) -> str:
    """The first line of a file, stripped; "" if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().strip()
    except (OSError, UnicodeDecodeError):
        return ""


# How each kind of value is written, for the help of the command-line flags and `qrouter keys`.
_METAVARS: dict[Callable[[str, str], Any], str] = {
    _positive_int: "N", _non_negative: "NUMBER", _positive: "NUMBER", _boolean: "yes|no", _path: "PATH", _text: "TEXT",
    _user: "USER", _group: "GROUP", _next_hop: "NEXTHOP", _relayhost: "HOST[:PORT],...", _port: "PORT",
    _listen: "[ADDRESS]:PORT", _dns_servers: "IP[:PORT],...", _tls_policy: "|".join(GLOBAL_LEVELS),
    _dns_support_level: "|".join(DNS_SUPPORT_LEVELS),
    _existing_file: "FILE", _dkim_key: "FILE", _dns_name: "NAME",
    _relay_auth: "FILE", _timeouts: "STEP=SECONDS,...", _log_target: "syslog|stderr|FILE",
    _log_time: "syslog|rfc3339",
    _sender: "ADDRESS|<>", _redis_url: "redis://[USER:PASSWORD@]HOST:PORT/DB", _addresses: "IP,...",
}


def _key(name: str, parse: Callable[[str, str], Any], default: Any, help: str):
    return field(default=default, metadata={"key": name, "parse": parse, "help": help, "metavar": _METAVARS[parse]})


@dataclass(frozen=True)
class Config:
    queue_dir: str = _key("queue-dir", _path, "/var/spool/qrouter", "spool directory")
    workers: int = _key("workers", _positive_int, os.cpu_count() or 1,
                        "number of delivery worker processes (default: one per core)")
    max_sessions: int = _key("max-sessions", _positive_int, 1000,
                             "deliveries in progress at once, over all workers")
    destination_concurrency: int = _key("destination-concurrency", _positive_int, 20,
                                        "deliveries in progress at once to one destination")
    default_transport: NextHop | None = _key(
        "default-transport", _next_hop, None, "next hop when no rule applies (unset: DNS MX routing)")
    max_age: float = _key("max-age", _non_negative, 5.0, "days a message may stay queued")
    archive_failed: bool = _key("archive-failed", _boolean, False, "keep failed and expired messages in archive/")
    min_backoff: float = _key("min-backoff", _non_negative, 300.0, "seconds before the first retry")
    max_backoff: float = _key("max-backoff", _non_negative, 4000.0, "longest wait between retries, seconds")
    shutdown_timeout: float = _key(
        "shutdown-timeout", _non_negative, 30.0, "seconds to let deliveries finish on stop")
    status_socket: str = _key("status-socket", _path, "", "status socket path (default: QUEUE-DIR/status.sock)")
    spool_group: str = _key("spool-group", _group, "", "group that may write the spool (queue dirs 2770)")
    log: str = _key("log", _log_target, "", "syslog, stderr or a file (default: stderr in the foreground, else syslog)")
    log_time: str = _key("log-time", _log_time, SYSLOG_TIME,
                         "time stamps in a file or stderr log: syslog (Dec  6 18:53:17) or rfc3339")
    me: str = _key("me", _text, "",
                   f"this host's name (default: {QPSMTPD_ME}, else the FQDN unless localhost, else the host name)")
    relayhost: NextHop | None = _key("relayhost", _relayhost, None, "SMTP relay hosts for all mail, round robin")
    smtp_port: int = _key("smtp-port", _port, 25, "TCP port of MX hosts and of relay hosts given without one")
    dns_servers: str = _key("dns-servers", _dns_servers, "", "DNS servers, ip:port,... (default: /etc/resolv.conf)")
    dns_timeout: float = _key("dns-timeout", _non_negative, 10.0, "seconds for one DNS lookup")
    dns_support_level: str = _key("dns-support-level", _dns_support_level, DNS_ENABLED,
                                  "dnssec: the DNS servers validate DNSSEC and are reached over a trusted path "
                                  "(loopback), so their AD bit is believed, as DANE needs; enabled: it is not")
    smtp_tls: str = _key("smtp-tls", _tls_policy, TLS_MAY, "the TLS level where the destinations file sets none: "
                         "none, may, encrypt, verify, secure, dane or dane-only (docs/policy-files.md)")
    smtp_tls_ca: str = _key("smtp-tls-ca", _existing_file, "", "CA certificates for the levels that verify "
                            "(encrypt, verify, secure) and for MTA-STS (MX hosts, policy servers)")
    relay_auth: Credentials | None = _key("relay-auth", _relay_auth, None,
                                          "file of 'host user password' lines (mode 0600)")
    smtp_plaintext_auth: bool = _key(
        "smtp-plaintext-auth", _boolean, False, "allow AUTH over connections without TLS")
    smtp_timeouts: Timeouts = _key("smtp-timeouts", _timeouts, Timeouts(),
                                   "per-step SMTP timeouts, e.g. connect=30,rcpt=300,dot=600")
    smtp_idle_timeout: float = _key(
        "smtp-idle-timeout", _non_negative, 5.0, "seconds an idle connection is kept for the next message")
    transports: str = _key("transports", _path, "", "transport policy file: destination next-hop a line")
    transport_defs: str = _key("transport-defs", _path, "", "variables ($name value) for the transports file")
    destinations: str = _key("destinations", _path, "",
                             "per-destination settings file: pattern key=value ... a line")
    rewriting: str = _key("rewriting", _path, "", "address rewriting rules: direction old new a line")
    rewrite_both: bool = _key("rewrite-both", _boolean, False, "also rewrite From:/To:/Cc: header addresses")
    aliases: str = _key("aliases", _path, "", "aliases for local delivery: virtual-user unix-user a line")
    message_size_limit: int = _key("message-size-limit", _positive_int, DEFAULT_SIZE_LIMIT,
                                   "largest message in bytes, at enqueue and in the queue")
    user: str = _key("user", _text, "qrouter",
                     "unprivileged user the daemon becomes when started as root (it refuses to run as root)")
    pipe_user: str = _key("pipe-user", _user, "nobody",
                          "user pipe next hops run as without a user= option (never root, never user)")
    command_time_limit: float = _key("command-time-limit", _non_negative, 1000.0,
                                     "seconds a pipe or local delivery agent may run; then it and everything it "
                                     "started get SIGTERM, SIGKILL 2 seconds later, and the delivery fails (5.3.0)")
    local_workers: int = _key("local-workers", _positive_int, 1,
                              "worker processes for pipes and local delivery agents (when the policy has any)")
    local_sessions: int = _key("local-sessions", _positive_int, 20,
                               "pipes and local agents running at once, over all local workers")
    send_ndr: bool = _key("send-ndr", _boolean, False,
                          "report failures (and successes and delays, as NOTIFY asks) to the sender")
    delay_warning: float = _key("delay-warning", _non_negative, 0.0,
                                "hours in the queue after which the sender is warned once (0: never)")
    bounce_size_limit: int = _key("bounce-size-limit", _positive_int, 50_000,
                                  "largest original returned whole in a report; a larger one: its header only")
    bounce_notice_recipient: str = _key("bounce-notice-recipient", _text, "",
                                        "who gets the report about mail from <> that failed (default: nobody)")
    tls_report: bool = _key("tls-report", _boolean, False,
                            "count the TLS sessions of MX deliveries per domain and send each domain that asks "
                            "(_smtp._tls TXT) a daily report, RFC 8460")
    tls_report_organization: str = _key("tls-report-organization", _text, "",
                                        "organization-name of TLS reports (default: me)")
    tls_report_contact: str = _key("tls-report-contact", _text, "",
                                   "contact-info of TLS reports, and their From: when it is an address "
                                   "(default: postmaster@ME)")
    tls_report_ca: str = _key("tls-report-ca", _existing_file, "",
                              "CA certificates for HTTPS report receivers (default: the system store)")
    tls_report_dkim_key: str = _key("tls-report-dkim-key", _dkim_key, "",
                                    "PEM private key (RSA or Ed25519) that DKIM-signs the TLS reports sent by mail "
                                    "(RFC 8460 5.3); the daemon's user reads it and nobody else should: "
                                    "root:qrouter 0640 (default: unsigned)")
    tls_report_dkim_selector: str = _key("tls-report-dkim-selector", _dns_name, "",
                                         "DKIM selector of tls-report-dkim-key: its public key is the TXT record "
                                         "SELECTOR._domainkey.DOMAIN, with s=tlsrpt "
                                         "(default: unset; needed with the key)")
    tls_report_dkim_domain: str = _key("tls-report-dkim-domain", _dns_name, "",
                                       "DKIM signing domain (d=) of TLS reports (default: the domain of their From:)")
    hopcount_limit: int = _key("hopcount-limit", _positive_int, 50,
                               "Received: and Delivered-To: fields a message may have; more is a loop (5.4.6)")
    metrics_listen: str = _key("metrics-listen", _listen, "",
                               "HOST:PORT where Prometheus metrics are served over HTTP (default: nowhere)")
    cluster_redis: str = _key("cluster-redis", _redis_url, "",
                              "Redis the nodes of a cluster share (redis:// or rediss:// URL; default: no cluster)")
    cluster_node: str = _key("cluster-node", _text, "", "this node's name in the cluster (default: me)")
    cluster_status_interval: float = _key("cluster-status-interval", _positive, 5.0,
                                          "seconds between the status snapshots each node publishes for status "
                                          "--cluster; three missed and it shows stale, six and it is gone")
    cluster_peers: tuple[str, ...] = _key("cluster-peers", _addresses, (),
                                          "addresses of the peers whose X-Qrouter-Arrival the front doors believe "
                                          "(mail a draining node hands over keeps its arrival for max-age)")
    archive_max_age: float = _key("archive-max-age", _non_negative, 0.0,
                                  "days a message stays in archive/ (0: for ever)")
    verify_wait: float = _key("verify-wait", _non_negative, 3.0,
                              "seconds a recipient verification waits for DNS or a callout before it answers "
                              "'temporary' (at most 4.5: a status socket client has 5)")
    verify_sender: str = _key("verify-sender", _sender, "", "envelope sender of callout probes (default: <>)")
    verify_positive_expire: float = _key("verify-positive-expire", _non_negative, 31.0,
                                         "days a callout's 'deliverable' is kept")
    verify_positive_refresh: float = _key("verify-positive-refresh", _non_negative, 7.0,
                                          "days after which a kept 'deliverable' is probed again in the background")
    verify_negative_expire: float = _key("verify-negative-expire", _non_negative, 3.0,
                                         "days a callout's 'refused' is kept")
    verify_negative_refresh: float = _key("verify-negative-refresh", _non_negative, 0.125,
                                          "days after which a kept 'refused' is probed again in the background")
    verify_temporary_expire: float = _key("verify-temporary-expire", _non_negative, 300.0,
                                          "seconds a callout's temporary failure is kept")

    @property
    def socket_path(self) -> str:
        return self.status_socket or os.path.join(self.queue_dir, "status.sock")

    @property
    def node(self) -> str:
        """This node's name in the cluster: cluster-node, else the host name."""
        return self.cluster_node or self.hostname

    @property
    def hostname(self) -> str:
        """Our name in EHLO and for qualifying short relay host names."""
        return self.hostname_choice()[0]

    def hostname_choice(self) -> tuple[str, str]:
        """The host name and where it came from (choose_hostname). qpsmtpd's me file is read,
        and the FQDN looked up (DNS, which may be slow), only when nothing before them is set."""
        qpsmtpd_me = "" if self.me else _first_line(QPSMTPD_ME)
        fqdn = "" if self.me or qpsmtpd_me else socket.getfqdn()
        return choose_hostname(self.me, qpsmtpd_me, fqdn, socket.gethostname())

    @property
    def sessions_per_worker(self) -> int:
        """max-sessions shared out over the workers, at least one each."""
        return max(1, -(-self.max_sessions // self.workers))

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt: doubling, as Postfix does.

        Doubles one step at a time and stops at the cap, rather than computing 2 ** (attempts - 1),
        which no longer fits a float after 1,024 attempts; even from the smallest float the cap
        is reached in about 2,100 steps."""
        cap = max(self.max_backoff, self.min_backoff)
        delay = self.min_backoff
        for _ in range(max(attempts - 1, 0)):
            if not 0 < delay < cap:  # at the cap, or 0, which doubling never changes
                break
            delay *= 2
        return min(delay, cap)


KEYS: dict[str, dataclasses.Field] = {f.metadata["key"]: f for f in dataclasses.fields(Config)}


def described(key: str) -> str:
    """What a key does and its default, as `qrouter keys` and qrouter.conf(5) say it."""
    entry = KEYS[key]
    default, text = entry.default, entry.metadata["help"]
    if "(default" in text or "(unset" in text:  # the help says it better
        return text
    shown = "unset" if default in (None, "") else ("yes" if default else "no") if isinstance(default, bool) \
        else f"{default:g}" if isinstance(default, float) else str(default)
    return f"{text} (default: {shown})"


def parse_value(key: str, text: str, where: str, base_dir: str) -> tuple[str, Any]:
    """Parse one value; `where` (file:line or --flag) starts every error."""
    f = KEYS.get(key)
    if f is None:
        raise ConfigError(f"{where}: unknown key {key!r}")
    if not text:
        raise ConfigError(f"{where}: {key} needs a value")
    if "\0" in text:  # no key has a use for one, and a path holding one would fail only when opened
        raise ConfigError(f"{where}: {key}: contains a NUL byte")
    try:
        return f.name, f.metadata["parse"](text, base_dir)
    except (NextHopError, RelayAuthError, DkimKeyError) as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None
    except KeyError:
        raise ConfigError(f"{where}: {key}: no such {'user' if key.endswith('user') else 'group'} {text!r}") from None
    except ValueError as exc:
        detail = str(exc) if "must" in str(exc) else "is not a valid value"
        raise ConfigError(f"{where}: {key} {text!r}: {detail}") from None


def read_file(path: str, only: Collection[str] | None = None,
              places: dict[str, str] | None = None) -> dict[str, Any]:
    """Values set in a config file, by field name; with `only`, other keys are skipped unread
    (a command that needs just the spool must not fail on a key it has no business checking).
    `places` gets the file:line of each value, by field name."""
    base_dir = os.path.dirname(os.path.abspath(path))
    values: dict[str, Any] = {}
    seen: dict[str, int] = {}
    problems = Problems(ConfigError)
    for number, line in read_lines(path, ConfigError, what="config"):
        key, _, text = line.partition(" ")
        if only is not None and key not in only:
            continue
        where = f"{path}:{number}"
        with problems.collecting():
            if key in seen:
                raise ConfigError(f"{where}: {key} already set at line {seen[key]}")
            seen[key] = number
            name, value = parse_value(key, text.strip(), where, base_dir)
            values[name] = value
            if places is not None:
                places[name] = where
    problems.check()
    return values


def load(path: str | None = None, flags: Mapping[str, str] | None = None,
         only: Collection[str] | None = None) -> Config:
    """Build the config from a file (optional) and flags given as key -> text; flags win."""
    places: dict[str, str] = {}
    values = read_file(path, only, places) if path else {}
    for key, text in (flags or {}).items():
        name, value = parse_value(key, text, f"--{key}", os.getcwd())
        values[name] = value
        places[name] = f"--{key}"
    config = Config(**values)
    _check_dkim_keys(config, places)
    return config


def _check_dkim_keys(config: Config, places: Mapping[str, str]) -> None:
    """A DKIM key signs under a selector, and a selector or domain means nothing without a key:
    either would otherwise be found out only when the first report is mailed, a day later."""
    if config.tls_report_dkim_key and not config.tls_report_dkim_selector:
        raise ConfigError(f"{places['tls_report_dkim_key']}: tls-report-dkim-key needs tls-report-dkim-selector, "
                          "the name its public key is published under (SELECTOR._domainkey.DOMAIN TXT)")
    for name in ("tls_report_dkim_selector", "tls_report_dkim_domain"):
        if getattr(config, name) and not config.tls_report_dkim_key:
            raise ConfigError(f"{places[name]}: {name.replace('_', '-')} means nothing without tls-report-dkim-key")
