"""The admin bearer token, checked the same way by both front ends.

Admin endpoints (model reload, live catalogue edits) are off unless ``ONEREC_ADMIN_TOKEN`` is set:
then they answer 404 / NOT_FOUND, so a scanner cannot tell them from a missing route. The comparison
is constant-time.
"""

from __future__ import annotations

import hmac

from service.errors import NotFound, Unauthorized
from service.settings import Settings


def check_admin_token(settings: Settings, authorization: str | None) -> None:
    """Raise unless ``authorization`` is ``Bearer <the admin token>``."""
    token = settings.admin_token
    if not token:
        raise NotFound("admin endpoints are off: set ONEREC_ADMIN_TOKEN to enable them")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("missing or wrong bearer token")
