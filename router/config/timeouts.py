"""How long the SMTP client waits at each step of a session: the `smtp-timeouts` key's value.

It lives with the configuration because the configuration parses and shows it; the client that
obeys it (workers/smtp_client.py) is a layer above.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each step. The defaults are RFC 5321 4.5.3.2's; `block` bounds each
    64 KiB write of the message, `dot` the reply to the final dot (where a slow server is
    usually busy delivering, not dead)."""

    connect: float = 30
    greeting: float = 300
    helo: float = 300
    starttls: float = 300
    auth: float = 300
    mail: float = 300
    rcpt: float = 300
    data: float = 120
    block: float = 180
    dot: float = 600
    rset: float = 20
    quit: float = 20

    def __str__(self) -> str:
        """As the smtp-timeouts key writes them."""
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in fields(self))

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """Every step the same; for tests and for impatient callers."""
        return cls(**{f.name: seconds for f in fields(cls)})
