"""The `qrouter` command: run the daemon, queue a message, ask the daemon how it is doing."""

import datetime
import inspect
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterable
from typing import Annotated, Any, Optional

import typer

from policy.destinations import DestinationRules
from policy.routing import Policy, load_policy
from policy.tls_policy import DANE_LEVELS
from policy.tls_report import parse_day, utc_day
from policy.transport_map import PolicyError
from policy.verify import DELIVERABLE, REFUSED
from router import config as config_module
from router.admin import cluster_view, route_view
from router.admin.queue_view import ALL, WAITING, Selection, age, as_lines, find, messages, parse_duration
from router.admin.queue_view import as_json as as_json_line
from router.admin.queue_view import shape as queue_shape
from router.config import DNS_DNSSEC, KEYS, Config, ConfigError, privileges
from router.config.dns_servers import ResolverConfigError
from router.daemon import detach as daemon
from router.daemon import reach
from router.daemon.control import QueueCommands
from router.daemon.status_socket import StatusError, query
from router.daemon.supervisor import Supervisor
from router.front.sendmail import queue_local, read_up_to, received
from router.logs import target as log_module
from router.spool import ACTIVE, DEFERRED, HOLD, INCOMING, NotAQueueFile, Spool, SpoolError, read_queue_file
from router.spool.address import AddressError, parse_path
from router.spool.headers import header_of, prepend_fields
from router.spool.lock import SpoolNotAllowed, unless_daemon
from router.spool.queue_file import MAX_OVERHEAD, parse
from workers import tls_reports

EX_USAGE, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 64, 75, 77, 78

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="qrouter: a policy mail router and spooler beside qpsmtpd.")

ConfigOption = Annotated[Optional[str], typer.Option("--config", metavar="FILE", help="config file (key value a line)")]  # noqa: UP045
QueueDirOption = Annotated[Optional[str], typer.Option("--queue-dir", metavar="PATH", help="spool directory")]  # noqa: UP045


def _fail(message: str, code: int) -> typer.Exit:
    """Say `message` on stderr, each of its lines after `qrouter: `, and give the exit to raise."""
    typer.echo("\n".join(f"qrouter: {line}" for line in message.splitlines() or [""]), err=True)
    return typer.Exit(code)


def _config(config_file: str | None, flags: dict[str, str]) -> Config:
    try:
        return config_module.load(config_file, flags)
    except ConfigError as exc:
        raise _fail(str(exc), EX_CONFIG) from None


def _view_config(config_file: str | None, flags: dict[str, str]) -> Config:
    """The config of a command that reads the spool, once this user is known to be able to: a
    spool it may not read would look empty, and its daemon absent."""
    loaded = _config(config_file, flags)
    for directory in (loaded.queue_dir, *(os.path.join(loaded.queue_dir, queue) for queue in ALL)):
        try:
            os.scandir(directory).close()
        except PermissionError:
            raise _fail(_denied(loaded, directory), EX_NOPERM) from None
        except OSError:
            continue  # not made yet: nothing queued there
    return loaded


def _denied(loaded: Config, what: str) -> str:
    who = f"a member of group {loaded.spool_group}" if loaded.spool_group else f"user {loaded.user}"
    return f"permission denied: {what} (run as root or as {who})"


def run(config: ConfigOption = None,
        foreground: Annotated[bool, typer.Option("--foreground", help="stay in the foreground, log to stderr")] = False,
        **settings: Any) -> None:
    """Run the daemon: supervisor, workers and status socket."""
    # A reload asked for while starting (systemd, a script) must not kill the daemon with
    # SIGHUP's default action; the supervisor installs its own handler once it can act on it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # nor a log rotation's SIGUSR1
    flags = _flags(settings)
    loaded = _config(config, flags)
    if foreground:
        log_module.setup(loaded.log or "stderr", time_format=loaded.log_time)
        raise typer.Exit(Supervisor(loaded, config, flags).run())
    # Detached, stderr is /dev/null: without a syslog socket the lines go to a file in the
    # spool, made (or refused, exit 1) and announced here, while the caller still hears us.
    target = loaded.log or "syslog"
    fallback_file = os.path.join(loaded.queue_dir, "log", "qrouter.log")
    where = log_module.choose(target, fallback_file)
    if where != target:
        try:
            log_module.prepare_file(where, loaded.spool_group)
        except OSError as exc:
            raise _fail(f"no syslog ({log_module.SYSLOG_SOCKET}) and cannot write {where}: {exc}", 1) from None
        typer.echo(f"qrouter: no syslog ({log_module.SYSLOG_SOCKET}); logging to {where}", err=True)
    ready = daemon.detach()
    log_module.setup(target, fallback_file, loaded.spool_group, loaded.log_time)
    raise typer.Exit(Supervisor(loaded, config, flags).run(ready))


KEYS_BY_PARAM = {key.replace("-", "_"): key for key in KEYS}
# The config keys each command takes as flags: what it uses. All of them are in `qrouter keys`,
# and any can be set for any command in the file --config names.
SPOOL_KEYS = ("queue-dir", "status-socket", "spool-group", "user")
POLICY_KEYS = ("default-transport", "relayhost", "transports", "transport-defs", "aliases", "rewriting",
               "destinations", "rewrite-both", "pipe-user", "user")
