"""The `gmnm` command: one entry point whose subcommands come from the packages that own them."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmnm", description="Convert, fine-tune and serve models with GMNM nonlinearities."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True)

    serve = subparsers.add_parser("serve", help="run the REST service (and its job supervisor)")
    serve.add_argument("--host", help="address to bind (default GMNM_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default GMNM_PORT or 8000)")
    _add_data_dir(serve)
    serve.add_argument(
        "--no-supervisor",
        action="store_true",
        help="serve the API only; separate `gmnm worker` processes run the jobs",
    )
    serve.set_defaults(func=_serve)

    worker = subparsers.add_parser(
        "worker", help="run jobs from the database without serving the API"
    )
    _add_data_dir(worker)
    worker.set_defaults(func=_worker)

    database = subparsers.add_parser("db", help="database maintenance")
    database_commands = database.add_subparsers(dest="db_command", required=True)
    upgrade = database_commands.add_parser("upgrade", help="apply the schema migrations")
    _add_data_dir(upgrade)
    upgrade.set_defaults(func=_db_upgrade)

    from surgery.cli import register as register_convert

    register_convert(subparsers)
    return parser


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, help="database, files and checkpoints (default GMNM_DATA_DIR)"
    )


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from service.settings import Settings

    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import is_loopback

    settings = _settings(args, host=args.host, port=args.port)
    if args.no_supervisor:
        settings.run_supervisor = False
    if not is_loopback(settings.host) and not settings.key_digests():
        if not settings.allow_no_auth:
            logger.error(
                "refusing to serve on %s without API keys: anyone who reaches that address could "
                "run jobs. Set GMNM_API_KEYS (or GMNM_API_KEYS_FILE), bind to 127.0.0.1, or set "
                "GMNM_ALLOW_NO_AUTH=1 if a proxy in front authenticates callers.",
                settings.host,
            )
            return 2
        logger.warning("serving on %s without API keys (GMNM_ALLOW_NO_AUTH=1)", settings.host)
    app = create_app(settings)
    logger.info(
        "serving on http://%s:%d with data in %s", settings.host, settings.port, settings.data_dir
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.db import Database, upgrade
    from service.supervisor import Supervisor

    settings = _settings(args)
    database = Database(settings.resolved_database_url)
    if database.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(database)
    supervisor = Supervisor(settings, database)

    def stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s; checkpointing running jobs", signal.Signals(signum).name)
        supervisor.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    supervisor.run_forever()
    database.dispose()
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from service.db import Database, upgrade

    settings = _settings(args)
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.resolved_database_url)
    upgrade(database)
    database.dispose()
    logger.info("database schema is at the newest migration")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
