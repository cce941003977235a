"""Team mode: one MLflow tracking server on a real PostgreSQL, with accounts and roles.

`serve()` runs `mlflow server --app-name basic-auth --serve-artifacts` in the foreground on a
PostgreSQL from the `pgserver` wheel (ROOT/pgdata, reached only through a unix socket inside that
0700 folder: no TCP port), or on `backend_store_uri` (a managed PostgreSQL, say). Artifacts are
proxied into ROOT/artifacts. SIGINT/SIGTERM stop MLflow's whole process group, then PostgreSQL;
a restart on the same ROOT finds every run, registered model and alias again. Should the
supervisor die otherwise (SIGKILL, OOM), `supervise` stops MLflow and PostgreSQL all the same,
and a later start on ROOT stops whatever is still left first; ROOT/server.json names the
supervisor, MLflow's process group and the pids that listen on the port.

Permissions are enforced by MLflow's own basic-auth RBAC (roles of (resource_type, pattern,
permission) grants, pattern an exact name or "*": no regex or prefix; written against MLflow
3.17, whose role API older 3.x lack):

- `default_permission = READ`: every account reads every experiment, run, model and alias
  (members load the champion to compare with it) and changes nothing it holds no grant for.
- role `member`: EDIT on experiment "*", to log runs (params, metrics, artifacts, logged models)
  into any experiment, a colleague's too. Creating an experiment needs no grant while MLflow
  workspaces are off; its creator gets MANAGE on it.
- role `ci`: the member grant plus MANAGE on registered_model "*": create versions, set and
  delete aliases (deleting one needs the delete right, which only MANAGE carries). `ci` is not
  an admin (admins bypass every check).
- So a member's `create_model_version` / `set_registered_model_alias` on a project model meets
  the default READ and the server answers 403.

Limit: MLflow lets any account create a *new* registered model and makes its creator MANAGE;
only DENY could stop that, and DENY also takes read access away. Whoever registered a project
model's name first would own it, so `serve()` and `add_user()` pre-create `PROJECT_MODELS` as
admin. A member can still create and manage models under other names, which CI never reads.

The admin password is MEDIMG_SERVER_ADMIN_PASSWORD, else generated once into ROOT/admin.json
(0600); MLflow uses it only to bootstrap an empty user store (change it later through the
update-password API). Auth tables live in database `mlflow_auth` of the same PostgreSQL, or in
ROOT/auth.db with `backend_store_uri`. MLflow's job runner (GenAI scorers: 8 processes) is off
unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import requests

from medimg.errors import MedimgError
from medimg.tracking import supervise

DATASETS = ("malaria", "oct2017")
PROJECT_MODELS = tuple(f"{name}-classifier" for name in DATASETS)
ROLES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "member": (("experiment", "*", "EDIT"),),
    "ci": (("experiment", "*", "EDIT"), ("registered_model", "*", "MANAGE")),
}
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD_ENV = "MEDIMG_SERVER_ADMIN_PASSWORD"
WS = {"workspace": "default"}  # where MLflow keeps grants while workspaces are disabled
GRANT_KEYS = ("resource_type", "resource_pattern", "permission")
_v3 = "/api/3.0/mlflow/{}".format  # the role (RBAC) endpoints
READY_TIMEOUT_S = 180.0


AUTH_INI = """[mlflow]
default_permission = READ
database_uri = {db}
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


class Credentials(NamedTuple):
    username: str
    password: str


