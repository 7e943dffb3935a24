"""The routing policy with 10,000 rules: lookups per second, against a linear first-match scan
over the same rules measured in the same run (what a naive transport map would do)."""

from __future__ import annotations

import random
import re
import tempfile
import time
from pathlib import Path

from policy.transport_map import TransportMap, load_transport_map, normalize_domain

RULES = 10_000
LOOKUPS = 20_000


def write_rules(path: Path) -> None:
    """Mostly plain domains, some wildcards, a few regexes spread through the file, as a large
    site's map looks."""
    lines = []
    for i in range(RULES):
        if i % 1000 == 500:
            lines.append(f"/.*-{i}-[0-9]{{4}}\\.example\\.net/ [192.0.2.{i % 250}]:2525")
        elif i % 10 == 0:
            lines.append(f"*.zone{i}.example.org mx{i}.example.org")
        else:
            lines.append(f"d{i}.example.com queue/maildir /var/mail/{i}/%u")
    path.write_text("\n".join(lines) + "\n")


def addresses(count: int) -> list[str]:
    rng = random.Random(7)
    choices = []
    for _ in range(count):
        i = rng.randrange(RULES * 11 // 10)  # a tenth match no rule: the worst case for a scan
        kind = rng.random()
        if kind < 0.1:
            choices.append(f"u@host.zone{i - i % 10}.example.org")
        elif kind < 0.12:
            choices.append(f"u@box-{i - i % 1000 + 500}-1234.example.net")
        else:
            choices.append(f"user{i}@d{i}.example.com")
    return choices


def linear_lookup(table: TransportMap, address: str):
    """The reference: try every rule in file order."""
    domain = normalize_domain(address.rpartition("@")[2])
    for rule in table.rules:
        text = rule.destination
        if text.startswith("/"):
            if re.fullmatch(text[1:-1], address, re.IGNORECASE):
                return rule
        elif text.startswith("*."):
            if domain.endswith("." + normalize_domain(text[2:])):
                return rule
        elif domain == normalize_domain(text):
            return rule
    return None


def bench_policy(keep: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="qrouter-bench-policy-") as directory:
        path = Path(directory) / "transports"
        write_rules(path)
        started = time.perf_counter()
        table = load_transport_map(str(path), {})
        load_seconds = time.perf_counter() - started
    sample = addresses(LOOKUPS)
    started = time.perf_counter()
    found = [table.lookup(a) for a in sample]
    indexed = LOOKUPS / (time.perf_counter() - started)
    scanned = sample[:500]
    started = time.perf_counter()
    reference = [linear_lookup(table, a) for a in scanned]
    linear = len(scanned) / (time.perf_counter() - started)
    if reference != found[:len(scanned)]:
        raise RuntimeError("the indexed lookup and the linear scan disagree")
    print(f"  {RULES} rules loaded in {load_seconds * 1000:.0f} ms; {indexed:,.0f} lookups/s indexed, "
          f"{linear:,.0f} lookups/s by linear scan")
    return {"load_ms": load_seconds * 1000, "lookups_per_s": indexed, "linear_per_s": linear,
            "speedup": indexed / linear}