ROUTE_KEYS = (*POLICY_KEYS, "me", "dns-servers", "dns-timeout", "dns-support-level", "smtp-port", "command-time-limit",
              "smtp-tls", "queue-dir", "smtp-tls-ca")


def _flags(settings: dict[str, Any]) -> dict[str, str]:
    """The config-key flags given on the command line, as key -> text."""
    return {KEYS_BY_PARAM[name]: value for name, value in settings.items() if value is not None}


def _with_config_flags(function, keys: Iterable[str] = KEYS):
    """Give a command that reads the config one --flag per config key it uses (`keys`), from the
    one table in router.config, so each answers for the configuration that `qrouter run` with
    the same flags uses."""
    signature = inspect.signature(function)
    params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    for key in dict.fromkeys(keys):
        metadata = KEYS[key].metadata
        option = typer.Option(f"--{key}", help=metadata["help"], metavar=metadata["metavar"], show_default=False)
        params.append(inspect.Parameter(key.replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[str], option]))  # noqa: UP045
    function.__signature__ = signature.replace(parameters=params)
    return function


def _without(function, *names: str):
    """`function` without the parameters `names` (they keep their defaults): options that mean
    nothing for one of the commands made from it."""
    signature = inspect.signature(function)
    function.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name not in names])
    return function


app.command("run")(_with_config_flags(run))


def check_config(config: ConfigOption = None, **settings: Any) -> None:
    """Check the config and every policy file it names, and that the daemon's user can read them
    and make the Maildirs its next hops name; name every error (exit 78)."""
    loaded = _config(config, _flags(settings))
    policy = _policy(loaded)
    files, bases = reach.files_read(loaded, config), reach.maildir_bases(policy)
    if os.geteuid() == 0:
        try:
            entry = privileges.account(loaded.user)
        except privileges.PrivilegeError as exc:
            raise _fail(str(exc), EX_CONFIG) from None
        typer.echo(f"qrouter: started as root, runs as user {entry.pw_name} (uid {entry.pw_uid})")
        unreachable = reach.problems_as(entry, loaded.spool_group, files, bases)
    else:
        unreachable = reach.problems(files, bases)  # the daemon runs as whoever starts it
    if unreachable:
        raise _fail("\n".join(unreachable), EX_CONFIG)
    typer.echo(f"qrouter: config {config or '(flags only)'} and its policy files are valid")
    for warning in [*_dane_without_dnssec(loaded, policy.destinations), *_unsigned_tls_reports(loaded)]:
        typer.echo(f"qrouter: warning: {warning}")
    name, source = loaded.hostname_choice()
    typer.echo(f"qrouter: EHLO name: {name} (from {source})")


app.command("check-config")(_with_config_flags(check_config))


def _dane_without_dnssec(loaded: Config, destinations: DestinationRules | None) -> list[str]:
    """Where a DANE level is set while DNSSEC is not trusted: `dane` is then `may` and
    `dane-only` defers everything, as Postfix does without smtp_dns_support_level = dnssec."""
    if loaded.dns_support_level == DNS_DNSSEC:
        return []
    where = [f"smtp-tls {loaded.smtp_tls}"] if loaded.smtp_tls in DANE_LEVELS else []
    where += [f"tls={settings.tls} ({settings.source})" for _, settings in (destinations.rules if destinations else [])
              if settings.tls in DANE_LEVELS]
    return [f"{place}: dns-support-level is {loaded.dns_support_level}, so no DNSSEC answer is trusted: "
            "dane acts as may and dane-only defers every delivery; set dns-support-level dnssec with a "
            "validating resolver on loopback (dns-servers)" for place in where]


def _unsigned_tls_reports(loaded: Config) -> list[str]:
    """With tls-report on, any domain may ask for its report by mail (a mailto: rua), and such a
    report goes unsigned without a DKIM key."""
    if not loaded.tls_report or loaded.tls_report_dkim_key:
        return []
    return ["tls-report yes without tls-report-dkim-key: reports to mailto: addresses go unsigned, and RFC 8460 "
            "receivers may ignore unsigned reports (5.3); set tls-report-dkim-key and tls-report-dkim-selector"]


@app.command("keys")
def keys() -> None:
    """Every config key: how it is written, its default, what it does. Each is a line `key value`
    of the file --config names, and a --key flag of run and check-config (of other commands too,
    where they use it)."""
    for key in KEYS:
        typer.echo(f"{key} {KEYS[key].metadata['metavar']}\n    {config_module.described(key)}")


