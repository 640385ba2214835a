"""
Command line of the emulator: ``python -m hpc_emulator`` or ``hpc-emulator``.

It prints the Muse and Rescale base URLs, the credentials, and ready-to-paste Airflow connection
variables, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from hpc_emulator.config import DEMO_API_KEY, DEMO_PASSWORD, DEMO_USER, EmulatorConfig, MuseUser
from hpc_emulator.faults import FaultRuleError, parse_rules
from hpc_emulator.server import EmulatorServer

LEVELS = ("visitor", "user", "superuser", "admin")


def parse_user(text: str) -> tuple[str, MuseUser]:
    """Parse ``NAME:PASSWORD[:LEVEL]`` into a Muse account."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:PASSWORD or NAME:PASSWORD:LEVEL")
    level = parts[2] if len(parts) == 3 else "user"
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: level must be one of {', '.join(LEVELS)}")
    return parts[0], MuseUser(parts[1], level)


def load_faults(value: str) -> list:
    """Read fault rules from a JSON list given inline or as ``@FILE``."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        rules = json.loads(text)
        parse_rules(rules)
    except (ValueError, FaultRuleError) as exc:
        raise argparse.ArgumentTypeError(f"invalid fault rules: {exc}") from None
    return rules


def build_parser() -> argparse.ArgumentParser:
    """Return the command line parser."""
    parser = argparse.ArgumentParser(
        prog="hpc-emulator",
        description="A local emulator of the Muse and Rescale APIs, to test Airflow DAGs offline. "
        "It binds loopback only by default and runs submitted commands with your own rights.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    parser.add_argument(
        "--data-dir", type=Path, help="where runs and results live (default: a temporary folder, removed on exit)"
    )
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a certificate made at start")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies every emulated delay")
    parser.add_argument("--pending-seconds", type=float, default=0.5, help="how long a new run waits in the queue")
    parser.add_argument("--token-lifetime", type=float, default=3600.0, help="seconds a Muse token stays valid")
    parser.add_argument("--seed", type=int, help="seed of the random choices (probability faults, Muse job ids)")
    parser.add_argument("--faults", type=load_faults, default=[], help="fault rules: a JSON list or @FILE")
    parser.add_argument(
        "--user", type=parse_user, action="append", metavar="NAME:PASSWORD[:LEVEL]",
        help=f"a Muse account (repeatable; default {DEMO_USER}:{DEMO_PASSWORD})",
    )
    parser.add_argument("--api-key", action="append", help=f"an accepted Rescale API key (repeatable; default {DEMO_API_KEY})")
    parser.add_argument(
        "--software-dir", type=Path, action="append", default=[], help="an extra Muse software catalogue folder"
    )
    return parser


def config_from(args: argparse.Namespace) -> EmulatorConfig:
    """Build the emulator settings from parsed arguments."""
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="hpc-emulator-"))
    config = EmulatorConfig(
        data_dir=data_dir,
        token_lifetime=args.token_lifetime,
        time_scale=args.time_scale,
        pending_seconds=args.pending_seconds,
        seed=args.seed,
        faults=args.faults,
        tls=args.tls,
        software_dirs=args.software_dir,
    )
    if args.user:
        config.muse_users = dict(args.user)
    if args.api_key:
        config.rescale_api_keys = frozenset(args.api_key)
    return config


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def banner(server: EmulatorServer) -> str:
    """Return what a user needs to point Airflow at the emulator."""
    users = ", ".join(f"{name}/{user.password} ({user.level})" for name, user in server.config.muse_users.items())
    keys = ", ".join(sorted(server.config.rescale_api_keys))
    lines = [
        f"HPC emulator listening on {server.base_url} (data: {server.config.data_dir}"
        f"{', removed on exit' if server.deletes_data_dir else ''})",
        f"  Muse     {server.muse_url}   users: {users}",
        f"  Rescale  {server.rescale_url}   API keys: {keys}",
    ]
    if server.ca_path:
        lines.append(f"  TLS CA   {server.ca_path}")
    if not is_loopback(server.host):
        lines.append(
            f"  WARNING  {server.host} is reachable from other machines: anyone who reaches it can run "
            "commands with your rights."
        )
    lines.append("Airflow connections (paste into your shell):")
    lines += [f"  export {name}={shlex.quote(value)}" for name, value in server.airflow_conn_env().items()]
    lines.append("Admin: GET /_emulator/counters, POST /_emulator/faults, POST /_emulator/reset. Ctrl-C stops.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Start the emulator and serve until interrupted (Ctrl-C or SIGTERM); return the exit status."""
    args = build_parser().parse_args(argv)
    config = config_from(args)
    try:
        # A data folder made here is temporary: the server removes it when it stops.
        server = EmulatorServer(config, host=args.host, port=args.port, delete_data_dir=args.data_dir is None)
    except OSError as exc:
        if args.data_dir is None:
            shutil.rmtree(config.data_dir, ignore_errors=True)
        print(f"hpc-emulator: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    # SIGTERM ends the process the way Ctrl-C does, so the cleanup below always runs.
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.start()
        print(banner(server), flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
