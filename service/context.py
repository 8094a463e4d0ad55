"""What every request handler needs, built once per app, and the `Annotated` dependencies."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

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


def get_owner(context: Context, authorization: Annotated[str | None, Header()] = None) -> str:
    return context.keys.owner_for(authorization)


Owner = Annotated[str, Depends(get_owner)]