def route(
    address: Annotated[str, typer.Argument(metavar="ADDRESS", help="recipient address")],
    sender: Annotated[str, typer.Option("--from", metavar="ADDRESS", help="envelope sender")] = "<>",
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    resolve: Annotated[bool, typer.Option(
        "--resolve", help="also ask DNS (dns-servers, dns-timeout) for the hosts and addresses delivery "
        "would try now; without it route is offline and asks no DNS")] = False,
    **settings: Any,
) -> None:
    """Explain where a recipient goes now: rewriting, the rule that matched, the alias, the next hop,
    and the destination settings that apply to it.

    Takes the config keys of routing as flags, as `qrouter run` does. With --resolve it also shows, in the
    order delivery tries them, the MX hosts (by preference; equal preferences are shuffled at each
    delivery) or relay hosts and their addresses, or why mail would bounce or be deferred; for each host
    the TLS delivery would use with it (the names its certificate must match; under a DANE level its TLSA
    records, or why it would not be used); for MX routing without a tls= rule, the domain's MTA-STS policy
    and where it came from (the spool's cache, or fetched)."""
    loaded = _config(config, _flags(settings))
    policy = _policy(loaded)
    try:
        recipient = parse_path(address)
        sender = parse_path(sender, null_ok=True)
    except AddressError as exc:
        raise _fail(str(exc), EX_USAGE) from None
    try:
        answer = route_view.explain(loaded, policy, recipient, sender, resolve)
    except ResolverConfigError as exc:
        raise _fail(str(exc), EX_CONFIG) from None
    typer.echo(json.dumps(answer, indent=2) if as_json else route_view.format_answer(answer, policy))


app.command("route")(_with_config_flags(route, ROUTE_KEYS))


def verify(
    address: Annotated[str, typer.Argument(metavar="ADDRESS", help="recipient address")],
    sender: Annotated[str, typer.Option("--sender", metavar="ADDRESS", help="envelope sender")] = "<>",
    config: ConfigOption = None,
    **settings: Any,
) -> None:
    """Ask the running daemon what would happen to mail for a recipient now, as a front door asks
    at RCPT: rewriting, aliases, transports and the next hop as delivery decides them (and DNS for
    MX routing); nothing is queued. Prints the SMTP reply a front door would give, on one line.

    Exits 0 when deliverable, 1 when it would bounce, 75 when it would be deferred now or the
    daemon cannot be asked."""
    from router.daemon.verifier import VerifyError, ask

    loaded = _config(config, _flags(settings))
    try:
        recipient = parse_path(address)
        sender = parse_path(sender, null_ok=True)
    except AddressError as exc:
        raise _fail(str(exc), EX_USAGE) from None
    try:
        verdict = ask(loaded.socket_path, recipient, sender)
    except StatusError as exc:
        raise _fail(str(exc), EX_TEMPFAIL) from None
    except VerifyError as exc:
        raise _fail(str(exc), EX_USAGE) from None
    typer.echo(verdict.reply())
    raise typer.Exit({DELIVERABLE: 0, REFUSED: 1}.get(verdict.result, EX_TEMPFAIL))


app.command("verify")(_with_config_flags(verify, SPOOL_KEYS))

def _policy(loaded: Config) -> Policy:
    try:
        return load_policy(loaded, privileges.fixed_agent_user())
    except PolicyError as exc:
        raise _fail(str(exc), EX_CONFIG) from None


@app.command()
def enqueue(
    recipients: Annotated[list[str], typer.Argument(metavar="RECIPIENT...", help="recipient addresses")],
    sender: Annotated[str, typer.Option("-f", "--from", metavar="ADDRESS", help="envelope sender; <> for none")],
    queue_dir: QueueDirOption = None,
    config: ConfigOption = None,
    notify: Annotated[str, typer.Option(
        "--notify", metavar="NEVER|SUCCESS,FAILURE,DELAY", help="DSN NOTIFY for every recipient")] = "",
    create: Annotated[bool, typer.Option(
        "--create", help="make the spool given by --queue-dir if it does not exist")] = False,
) -> None:
    """Queue the message on standard input, after a Received: field naming the submitting user;
    print its queue id. The configured spool is made (and said so) if no daemon has made it yet;
    one named by --queue-dir only with --create, since a mistyped path would make a spool that no
    daemon reads.

    Exits 75 when the spool cannot take it (try again later), 64 for bad arguments, a spool that
    does not exist or a message larger than message-size-limit."""
    loaded = _config(config, {"queue-dir": queue_dir} if queue_dir else {})
    try:
        recipients = [parse_path(rcpt) for rcpt in recipients]  # as queued, for the Received: field
    except AddressError as exc:
        raise _fail(str(exc), EX_USAGE) from None
    new = not os.path.isdir(os.path.join(loaded.queue_dir, INCOMING))
    if new and queue_dir is not None and not create:
        raise _fail(f"no spool at {loaded.queue_dir}: no daemon has made one there; check --queue-dir, "
                    "or give --create to make it", EX_USAGE)
    message = read_up_to(sys.stdin.buffer, loaded.message_size_limit + 1)  # more is refused: no need to read it all
    try:
        queue_id = queue_local(loaded, sender, recipients, lambda queue_id: prepend_fields(
            message, [received(loaded.hostname, queue_id, recipients)]), notify=notify)
    except SpoolError as exc:
        raise _fail(str(exc), EX_TEMPFAIL if exc.temporary else EX_USAGE) from None
    if new:
        typer.echo(f"qrouter: made the spool {loaded.queue_dir}: no daemon had made it yet", err=True)
    typer.echo(queue_id)


