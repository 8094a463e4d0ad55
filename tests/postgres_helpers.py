"""PostgreSQL for the tests that run against a real server: where one answers, and a schema of
its own per test so that runs (and engineers) never see each other's rows."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

POSTGRES_URL = os.environ.get(
    "GMNM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SKIP_REASON = (
    f"no PostgreSQL answers at {POSTGRES_URL}; start one there or set GMNM_TEST_POSTGRES_URL"
)


def postgres_available() -> bool:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except (SQLAlchemyError, OSError):
        return False


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A schema of its own for one test, migrated; yields a database URL that uses only it."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from service.db import Database, upgrade

    schema = f"gmnm_test_{secrets.token_hex(6)}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    rendered = url.render_as_string(hide_password=False)
    database = Database(rendered)
    upgrade(database)
    database.dispose()
    try:
        yield rendered
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