def check_reachable(uri: str, timeout: float = 5) -> None:
    """Fail in about `timeout` seconds with a one-line error when nothing answers at `uri`.

    MLflow's own client retries for minutes before giving up; a pipeline step should instead
    say at once which server it could not reach. Non-HTTP URIs (local stores) are not checked.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=(timeout, timeout), verify=_verify())
    except requests.RequestException as err:
        raise MedimgError(f"{uri}: tracking server unreachable ({_reason(err)})") from None


def check_credentials(uri: str, timeout: float = 10) -> None:
    """Raise a one-line error naming the user when the server rejects the credentials (401).

    Reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD as the MLflow client does, so a
    typo is reported before a training run fails at its first log call.
    """
    if not uri.startswith(("http://", "https://")):
        return
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        resp = requests.get(url, auth=auth, timeout=(timeout, timeout), verify=_verify())
    except requests.RequestException as err:
        raise MedimgError(f"{uri}: tracking server unreachable ({_reason(err)})") from None
    if resp.status_code == 401:
        who = f"user '{user}' was refused" if user else "no MLFLOW_TRACKING_USERNAME set"
        raise MedimgError(f"{uri}: {who} (HTTP 401): check MLFLOW_TRACKING_USERNAME/PASSWORD")


def _verify() -> bool | str:
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def _reason(err: Exception) -> str:
    """A few words for a requests error, whose own message is a long nested repr."""
    if isinstance(err, requests.Timeout):
        return "no answer in time"
    markers = ("Connection refused", "Name or service not known", "No route to host")
    return next((m.lower() for m in markers if m in str(err)), type(err).__name__)


class AdminApi:
    """The few auth/registry REST calls `user add` and `serve` make, as the admin.

    Plain HTTP on the documented REST paths keeps this independent of which process's
    MLFLOW_TRACKING_* variables are set, and gives one-line errors instead of tracebacks.
    """

    def __init__(self, uri: str, admin: Credentials, timeout: float = 30) -> None:
        self.uri = uri.rstrip("/")
        self.admin = admin
        self.timeout = timeout

    def call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        try:
            resp = requests.request(
                method, self.uri + path, auth=tuple(self.admin), timeout=self.timeout, **kw
            )
        except requests.RequestException as err:
            raise MedimgError(f"{self.uri}: tracking server unreachable ({_reason(err)})") from None
        if resp.status_code == 401:
            raise MedimgError(f"{self.uri}: admin user '{self.admin.username}' was refused (401)")
        if resp.status_code not in ok:
            raise MedimgError(
                f"{self.uri}: {method} {path} failed (HTTP {resp.status_code}): "
                + " ".join(resp.text.split())[:300]
            )
        return resp.json() if resp.content else {}

    def created(self, method: str, path: str, **kw: Any) -> bool:
        """Run a create call; False when the thing was already there (re-runs are fine)."""
        body = self.call(method, path, ok=(200, 400, 409), **kw)
        if body.get("error_code") not in (None, "RESOURCE_ALREADY_EXISTS"):
            raise MedimgError(f"{self.uri}: {path} failed: {body.get('message', body)}")
        return "error_code" not in body


def ensure_project_setup(api: AdminApi) -> None:
    """Create the roles with their grants and the project's registered models, idempotently."""
    roles = {r["name"]: r for r in api.call("GET", _v3("roles/list"), params=WS)["roles"]}
    for name, grants in ROLES.items():
        if name not in roles:
            new = {**WS, "name": name, "description": f"medimg {name}"}
            roles[name] = api.call("POST", _v3("roles/create"), json=new)["role"]
        role = roles[name]
        have = {tuple(p[k] for k in GRANT_KEYS) for p in role.get("permissions", [])}
        for grant in set(grants) - have:
            body = {"role_id": role["id"], **dict(zip(GRANT_KEYS, grant, strict=True))}
            api.call("POST", _v3("roles/permissions/add"), json=body)
    for model in PROJECT_MODELS:
        api.created("POST", "/api/2.0/mlflow/registered-models/create", json={"name": model})


def add_user(api: AdminApi, name: str, password: str, role: str) -> bool:
    """Create `name` (or reset its password) and give it exactly one medimg role.

    Returns True when the account is new; re-running with another role moves the user.
    """
    if role not in ROLES:
        raise MedimgError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    ensure_project_setup(api)
    body = {"username": name, "password": password}
    created = api.created("POST", "/api/2.0/mlflow/users/create", json=body)
    if not created:
        api.call("PATCH", "/api/2.0/mlflow/users/update-password", json=body)
    ids = {r["name"]: r["id"] for r in api.call("GET", _v3("roles/list"), params=WS)["roles"]}
    held = api.call("GET", _v3("users/roles/list"), params={"username": name})["roles"]
    held_names = {r["name"] for r in held}
    for other in held_names & set(ROLES) - {role}:
        api.call("DELETE", _v3("roles/unassign"), json={"username": name, "role_id": ids[other]})
    if role not in held_names:
        api.call("POST", _v3("roles/assign"), json={"username": name, "role_id": ids[role]})
    return created