class _UnparsedArgs(typer.core.TyperCommand):
    """A command that takes its arguments exactly as given (`--` and all) in ctx.meta["args"]."""

    def parse_args(self, ctx, args):
        ctx.meta["args"] = list(args)
        return super().parse_args(ctx, [])


@app.command(cls=_UnparsedArgs)
def sendmail(ctx: typer.Context) -> None:
    """Queue the message on standard input as sendmail does: -t, -i/-oi, -f SENDER, -F NAME...

    The same as the qrouter-sendmail command (`qrouter sendmail --help` lists the options).
    Prints nothing; exits 75 when the spool cannot take it, 64 for bad arguments or addresses."""
    from router.front.sendmail import submit  # the sendmail command line lives there, for qrouter-sendmail too

    raise typer.Exit(submit(ctx.meta["args"], prog="qrouter sendmail"))


def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    shape: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--shape", metavar="QUEUE", help="instead, the shape of a queue (deferred, incoming, active, hold, all) "
                                         "as qshape: pending recipients by domain and age in minutes, and by last "
                                         "error")] = None,
    by_sender: Annotated[bool, typer.Option("--sender", help="with --shape: by sender domain")] = False,
    cluster: Annotated[bool, typer.Option("--cluster", help="every node of the cluster (cluster-redis) and the "
                                                            "totals, as the nodes last published them")] = False,
    **settings: Any,
) -> None:
    """Show the queues, the workers and what has been delivered since start.

    Takes the config keys of the spool as flags, as `qrouter run` does (--queue-dir, --status-socket...)."""
    if cluster:
        view = _cluster_view(_config(config, _flags(settings)))
        if view.error:
            raise _fail(view.error, EX_TEMPFAIL)
        typer.echo(json.dumps(view.as_json(), indent=2) if as_json else "\n".join(cluster_view.as_lines(view)))
        return
    loaded = _view_config(config, _flags(settings))
    if shape is not None:  # read from the files: no daemon needed, and the daemon is not slowed
        found = messages(Spool(loaded.queue_dir), WAITING if shape == "all" else _queues(shape))
        typer.echo("\n".join(queue_shape(found, time.time(), by_sender)))
        return
    try:
        answer = query(loaded.socket_path, {"command": "status"})
    except StatusError as exc:
        if not os.path.exists(loaded.socket_path):  # a daemon on a full disk may run without one
            raise _fail(f"{exc} (the daemon is not running or its status socket is unavailable; "
                        "see the log)", EX_TEMPFAIL) from None
        raise _fail(str(exc), EX_TEMPFAIL) from None
    # Counted here, not in the daemon: a large archive/ or deferred/ must not stall the supervisor.
    answer["queues"] = Spool(loaded.queue_dir).counts()
    typer.echo(json.dumps(answer, indent=2) if as_json else format_status(answer))


app.command("status")(_with_config_flags(status, (*SPOOL_KEYS, "cluster-redis")))


def _cluster_view(loaded: Config) -> cluster_view.ClusterView:
    if not loaded.cluster_redis:
        raise _fail("--cluster needs cluster-redis (in the config file, or --cluster-redis URL)", EX_USAGE)
    return cluster_view.sample(loaded.cluster_redis)


def top(config: ConfigOption = None,
        cluster: Annotated[bool, typer.Option("--cluster", help="every node of the cluster (cluster-redis) and the "
                                                                "totals")] = False,
        **settings: Any) -> None:
    """A live view of the daemon, refreshed every second: queues, workers, destinations, rates.
    q or Ctrl-C quits. Not on a terminal, it prints one view and exits."""
    from router.admin import top as top_view  # rich only for this command

    if cluster:
        loaded = _config(config, _flags(settings))
        _cluster_view(loaded)  # refused at once without cluster-redis
        raise typer.Exit(top_view.run(top_view.cluster_drawing(loaded.cluster_redis)))
    raise typer.Exit(top_view.run(top_view.node_drawing(_view_config(config, _flags(settings)))))


app.command("top")(_with_config_flags(top, (*SPOOL_KEYS, "cluster-redis")))


