"""Who may use the panel: loopback only, unless credentials are given (``--auth`` or ``LOWVRAM_UI_AUTH``).

Kept apart from the Gradio app so the CLI can refuse a bad ``--host``/``--auth`` before importing Gradio.
"""

from __future__ import annotations

import ipaddress
import os

from ..errors import LowvramError

AUTH_ENV = "LOWVRAM_UI_AUTH"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``user:pass`` → (user, pass); a LowvramError for anything else."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise LowvramError("--auth must be written USER:PASS (both non-empty)",
                           f"e.g. --auth alice:a-long-password, or set {AUTH_ENV}=alice:a-long-password")
    return user, password


def resolve_auth(host: str, auth: str | None, env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """Credentials for the server: required whenever it listens beyond this machine (loopback)."""
    env = os.environ if env is None else env
    creds = parse_auth(auth) or parse_auth(env.get(AUTH_ENV))
    if not is_loopback(host) and creds is None:
        raise LowvramError(
            f"refusing to serve the panel on {host} without a password: anyone who can reach it could run "
            "jobs on this machine",
            f"add --auth USER:PASS (or set {AUTH_ENV}=USER:PASS), or keep the default --host 127.0.0.1",
        )
    return creds