def admin_credentials(root: str | Path | None, create: bool = False) -> Credentials:
    """The admin account: MEDIMG_SERVER_ADMIN_PASSWORD if set, else ROOT/admin.json.

    With `create`, a missing admin.json is generated (0600) so that a first start needs no
    setup and the password never appears on a command line or in a log.
    """
    if password := os.environ.get(ADMIN_PASSWORD_ENV):
        return Credentials(ADMIN_USERNAME, password)
    if root is None:
        raise MedimgError(f"no admin credentials: set {ADMIN_PASSWORD_ENV} or pass --root")
    path = Path(root) / "admin.json"
    if not path.exists():
        if not create:
            raise MedimgError(f"no admin credentials: {path} is missing; set {ADMIN_PASSWORD_ENV}")
        _write_private(path, {"username": ADMIN_USERNAME, "password": secrets.token_urlsafe(24)})
    data = json.loads(path.read_text())
    return Credentials(data["username"], data["password"])


def _secret_key(root: Path) -> str:
    """Flask's CSRF key must stay the same across restarts and workers, so it is kept."""
    if key := os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return key
    path = root / "flask_secret.json"
    if not path.exists():
        _write_private(path, {"secret_key": secrets.token_hex(32)})
    return json.loads(path.read_text())["secret_key"]


def _write_private(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


@contextlib.contextmanager
def _postgres(pgdata: Path) -> Iterator[Any]:
    """A pgserver PostgreSQL for `pgdata`, certainly stopped on exit.

    pgserver stops it when its last recorded handle closes; a handle left by a killed process
    would keep it running, and this server owns its ROOT (`supervise.exclusive`), so whatever
    is still running after pgserver's cleanup is stopped here.
    """
    import psutil

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pgserver

        pg = pgserver.get_server(pgdata, cleanup_mode="stop")
    pid = pg.get_pid()
    try:
        yield pg
    finally:
        pg.cleanup()
        with contextlib.suppress(psutil.Error, subprocess.SubprocessError):
            proc = psutil.Process(pid)
            if proc.name() == "postgres" and proc.status() != psutil.STATUS_ZOMBIE:
                pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=pg.system_user)
                proc.wait(10)


def _create_databases(pg: Any, names: tuple[str, ...]) -> None:
    import psycopg

    with psycopg.connect(pg.get_uri("postgres"), autocommit=True) as conn:
        for name in names:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                continue
            conn.execute(f'CREATE DATABASE "{name}"')


class _Stop(Exception):
    """Raised by the first SIGINT/SIGTERM; later ones are ignored so cleanup runs to the end."""


def _raise_stop(signum: int, frame: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signum)