def drain(
    to: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--to", metavar="HOST[:PORT]", help="the peer (a qrouter node's SMTP front door) to hand the mail to")] = None,
    cancel: Annotated[bool, typer.Option("--cancel", help="end the drain: take mail and route it as before")] = False,
    config: ConfigOption = None, **settings: Any,
) -> None:
    """Take this node out of service: the front doors refuse new mail (421 4.3.2, exit 75) and the
    running daemon relays every queued message to the peer over SMTP, removing each once the peer
    has taken it. The mark is kept in the spool: a restarted daemon goes on draining. Held messages
    (hold/) stay here, and the answer says how many. `qrouter status` shows the progress."""
    if cancel == bool(to):
        raise _fail("give either --to HOST[:PORT] or --cancel", EX_USAGE)
    loaded = _view_config(config, _flags(settings))
    request = {"command": "drain", "cancel": True} if cancel else {"command": "drain", "to": to}
    try:
        answer = query(loaded.socket_path, request)
    except StatusError as exc:
        raise _fail(f"{exc} (a drain needs the running daemon)", EX_TEMPFAIL) from None
    if "error" in answer:
        raise _fail(answer["error"], EX_NOPERM if answer["error"].startswith("permission") else 1)
    if cancel:
        typer.echo(f"drain to {answer['to']} cancelled")
        return
    typer.echo(f"draining to {answer['to']}: new mail is refused; qrouter status shows the progress")
    if answer.get("held"):
        typer.echo(_held_line(answer["held"]))


app.command("drain")(_with_config_flags(drain, SPOOL_KEYS))


def format_status(answer: dict[str, Any]) -> str:
    lines = [f"qrouter pid {answer['pid']}, up {age(answer['uptime'])}, spool {answer['queue_dir']}, "
             f"logs to {answer.get('log', 'syslog')}",
             f"{'queue':<10} {'messages':>8}  oldest"]
    for queue, info in answer["queues"].items():
        oldest = age(answer["now"] - info["oldest"]) if info["oldest"] else "-"
        lines.append(f"{queue:<10} {info['messages']:>8}  {oldest}")
    lines.append(f"{'worker':>8}  {'kind':<7} {'state':<8} {'sessions':>8} {'oldest queue id':<26} {'done':>7} "
                 f"{'rss':>8} {'cpu':>7}")
    for worker in answer["workers"]:
        rss = f"{worker['rss'] / 2**20:.1f}M" if worker["rss"] else "-"
        cpu = f"{worker['cpu']:.1f}s" if worker["cpu"] is not None else "-"
        lines.append(f"{worker['pid']:>8}  {worker['pool']:<7} {worker['state']:<8} {worker['sessions']:>8} "
                     f"{worker['queue_id'] or '-':<26} {worker['done']:>7} {rss:>8} {cpu:>7}")
    lines.append(f"sessions: {answer['sessions']} of {answer['max_sessions']}")
    if answer.get("destinations"):
        lines.append(f"{'destination':<40} {'domains':>7} {'sessions':>8} {'window':>6} {'limit':>5} {'kept':>4} "
                     f"{'waiting':>7} {'deferred':>8}  state")
        for shown in answer["destinations"]:
            state = f"dead: {shown['last_error']}" if shown["dead"] else "ok"
            lines.append(f"{shown['destination']:<40} {shown['domains'] or '':>7} {shown['sessions']:>8} "
                         f"{shown['window']:>6g} {shown['limit']:>5} {shown['kept']:>4} {shown['waiting']:>7} "
                         f"{shown['deferred']:>8}  {state}")
    lines.extend(_drain_lines(answer))
    if cluster := answer.get("cluster"):
        lines.append(cluster_line(cluster))
    counters = answer["counters"]
    lines.append(f"since start: {counters['sent']} sent, {counters['deferred']} deferred, "
                 f"{counters['bounced']} bounced")
    verify = answer.get("verify")
    if verify is not None:
        lines.append(f"recipients verified since start: {verify['deliverable']} deliverable, {verify['refused']} "
                     f"refused, {verify['temporary']} temporary")
        rate = f"{verify['hit_rate']:.0%}" if verify["hit_rate"] is not None else "-"
        lines.append(f"callout results kept: {verify['cache']}; from there since start: {verify['hits']} of "
                     f"{verify['hits'] + verify['misses']} (hit rate {rate}); probes in flight: {verify['probes']}")
    return "\n".join(lines)


def _drain_lines(answer: dict[str, Any]) -> list[str]:
    """The drain's progress: the peer, the recipients sent there, the messages left, and those
    held here. It is done when nothing but held mail is left."""
    drain = answer.get("drain")
    if not drain:
        return []
    queues = answer["queues"]
    left = sum(queues[queue]["messages"] for queue in (INCOMING, ACTIVE, DEFERRED) if queue in queues)
    held = queues.get(HOLD, {}).get("messages", 0)
    since = f"draining to {drain['to']} for {age(answer['now'] - drain['started'])}"
    if left:
        lines = [f"{since}: {drain['sent']} recipient(s) sent there, {left} message(s) left; new mail is refused"]
    else:
        lines = [f"{since}: done, {drain['sent']} recipient(s) sent there and nothing left to send"
                 f"{' but held mail' if held else ''}; new mail is refused until qrouter drain --cancel"]
    return lines + ([_held_line(held)] if held else [])


def _held_line(held: int) -> str:
    """Held mail is not drained: an administrator held it on purpose, and may send it on."""
    return f"{held} message(s) in hold/ stay here: qrouter queue release sends them to the peer"


def cluster_line(cluster: dict[str, Any]) -> str:
    """How this node stands in its cluster: Redis answering, or since when not and what it does meanwhile."""
    if cluster["state"] == "unreachable":
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cluster["down_since"]))
        return (f"cluster: node {cluster['node']}, redis {cluster['redis']} unreachable since {since}; "
                f"limits divided by {cluster['divided_by']}")
    return (f"cluster: node {cluster['node']}, redis {cluster['redis']} {cluster['state']}, {cluster['nodes']} "
            f"node(s), {cluster['leases']} lease(s) held")


