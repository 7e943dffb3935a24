"""What `qrouter route` says of a recipient: the rewriting, the rule, the alias, the next hop and
the destination settings by the policy in force, and with --resolve what DNS says now and the TLS
delivery would use with each host, decided by delivery's own code (workers/smtp.py), never a copy
of it. `explain` makes the answer (`--json` prints it as it is), `format_answer` the text.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from policy.dane import DANE_TA
from policy.destinations import DestinationRules, DestinationSettings
from policy.mta_sts import ENFORCE as STS_ENFORCE
from policy.mta_sts import TESTING as STS_TESTING
from policy.mta_sts import applies as sts_applies
from policy.next_hop import LMTP, MDA, MX, PIPE, SMTP, NextHop
from policy.rewriting import FROM, TO
from policy.routing import Policy
from policy.tls_policy import DANE_LEVELS, NAMED_LEVELS
from router.config import DNS_DNSSEC, Config
from router.spool.queue_file import QueueFile, Recipient
from workers.command import Account, environment, workdir
from workers.local import command_for
from workers.mx_hosts import site_destination


def explain(loaded: Config, policy: Policy, recipient: str, sender: str, resolve: bool) -> dict[str, Any]:
    """Where mail from `sender` to `recipient` goes now, as a dict; with `resolve`, DNS is asked
    (ResolverConfigError when dns-servers or resolv.conf cannot be used)."""
    rewritten, rewrite_rule = policy.rewriter.rewrite(TO, recipient)
    new_sender, sender_rule = policy.rewriter.rewrite(FROM, sender)
    decision = policy.route(rewritten)
    destination = decision.next_hop.destination
    settings = policy.destinations.for_destination(destination)
    answer = {"recipient": recipient, "rewritten": rewritten,
              "rewrite_rule": rewrite_rule.where if rewrite_rule else None,
              "sender": sender, "rewritten_sender": new_sender,
              "sender_rewrite_rule": sender_rule.where if sender_rule else None,
              "reason": decision.reason, "rule": decision.rule.where if decision.rule else None,
              "alias": decision.alias.user if decision.alias else None,
              "method": decision.next_hop.kind, "next_hop": str(decision.next_hop),
              "destination": destination, "destination_settings": dataclasses.asdict(settings)}
    if decision.next_hop.kind in (MDA, PIPE):
        answer["program"] = _program(loaded, decision.next_hop, new_sender, rewritten)
    connects = _connects(decision.next_hop)
    resolver = _resolver(loaded) if resolve and connects else None
    if resolve:
        answer.update(_resolve(loaded, decision.next_hop, resolver))
        if decision.next_hop.kind == MX and answer.get("resolved") and settings.mx_rollup:
            answer["site"] = site_destination(host["host"] for host in answer["resolved"])
            settings = policy.destinations.for_destination(answer["site"])
            answer["destination_settings"] = dataclasses.asdict(settings)
    if connects:
        answer["tls"] = _tls(policy.destinations.for_tls(destination, answer.get("site", "")), loaded.smtp_tls)
        if answer.get("resolved") and answer["tls"]["level"] in (*NAMED_LEVELS, *DANE_LEVELS):
            _host_tls(loaded, policy.destinations, decision.next_hop, answer["resolved"], resolver)
    dane = any(host.get("dane", {}).get("applies") for host in answer.get("resolved", []))
    if resolve and decision.next_hop.kind == MX and sts_applies(answer["tls"]["source"] != "smtp-tls",
                                                                answer["tls"]["level"], dane):
        from workers.mta_sts import for_route

        answer["mta_sts"] = for_route(loaded, decision.next_hop.argument, resolver)
        if answer["mta_sts"]["mode"] in (STS_ENFORCE, STS_TESTING):
            for host in answer.get("resolved", []):  # the policy decides their TLS: the mta-sts line says how
                host.pop("tls", None)
    return answer


def format_answer(answer: dict[str, Any], policy: Policy) -> str:
    """`explain`'s answer as the lines `qrouter route` prints."""
    recipient, rewritten, destination = answer["recipient"], answer["rewritten"], answer["destination"]
    settings = policy.destinations.for_destination(answer.get("site") or destination)
    lines = [f"recipient: {recipient}"]
    if answer["rewrite_rule"]:
        lines.append(f"rewritten: {rewritten} (rewriting rule {answer['rewrite_rule']})")
    if answer["sender_rewrite_rule"]:
        lines.append(f"sender:    <{answer['sender']}> rewritten to <{answer['rewritten_sender']}> "
                     f"(rewriting rule {answer['sender_rewrite_rule']})")
    lines += [f"reason:    {answer['reason']}", f"method:    {answer['method']}",
              f"next hop:  {answer['next_hop']}",
              f"destination: {answer['site']} (MX rollup: with every domain these MX hosts serve)"
              if "site" in answer else f"destination: {destination}",
              f"destination settings: {_format_settings(settings, policy.destinations)}"]
    if "tls" in answer:
        lines.append(_format_tls(answer["tls"]))
    if "mta_sts" in answer:
        lines.append(f"mta-sts:   {answer['mta_sts']['shown']}")
    if "program" in answer:
        lines += _format_program(answer["program"])
    if "resolved" in answer or "error" in answer:
        lines += _format_resolved(answer)
    return "\n".join(lines)


