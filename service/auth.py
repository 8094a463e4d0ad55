"""API keys: bearer tokens checked against stored sha256 digests in constant time.

Each key is its own owner: the digest's first 16 hex digits label the jobs, files and checkpoints
it creates, and a key sees only those. With no keys configured every caller is the owner `local`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from service.errors import ApiError

logger = logging.getLogger(__name__)

LOCAL_OWNER = "local"


class KeyRing:
    """The configured keys, held only as digests."""

    def __init__(self, digests: list[str]) -> None:
        self._digests = [bytes.fromhex(digest) for digest in digests]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner_for(self, authorization: str | None) -> str:
        """The owner label for an `Authorization` header; raises 401 when it is not a valid key."""
        if not self.enabled:
            return LOCAL_OWNER
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(
                401,
                "Missing API key: send it as the header `Authorization: Bearer <key>`.",
                type="authentication_error",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        offered = hashlib.sha256(authorization[7:].strip().encode()).digest()
        # Compare against every digest so the time taken does not say which one was close.
        matched: bytes | None = None
        for digest in self._digests:
            if hmac.compare_digest(offered, digest):
                matched = digest
        if matched is None:
            raise ApiError(
                401,
                "Invalid API key: the bearer token matches none of the keys configured on the "
                "server (GMNM_API_KEYS or GMNM_API_KEYS_FILE).",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return matched.hex()[:16]