# -- qrouter queue ... -----------------------------------------------------------------------

queue_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="List, inspect and change the queue (mailq, postqueue and postsuper in one).")
app.add_typer(queue_app, name="queue")

QueueOption = Annotated[str, typer.Option(
    "--queue", metavar="QUEUE", help="waiting (incoming, active, deferred and hold), incoming, active, deferred, "
                                     "hold, archive, corrupt, or all")]
ToDomain = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--to-domain", metavar="DOMAIN", help="a pending recipient in this domain")]
FromOption = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--from", metavar="ADDRESS", help="sent by this envelope sender")]
OlderThan = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--older-than", metavar="AGE", help="queued longer ago than e.g. 2h, 3d")]
ReplyOption = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--reply", metavar="REGEX", help="a pending recipient's last reply matches this regex")]
DestinationOption = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--destination", metavar="NEXTHOP",
    help="a pending recipient goes to this next hop now (as qrouter route shows it)")]
IdsArgument = Annotated[Optional[list[str]], typer.Argument(metavar="ID...", help="queue ids")]  # noqa: UP045


def _selection(loaded: Config, to_domain: str | None, sender: str | None, older_than: str | None,
               reply: str | None, destination: str | None) -> Selection | None:
    if not any(x is not None for x in (to_domain, sender, older_than, reply, destination)):
        return None
    try:
        return Selection(to_domain=to_domain or "", sender=None if sender is None else sender.strip("<>"),
                         older_than=parse_duration(older_than) if older_than else 0.0,
                         reply=re.compile(reply, re.IGNORECASE) if reply is not None else None,
                         destination=destination or "", policy=_policy(loaded) if destination else None)
    except (ValueError, re.error) as exc:
        raise _fail(str(exc), EX_USAGE) from None


def _queues(queue: str) -> tuple[str, ...]:
    if queue == "all":
        return ALL
    if queue not in ALL:
        raise _fail(f"--queue {queue!r}: not a queue (one of {', '.join(ALL)}, all)", EX_USAGE)
    return (queue,)


def queue_list(queue: QueueOption = "waiting", to_domain: ToDomain = None, sender: FromOption = None,
               older_than: OlderThan = None, reply: ReplyOption = None, destination: DestinationOption = None,
               as_json: Annotated[bool, typer.Option("--json", help="JSON Lines, as postqueue -j")] = False,
               config: ConfigOption = None, **settings: Any) -> None:
    """One entry per message, as mailq: id (* active, ! held), size, arrival, sender, and each
    pending recipient under its last reply. Streams: the first line comes at once."""
    loaded = _view_config(config, _flags(settings))
    queues = WAITING if queue == "waiting" else _queues(queue)
    selection = _selection(loaded, to_domain, sender, older_than, reply, destination)
    count = 0
    for message in messages(Spool(loaded.queue_dir), queues, selection):
        count += 1
        typer.echo(json.dumps(as_json_line(message)) if as_json else "\n".join(as_lines(message)))
    if not as_json:
        typer.echo(f"-- {count} message(s)" if count else "queue is empty" if selection is None else
                   "no message matches")


queue_app.command("list")(_with_config_flags(queue_list, (*SPOOL_KEYS, *POLICY_KEYS)))


def queue_show(queue_id: Annotated[str, typer.Argument(metavar="ID", help="queue id")],
               body: Annotated[bool, typer.Option("--body", help="the message body too")] = False,
               config: ConfigOption = None, **settings: Any) -> None:
    """Everything about one message: envelope, each recipient's state and last reply, the history
    of its attempts, its header (and body with --body)."""
    loaded = _view_config(config, _flags(settings))
    spool = Spool(loaded.queue_dir)
    found = find(spool, queue_id)
    if found is None:
        raise _fail(f"{queue_id}: no such message", 1)
    path = spool.path(found.queue, queue_id)
    try:
        queue_file = parse(read_queue_file(path, loaded.message_size_limit + MAX_OVERHEAD), path)
    except (OSError, ValueError, NotAQueueFile) as exc:
        raise _fail(f"{queue_id}: {exc}", 1) from None
    lines = [f"queue id:  {queue_id} (in {found.queue}/)", f"arrival:   {time.ctime(queue_file.arrival)}",
             f"sender:    <{queue_file.sender}>", f"size:      {len(queue_file.message)} bytes",
             f"attempts:  {queue_file.attempts}"]
    if found.queue == DEFERRED:
        lines.append(f"next attempt: {time.ctime(found.mtime)}")
    for rcpt in queue_file.recipients:
        lines.append(f"recipient: <{rcpt.address}> {rcpt.state}" + (f" {rcpt.dsn}" if rcpt.dsn else "")
                     + (f" via {rcpt.relay}" if rcpt.relay else "") + (f": {rcpt.reply}" if rcpt.reply else ""))
    lines += [f"history:   {time.ctime(float(entry.split(' ', 1)[0]))} {entry.split(' ', 1)[1]}"
              for entry in queue_file.log]
    head = header_of(queue_file.message)  # with the empty line that ends it, LF or CRLF
    lines += ["", head.decode("utf-8", "replace").rstrip("\r\n")]
    if body:
        lines += ["", queue_file.message[len(head):].decode("utf-8", "replace")]
    typer.echo("\n".join(lines))