def _format_settings(settings: DestinationSettings, rules: DestinationRules) -> str:
    """`concurrency=5 recipients=50 ... (from FILE:LINE)`, or the defaults and why they apply."""
    if settings.source:
        why = f"from {settings.source}"
    else:
        why = f"defaults: no rule in {rules.path} matches" if rules.path else "defaults: no destinations file"
    return f"{settings.describe()} ({why})"


def _tls(settings: DestinationSettings, default_level: str) -> dict[str, Any]:
    """The TLS policy a delivery would use and where it comes from: the destinations rule that
    sets tls=, else the smtp-tls key."""
    tls = settings.tls_policy(default_level)
    return {"level": tls.level, "match": list(tls.match), "fingerprints": list(tls.fingerprints),
            "min_protocol": tls.min_protocol, "source": settings.source if settings.tls else "smtp-tls"}


def _format_tls(tls: dict[str, Any]) -> str:
    """`tls:       secure match=example.com:.example.com protocols=>=TLSv1.2 (from FILE:LINE)`."""
    words = [tls["level"]]
    if tls["match"]:
        words.append(f"match={':'.join(tls['match'])}")
    if tls["fingerprints"]:
        words.append(f"fingerprint={'|'.join(tls['fingerprints'])}")
    if tls["min_protocol"]:
        words.append(f"protocols=>={tls['min_protocol']}")
    where = "from the smtp-tls key" if tls["source"] == "smtp-tls" else f"from {tls['source']}"
    return f"tls:       {' '.join(words)} ({where})"


def _program(loaded: Config, hop: NextHop, sender: str, recipient: str) -> dict[str, Any]:
    """What a pipe or local agent would be run with for this recipient alone; nothing runs."""
    account = Account.named(hop.user)
    message = QueueFile("QUEUEID", 0.0, sender, [Recipient(recipient)], b"")
    command = command_for(message, message.recipients, hop, account, loaded.command_time_limit)
    return {"argv": list(command.argv), "user": account.name, "uid": account.uid, "gid": account.gid,
            "groups": list(account.groups), "cwd": workdir(account),
            "environment": environment(account, command.env), "time_limit": command.time_limit,
            "per": hop.per}


def _format_program(program: dict[str, Any]) -> list[str]:
    return [f"argv:      {json.dumps(program['argv'])}",
            f"runs as:   {program['user']} (uid {program['uid']}, gid {program['gid']}, groups "
            f"{','.join(map(str, program['groups'])) or 'none'}), in {program['cwd']}",
            f"time limit: {program['time_limit']:g}s, one run per {program['per']}",
            "environment:", *(f"  {name}={value}" for name, value in program["environment"].items())]


_BOUNCE_REASONS = {"5.1.10": "null MX", "5.1.2": "no such domain"}


def _connects(hop: NextHop) -> bool:
    """Whether delivery to `hop` connects to hosts (SMTP, LMTP but on a socket, MX routing): the
    next hops that have a TLS policy, and DNS to ask with --resolve."""
    return hop.kind in (SMTP, LMTP, MX) and not hop.argument.startswith("/")


def _resolve(loaded: Config, hop: NextHop, resolver: Any) -> dict[str, Any]:
    """What DNS says now about `hop`, asked of `resolver` (None: `hop` connects to no host) as
    delivery asks (workers.mx_lookup): `resolved`, the hosts in the order tried, and, when there
    is none to try, `error` {dsn, message}. Relay hosts that fail while others answer are listed
    in `unresolved`. Under dns-support-level dnssec each host says whether DNSSEC validated it
    (`dnssec`), and an alias where its validated CNAME chain ends (`alias`), whose TLSA records
    DANE asks first."""
    from policy.next_hop import parse_hosts
    from workers.mx_hosts import MXLookupError
    from workers.smtp import relay_lookup_name

    if resolver is None:
        return {"resolved": [], "note": f"no DNS: {hop.kind} delivery connects to no host"}
    from workers import mx_lookup  # the DNS library only when asked to resolve

    dnssec = loaded.dns_support_level == DNS_DNSSEC  # each host says whether DNSSEC validated it
    if hop.kind == MX:
        destinations = [(hop.argument, hop.argument)]
    else:  # relay hosts as the SMTP transport looks them up
        destinations = [(destination, relay_lookup_name(destination, loaded.hostname, hop.kind == LMTP))
                        for destination, _port in parse_hosts(hop.argument)]
    resolved: list[dict[str, Any]] = []
    unresolved: list[dict[str, str]] = []
    for destination, asked in destinations:
        try:
            hosts = mx_lookup.next_hops(asked, resolver)
        except MXLookupError as exc:
            unresolved.append({"destination": destination, "dsn": exc.dsn, "message": exc.message})
            continue
        resolved += [{"host": host.name, "preference": host.preference, "addresses": list(host.addresses),
                      **({"dnssec": host.secure} if dnssec else {}),  # AD believed only then
                      **({"alias": host.alias} if host.alias else {})} for host in hosts]
    if not resolved and unresolved:
        failure = unresolved[-1]
        return {"error": {"dsn": failure["dsn"], "message": failure["message"]}}
    answer: dict[str, Any] = {"resolved": resolved}
    if unresolved:
        answer["unresolved"] = unresolved
    return answer