def serve(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    backend_store_uri: str | None = None,
    workers: int = 2,
    announce: Callable[[str], None] = print,
) -> int:
    """Run the team server until SIGINT/SIGTERM, then return 0; MedimgError if MLflow dies.

    Before starting, what a dead server of ROOT left running is stopped and a port someone
    else listens on is refused (`supervise`): "ready" is printed only when this MLflow answers.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    log_path = root / "mlflow.log"
    uri = f"http://{host}:{port}"
    try:
        with contextlib.ExitStack() as stack:
            lock = stack.enter_context(supervise.exclusive(root))
            if stopped := "; ".join(supervise.reap(root)):
                announce(f"medimg server: stopped what a dead server of {root} left: {stopped}")
            supervise.check_port(host, port)
            admin = admin_credentials(root, create=True)
            env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}  # docstring: jobs
            env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(root / "auth.ini"),
                MLFLOW_FLASK_SERVER_SECRET_KEY=_secret_key(root),
                MLFLOW_AUTH_ADMIN_USERNAME=admin.username,
                MLFLOW_AUTH_ADMIN_PASSWORD=admin.password,
            )
            env[supervise.MARKER_ENV] = str(root)  # uvicorn's processes inherit it: `reap`
            log = stack.enter_context(open(log_path, "ab"))
            watchdog = supervise.Watchdog(root, lock, log)
            stack.callback(watchdog.done)
            record = {
                "root": str(root), "host": host, "port": port, "uri": uri,
                "supervisor": supervise.ref(os.getpid()),
                "watchdog": supervise.ref(watchdog.proc.pid),
            }  # fmt: skip
            supervise.write_json(root / supervise.RECORD, record)
            stack.callback((root / supervise.RECORD).unlink, missing_ok=True)
            if backend_store_uri is None:
                pg = stack.enter_context(_postgres(root / "pgdata"))
                record["postgres"] = supervise.ref(pg.get_pid())
                supervise.write_json(root / supervise.RECORD, record)
                _create_databases(pg, ("mlflow", "mlflow_auth"))
                backend, auth_db = pg.get_uri("mlflow"), pg.get_uri("mlflow_auth")
            else:
                backend, auth_db = backend_store_uri, f"sqlite:///{root / 'auth.db'}"
            env["MLFLOW_BACKEND_STORE_URI"] = backend  # in the environment, not in `ps`
            (root / "auth.ini").write_text(AUTH_INI.format(db=auth_db, admin=admin.username))
            (root / "artifacts").mkdir(exist_ok=True)
            cmd = [
                sys.executable, "-m", "mlflow", "server",
                "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
                "--host", host, "--port", str(port), "--workers", str(workers),
                "--app-name", "basic-auth",
            ]  # fmt: skip
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=supervise.die_with_parent(),
            )  # fmt: skip
            record["mlflow"] = supervise.ref(proc.pid)  # its pid is its process group's id
            supervise.write_json(root / supervise.RECORD, record)
            stack.callback(supervise.stop_group, proc)
            serving = _wait_ready(proc, uri, port, log_path)
            ensure_project_setup(AdminApi(uri, admin))
            info = {
                "uri": uri, "pid": os.getpid(), "host": host, "port": port, "root": str(root),
                "mlflow_pgid": proc.pid, "serving_pids": serving,
                "postgres_pid": record.get("postgres", {}).get("pid"),
                "watchdog_pid": watchdog.proc.pid,
            }  # fmt: skip
            supervise.write_json(root / "server.json", info)
            stack.callback((root / "server.json").unlink, missing_ok=True)
            announce(f"medimg server ready at {uri} (root {root}, log {log_path})")
            sys.stdout.flush()  # the ready line is what scripts and tests wait for
            code = proc.wait()
            raise MedimgError(f"mlflow server exited with status {code}; see {log_path}")
    except _Stop:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_ready(proc: subprocess.Popen[bytes], uri: str, port: int, log_path: Path) -> list[int]:
    """Wait until /health answers and the port is held by MLflow's group; its listening pids.

    /health alone is not enough: another process on the port would answer it while our uvicorn
    fails to bind, and "ready" would name a server that is not this one.
    """
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise MedimgError(
                f"mlflow server exited with status {proc.returncode} before it was ready"
                f" ({' '.join(tail)[:200]}); see {log_path}"
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                holders = supervise.port_holders(port)
                ours = [p.pid for p in holders if _pgid(p.pid) == proc.pid]
                if foreign := [p for p in holders if p.pid not in ours]:
                    raise MedimgError(
                        f"port {port} is served by {supervise.describe(foreign)}, not by this"
                        f" server's MLflow (process group {proc.pid}); see {log_path}"
                    )
                return ours
        time.sleep(0.5)
    raise MedimgError(f"mlflow server not ready after {READY_TIMEOUT_S:g} s; see {log_path}")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