queue_app.command("show")(_with_config_flags(queue_show, (*SPOOL_KEYS, "message-size-limit")))


def queue_why(queue_id: Annotated[str, typer.Argument(metavar="ID", help="queue id")],
              config: ConfigOption = None, **settings: Any) -> None:
    """Why a message is still here: for each pending recipient the route now, the state of its
    destination in the daemon, the last reply, and when and why the next attempt happens."""
    loaded = _view_config(config, _flags(settings))
    found = find(Spool(loaded.queue_dir), queue_id)
    if found is None:
        raise _fail(f"{queue_id}: no such message (delivered, deleted or never queued)", 1)
    policy = _policy(loaded)
    decisions = [(rcpt, policy.route_queued(rcpt.address, found.file.rewritten)) for rcpt in found.file.pending()]
    try:
        answer = query(loaded.socket_path, {"command": "status",
                                            "sites": [decision.next_hop.destination for _, decision in decisions]})
        destinations = {d["destination"]: d for d in answer["destinations"]}
        sites, daemon = answer.get("sites", {}), True
    except (StatusError, KeyError):
        destinations, sites, daemon = {}, {}, False
    now = time.time()
    lines = [f"{queue_id}: in {found.queue}/, queued {age(now - found.file.arrival)} ago, "
             f"{found.file.attempts} attempt(s)"]
    lines.append({
        DEFERRED: f"next attempt: {'now' if found.mtime <= now else 'in ' + age(found.mtime - now)} "
                  f"({time.ctime(found.mtime)}), after attempt {found.file.attempts}"
                  + (f"; it fails at max-age ({loaded.max_age:g} days), in "
                     f"{age(max(0.0, found.file.arrival + loaded.max_age * 86400 - now))}"),
        HOLD: "held: it is not delivered until released (qrouter queue release ID)",
        ACTIVE: "being delivered now",
        INCOMING: "waiting for a worker: it is tried as soon as one and its destination have room",
    }.get(found.queue, f"in {found.queue}/: it is not delivered from there"))
    if not daemon:
        lines.append("the daemon is not running: nothing is tried until it starts")
    for rcpt, decision in decisions:
        lines += [f"<{rcpt.address}>:", f"  route now:   {decision.next_hop} ({decision.reason})",
                  f"  last reply:  {rcpt.reply or 'none: not tried yet'}" + (f" ({rcpt.dsn})" if rcpt.dsn else "")]
        state = destinations.get(sites.get(decision.next_hop.destination, decision.next_hop.destination))
        if state is not None:
            condition = f"dead: {state['last_error']}" if state["dead"] else "answering"
            held = f" (MX rollup: {state['domains']} domains)" if state.get("domains") else ""
            lines.append(f"  destination: {state['destination']}{held}: {condition}; {state['sessions']} session(s) "
                         f"of a window of {state['window']:g} (limit {state['limit']}), {state['waiting']} waiting, "
                         f"{state['deferred']} deferred for it")
        elif daemon:
            lines.append(f"  destination: {decision.next_hop.destination}: no delivery in progress or recently")
    typer.echo("\n".join(lines))


queue_app.command("why")(_with_config_flags(queue_why, (*SPOOL_KEYS, *POLICY_KEYS, "max-age")))


def _change(command: str, ids: list[str] | None, loaded: Config, selection: Selection | None,
            every: bool, queues: tuple[str, ...]) -> None:
    """Run a queue command on the named messages and those the selectors (or --all) choose:
    through the daemon when it runs, on the files when it does not. Exits 1 naming the ids it
    could not act on; 77 when this user may not open the spool."""
    spool = Spool(loaded.queue_dir)
    try:
        with unless_daemon(loaded.queue_dir) as alone:
            targets = list(ids or [])
            if selection is not None or every:
                targets += [m.queue_id for m in messages(spool, queues, selection)]
            if not targets and every and selection is None:
                typer.echo(f"{command}: no message in {', '.join(f'{queue}/' for queue in queues)}")
                return  # all of none: nothing went wrong
            if not targets:
                raise _fail(f"{command}: no message named or matching", 1)
            if alone:
                answer = QueueCommands(spool).run(command, targets)
            else:
                try:
                    answer = query(loaded.socket_path, {"command": command, "ids": targets}, timeout=120)
                except StatusError as exc:
                    raise _fail(f"the daemon runs but does not answer: {exc}", EX_TEMPFAIL) from None
    except SpoolNotAllowed:
        raise _fail(_denied(loaded, loaded.queue_dir), EX_NOPERM) from None
    if "error" in answer:
        raise _fail(answer["error"], EX_NOPERM if answer["error"].startswith("permission") else 1)
    for queue_id, what in answer["done"].items():
        typer.echo(f"{queue_id}: {what}")
    for queue_id, why in answer["failed"].items():
        typer.echo(f"{queue_id}: not done: {why}", err=True)
    if answer["failed"]:
        raise typer.Exit(1)