def _resolver(loaded: Config) -> Any:
    """A resolver as delivery's (workers/smtp.py): the AD bit asked for under dns-support-level
    dnssec, answers kept for their TTL, so route's lookups, the transport's and MTA-STS's are
    asked once and see the same answers. ResolverConfigError when dns-servers (or resolv.conf)
    cannot be used."""
    from workers import mx_lookup  # the DNS library only when asked to resolve

    return mx_lookup.make_resolver(loaded.dns_servers, loaded.dns_timeout, cache=mx_lookup.CACHE_NAMES,
                                   dnssec=loaded.dns_support_level == DNS_DNSSEC)


def _host_tls(loaded: Config, rules: DestinationRules, hop: NextHop, hosts: list[dict[str, Any]],
              resolver: Any) -> None:
    """What delivery would make of the TLS of each of `hosts` (MX or relay hosts, as _resolve
    lists them), under a level where that depends on the host (one that checks the certificate's
    names, or a DANE level), decided by delivery's own code (SMTPTransport.servers_under_tls), not
    a copy of it: `tls` {level, port, match (the names its certificate must match; none where no
    name is checked), and for a host its policy will not let delivery use, `deferred` {dsn, text}
    as delivery says it} and, under a DANE level, `dane` {applies, tlsa (the usable records), note
    (why it would not be used)}. A host DNS no longer gives (its answer changed since) gets neither."""
    from workers.mx_hosts import MXLookupError
    from workers.smtp import SMTPTransport
    from workers.smtp_client import refused

    try:
        _, servers, settings = SMTPTransport(loaded, rules, resolver).servers_under_tls(hop)
    except MXLookupError:
        return
    level = settings.tls_policy(loaded.smtp_tls).level
    placed = []  # one server (address) of each host and port, in order: a host's addresses share its policy
    for server in servers:
        if not placed or (placed[-1].name, placed[-1].port) != (server.name, server.port):
            placed.append(server)
    for host in hosts:
        server = next((server for server in placed if server.name == host["host"]), None)
        if server is None:
            continue
        placed.remove(server)
        tls = server.tls
        named = tls.level in NAMED_LEVELS or any(record.usage == DANE_TA for record in tls.tlsa)
        host["tls"] = {"level": tls.level, "port": server.port, "match": list(tls.match) if named else []}
        if tls.refusal:
            reply = refused(server.peer, tls).reply
            host["tls"]["deferred"] = {"dsn": reply.dsn, "text": reply.text}
        if level in DANE_LEVELS:
            unusable = (f"TLS required, not authenticated: TLSA {', '.join(map(str, tls.tlsa_unusable))} of "
                        f"{tls.tlsa_base}, none of them usable" if tls.tlsa_unusable else "")
            host["dane"] = {"applies": bool(tls.tlsa), "tlsa": [str(record) for record in tls.tlsa],
                            "note": tls.refusal or unusable}


def _format_resolved(answer: dict[str, Any]) -> list[str]:
    error = answer.get("error")
    if error:
        if error["dsn"].startswith("4"):
            return [f"resolved:  DNS lookup failed now ({error['dsn']}): {error['message']}"]
        reason = _BOUNCE_REASONS.get(error["dsn"], "DNS says no")
        return [f"resolved:  would bounce: {reason} ({error['dsn']}): {error['message']}"]
    if "note" in answer:
        return [f"resolved:  {answer['note']}"]
    lines = ["resolved:  hosts in the order tried (equal preferences are shuffled at each delivery):"]
    for host in answer["resolved"]:
        validated = {True: "  (DNSSEC-validated)", False: "  (not DNSSEC-validated)"}.get(host.get("dnssec"), "")
        lines.append(f"  {host['preference']:>5} {host['host']}  {', '.join(host['addresses'])}{validated}")
        if host.get("alias"):
            lines.append(f"        cname: {host['host']} is an alias of {host['alias']}, validated to the end: "
                         "TLSA records are asked there first")
        tls = host.get("tls")
        if tls and tls["match"]:
            lines.append(f"        tls: {host['host']}:{tls['port']}: {tls['level']}, the certificate must name "
                         f"{' or '.join(tls['match'])}")
        dane = host.get("dane")
        if dane:
            state = (f"DANE, TLSA {', '.join(dane['tlsa'])}" if dane["applies"]
                     else f"no DANE: {dane['note']}" if dane["note"] else "no DANE, may")
            lines.append(f"        dane: {host['host']}: {state}")
        if tls and "deferred" in tls:
            lines.append(f"        not used ({tls['deferred']['dsn']}): {tls['deferred']['text']}")
    lines += [f"  not resolved: {item['destination']}: ({item['dsn']}) {item['message']}"
              for item in answer.get("unresolved", [])]
    return lines
