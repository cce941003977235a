"""`medimg server`: run the team tracking server, and add accounts to it.

`medimg server start --root DIR` runs MLflow (basic auth, proxied artifacts) on a PostgreSQL
kept in DIR until Ctrl-C / SIGTERM; MLflow and PostgreSQL die with it however it dies, and a
start on a DIR whose server died stops what it left first (`medimg.tracking.supervise`).
`medimg server user add NAME --password P --role ROLE` creates an account as the admin. What
the roles may do is in `medimg.tracking.server`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from medimg.config import Params
from medimg.errors import MedimgError

DEFAULT_URI = "http://127.0.0.1:5000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `start` and `user add` sub-commands to the `server` parser."""
    sub = parser.add_subparsers(dest="server_command", required=True)
    start = sub.add_parser("start", help="run the tracking server in the foreground")
    start.add_argument("--root", required=True, type=Path, help="folder for data and secrets")
    start.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    start.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    start.add_argument(
        "--backend-store-uri",
        help="SQLAlchemy URI of an existing database instead of a PostgreSQL in ROOT/pgdata",
    )
    start.add_argument("--workers", type=int, default=2, help="MLflow workers (default: 2)")

    user = sub.add_parser("user", help="manage accounts").add_subparsers(
        dest="user_command", required=True
    )
    add = user.add_parser("add", help="create an account (or reset its password and role)")
    add.add_argument("name")
    add.add_argument("--password", required=True)
    add.add_argument("--role", required=True, choices=("member", "ci"))
    add.add_argument("--root", type=Path, help="server folder: admin.json and the server's URI")
    add.add_argument(
        "--uri", help="tracking server (default: ROOT/server.json, then $MLFLOW_TRACKING_URI)"
    )


def run(params: Params | None, args: argparse.Namespace) -> int:
    """Dispatch `server start` / `server user add`; failures raise `MedimgError`."""
    from medimg.tracking import server

    if args.server_command == "start":
        return server.serve(
            args.root, args.host, args.port, args.backend_store_uri, workers=args.workers
        )
    uri = args.uri or _uri_from_root(args.root) or os.environ.get("MLFLOW_TRACKING_URI")
    uri = uri or DEFAULT_URI
    server.check_reachable(uri)
    api = server.AdminApi(uri, server.admin_credentials(args.root))
    created = server.add_user(api, args.name, args.password, args.role)
    print(f"{'created' if created else 'updated'} user {args.name} ({args.role}) on {uri}")
    return 0


def _uri_from_root(root: Path | None) -> str | None:
    """The URI a running `server start --root ROOT` wrote into ROOT/server.json."""
    path = root / "server.json" if root is not None else None
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())["uri"]
    except (ValueError, KeyError) as err:
        raise MedimgError(f"{path}: unreadable ({err})") from None