def _changer(command: str, queues: tuple[str, ...], doc: str, confirm: bool = False, all_unless_chosen: bool = False):
    """Make the queue command `command`; `all_unless_chosen`: with no id and no selector it acts
    on every message in `queues`, as `postqueue -f` flushes them all."""
    def change(ids: IdsArgument = None, to_domain: ToDomain = None, sender: FromOption = None,
               older_than: OlderThan = None, reply: ReplyOption = None, destination: DestinationOption = None,
               every: Annotated[bool, typer.Option("--all", help=f"every message in {', '.join(queues)}")] = False,
               every_deferred: Annotated[bool, typer.Option("--all-deferred", help="every deferred message")] = False,
               yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
               config: ConfigOption = None, **settings: Any) -> None:
        loaded = _view_config(config, _flags(settings))
        selection = _selection(loaded, to_domain, sender, older_than, reply, destination)
        if confirm and not yes:
            if not sys.stdin.isatty():
                raise _fail(f"{command} removes mail for good: give --yes when not asking at a terminal", EX_USAGE)
            typer.confirm(f"{command} the chosen messages for good?", abort=True)
        every = every or every_deferred or (all_unless_chosen and not ids and selection is None)
        _change(command, ids, loaded, selection, every, (DEFERRED,) if every_deferred else queues)

    change.__doc__ = doc
    meaningless = [*([] if confirm else ["yes"]),
                   *([] if DEFERRED in queues and len(queues) > 1 else ["every_deferred"])]
    queue_app.command(command)(_with_config_flags(_without(change, *meaningless), (*SPOOL_KEYS, *POLICY_KEYS)))


_changer("flush", (DEFERRED,), "Try deferred messages now: those named or chosen, or all of them.",
         all_unless_chosen=True)
_changer("hold", (INCOMING, DEFERRED), "Keep messages from delivery (to hold/) until released; one being "
                                       "delivered is held after its attempt.")
_changer("release", (HOLD,), "Deliver held messages again.")
_changer("delete", (INCOMING, DEFERRED, HOLD), "Remove messages for good (asks, unless --yes).", confirm=True)
_changer("requeue", (DEFERRED, HOLD), "Rewrite and route messages afresh and try them now, as postsuper -r.")


tls_report_app = typer.Typer(add_completion=False, no_args_is_help=True,
                             help="SMTP TLS reports (RFC 8460): the session counts, and sending the reports now.")
app.add_typer(tls_report_app, name="tls-report")
DayOption = Annotated[Optional[str], typer.Option("--day", metavar="YYYY-MM-DD", help="one UTC day")]  # noqa: UP045
TLS_REPORT_KEYS = (*SPOOL_KEYS, "me", "dns-servers", "dns-timeout", "tls-report-organization", "tls-report-contact",
                   "tls-report-ca", "tls-report-dkim-key", "tls-report-dkim-selector", "tls-report-dkim-domain")


def _day(text: str) -> datetime.date:
    try:
        return parse_day(text)
    except ValueError as exc:
        raise _fail(f"--day: {exc}", EX_USAGE) from None


def tls_report_show(day: DayOption = None,
                    as_json: Annotated[bool, typer.Option("--json", help="a JSON object a day and domain")] = False,
                    config: ConfigOption = None, **settings: Any) -> None:
    """The TLS sessions counted for the reports, by UTC day, policy domain and policy, with the
    failures, and what became of each report."""
    loaded = _view_config(config, _flags(settings))
    for line in tls_reports.show(loaded, [_day(day)] if day else tls_reports.days_kept(loaded.queue_dir), as_json):
        typer.echo(line)


def tls_report_send(day: DayOption = None, config: ConfigOption = None, **settings: Any) -> None:
    """Send the TLS reports of the days that are over and not yet reported (or of one), now, as
    the daemon does once a day; a report already sent is not sent again."""
    loaded = _config(config, _flags(settings))
    if day and _day(day) >= utc_day(time.time()):
        raise _fail(f"--day {day}: the day is not over yet (UTC)", EX_USAGE)
    if os.geteuid() == 0:  # never on the network as root: as the daemon's network workers are
        try:
            privileges.become(privileges.account(loaded.user), loaded.spool_group)
        except privileges.PrivilegeError as exc:
            raise _fail(str(exc), EX_CONFIG) from None
        privileges.for_network_worker()
    sender = tls_reports.Sender(loaded, Spool(loaded.queue_dir, loaded.spool_group))
    for line in sender.send([_day(day)] if day else None) or ["nothing to send"]:
        typer.echo(line)


tls_report_app.command("show")(_with_config_flags(tls_report_show, TLS_REPORT_KEYS))
tls_report_app.command("send")(_with_config_flags(tls_report_send, TLS_REPORT_KEYS))


def main() -> None:
    """Entry point: sysexits codes, so a usage error is 64 (EX_USAGE) as sendmail's callers expect."""
    try:
        app()
    except SystemExit as exc:
        sys.exit(EX_USAGE if exc.code == 2 else exc.code)
