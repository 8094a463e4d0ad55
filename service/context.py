"""What every request handler needs, built once per app, and the `Annotated` dependencies."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import KeyRing
from service.db import Database
from service.layout import Layout
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.supervisor import Supervisor

logger = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    settings: Settings
    db: Database
    layout: Layout
    keys: KeyRing
    metrics: ServiceMetrics
    supervisor: Supervisor | None = None


def get_context(request: Request) -> ServiceContext:
    context: ServiceContext = request.app.state.context
    return context


Context = Annotated[ServiceContext, Depends(get_context)]


_bearer = HTTPBearer(
    auto_error=False,
    description="an API key configured on the server (GMNM_API_KEYS), sent as a bearer token",
)


def get_owner(
    request: Request,
    context: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> str:
    # The security scheme documents the key in the OpenAPI schema; the raw header is checked
    # here so that a malformed one gets the same 401 answer as a missing one.
    return context.keys.owner_for(request.headers.get("authorization"))


Owner = Annotated[str, Depends(get_owner)]
