"""
What the soak's secret scan looks for: the services' secrets, and every JWT the emulator issues.
"""

from __future__ import annotations

import re

from hpc_emulator import EmulatorServer


def record_issued_tokens(server: EmulatorServer) -> list[str]:
    """Return a list the emulator fills with every Muse JWT it issues from now on (for the secret scan)."""
    tokens = server._app.state.muse.tokens  # noqa: SLF001 - the emulator runs in this process
    issued: list[str] = []
    obtain = tokens.obtain

    def recording_obtain(username: str, password: str) -> str:
        token = obtain(username, password)
        issued.append(token)
        return token

    tokens.obtain = recording_obtain
    return issued


class SecretNeedles:
    """
    The secrets a scan looks for: fixed ones (a password, an API key) and every JWT issued.

    A JWT is found by its signature, which gives a token away even when a log line cut it. With
    thousands of tokens, one search per token over hundreds of MiB would take minutes: the data is
    instead cut into its runs of base64url characters (a signature follows a ``.``, so it starts a
    run) and each run's start looked up among the signatures. A signature glued to other
    base64url characters (not after a ``.``) would be missed: no token is ever written so.

    :param fixed: what each secret is -> its value.
    :param tokens: the JWTs issued, in order (named ``Muse JWT #n`` in what is found).
    """

    def __init__(self, fixed: dict[str, str], tokens: list[str]) -> None:
        self.fixed = {what: value.encode() for what, value in fixed.items()}
        self.signatures = {token.rsplit(".", 1)[-1].encode(): number for number, token in enumerate(tokens, 1)}
        self.lengths = sorted({len(signature) for signature in self.signatures})
        self.runs = re.compile(rb"[A-Za-z0-9_-]{%d,}" % self.lengths[0]) if self.lengths else None

    def __len__(self) -> int:
        return len(self.fixed) + len(self.signatures)

    def find(self, data: bytes) -> list[str]:
        """Return what is found in ``data``, one entry per secret and place."""
        found = [what for what, needle in self.fixed.items() if needle in data]
        if self.runs is not None:
            numbers = set()
            for run in self.runs.finditer(data):
                text = run.group()
                numbers.update(self.signatures[text[:n]] for n in self.lengths if text[:n] in self.signatures)
            found += [f"Muse JWT #{number} (its signature)" for number in sorted(numbers)]
        return found
