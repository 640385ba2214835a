"""
The tokens of the Muse emulator: the HS256 JWTs of ``jwt/obtain/``, and the levels a run needs.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any

import jwt

from hpc_emulator.config import EmulatorConfig
from hpc_emulator.muse_models import MuseError

LEVELS = {"visitor": 1, "user": 2, "superuser": 3, "admin": 4}
JWT_ALGORITHM = "HS256"


class TokenService:
    """
    Issues and checks the HS256 JWTs of ``jwt/obtain/``; the signing secret lives as long as the server.

    ``exp`` is a float (allowed by RFC 7519) checked here to the sub-second, so tests can use
    lifetimes below one second; PyJWT would round it down to whole seconds.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._secret = secrets.token_bytes(32)

    def obtain(self, username: str, password: str) -> str:
        """Return a token for these credentials, or raise a 401 :class:`MuseError`."""
        user = self._config.muse_users.get(username)
        if user is None or not hmac.compare_digest(user.password.encode(), password.encode()):
            raise MuseError(
                401,
                "Unable to log in with provided credentials.",
                "AuthenticationFailed",
                ["Check the username and password of your Muse web service account."],
            )
        now = time.time()
        claims = {"username": username, "level": user.level, "iat": now, "exp": now + self._config.token_lifetime}
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM)

    def decode(self, token: str) -> dict[str, Any]:
        """Return the claims of a valid token, or raise a 401 :class:`MuseError` saying what is wrong."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                options={"verify_exp": False, "verify_iat": False, "require": ["exp", "username", "level"]},
            )
        except jwt.PyJWTError as exc:
            raise MuseError(
                401,
                f"Invalid token: the jwt value is not a valid JSON Web Token ({exc}).",
                "AuthenticationFailed",
                ["Get a token by POST jwt/obtain/ with username and password."],
            ) from None
        if float(claims["exp"]) <= time.time():
            raise MuseError(
                401,
                "Token has expired: the jwt value is no longer valid.",
                "AuthenticationFailed",
                ["Get a new token by POST jwt/obtain/ with username and password."],
            )
        return claims

    def require(self, token: Any, level: str = "user") -> dict[str, Any]:
        """Return the claims of ``token`` if it allows ``level``, or raise 401 (no/bad token) or 403."""
        if not isinstance(token, str) or not token.strip():
            raise MuseError(
                401,
                "Authentication credentials were not provided: the jwt parameter (token) is required.",
                "NotAuthenticated",
                ["Get a token by POST jwt/obtain/ with username and password, then send it as the jwt parameter."],
            )
        claims = self.decode(token.strip())
        if LEVELS.get(str(claims["level"]), 0) < LEVELS[level]:
            raise MuseError(
                403,
                f"You do not have permission to perform this action: the token's level "
                f"{claims['level']!r} is below {level!r}.",
                "PermissionDenied",
                [f"Running a software needs an account of level {level} or higher."],
            )
        return claims
