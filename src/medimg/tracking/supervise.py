"""The team server's processes die with `medimg server start`, however it dies.

Why: `mlflow server` starts uvicorn (master and workers) in the process group `serve()` gives it,
and pgserver's PostgreSQL daemonizes. A SIGKILLed supervisor used to leave all of them running:
they kept the port and ROOT/pgdata, and the next start on that ROOT printed "ready" while the
orphan answered /health. Three layers, each enough for the common case:

1. `die_with_parent()`: PR_SET_PDEATHSIG on the `mlflow server` child, which gets SIGTERM the
   moment the supervisor dies and forwards it to uvicorn.
2. A watchdog, `python -m medimg.tracking.supervise ROOT FD`, in its own session (Ctrl-C, or a
   kill of the supervisor's group, misses it). It holds the read end of a pipe whose write end
   only the supervisor has, and a copy of the ROOT lock. EOF without `DONE` means the supervisor
   died: it reaps ROOT (`reap`), then exits, which releases the lock, so a new start waits for the
   reaping to end instead of racing it.
3. A new start reaps whatever is still left (the watchdog may have been killed too), found from
   ROOT/server.pids.json, the ROOT marker in processes' environment, and ROOT/pgdata/postmaster.pid;
   then it refuses a port another process listens on (`check_port`).

Every pid is recorded with its start time, so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil

from medimg.errors import MedimgError

RECORD = "server.pids.json"  # what the supervisor started, written as it starts it
MARKER_ENV = "MEDIMG_SERVER_ROOT"  # set in MLflow's environment: uvicorn's processes inherit it
DONE = b"done"  # the supervisor stopped everything itself: the watchdog has nothing to do
STOP_TIMEOUT_S = 20.0
LOCK_WAIT_S = 60.0  # a dead supervisor's watchdog needs at most ~2 x STOP_TIMEOUT_S
PR_SET_PDEATHSIG = 1


def ref(pid: int) -> dict[str, Any]:
    """A pid with its start time: enough to tell the process from a later one with its pid."""
    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def live(entry: dict[str, Any] | None) -> psutil.Process | None:
    """The recorded process if it still runs (not a zombie, not a recycled pid), else None."""
    if not entry:
        return None
    with contextlib.suppress(psutil.Error, KeyError, TypeError):
        proc = psutil.Process(entry["pid"])
        same = abs(proc.create_time() - entry["create_time"]) < 0.01
        if same and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    return None


def read_record(root: Path) -> dict[str, Any]:
    """ROOT's record of the supervisor's processes; {} when missing or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((root / RECORD).read_text())
        return data if isinstance(data, dict) else {}
    return {}


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write atomically: a reader (watchdog, new start, `user add`) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A Popen `preexec_fn` that makes the child get `sig` when this process dies (Linux).

    The library is loaded here, in the parent: the child runs only the prctl call. A parent
    that died between fork and prctl is caught by the getppid check.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[IO[str]]:
    """One server per ROOT (two would share one PostgreSQL data directory); yields the lock file.

    A live supervisor holding the lock means refusal, naming its pid and port. A dead one's
    watchdog holds it while it reaps: then this waits (up to LOCK_WAIT_S) for it to finish.
    """
    with open(root / ".server.lock", "w") as fh:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                record = read_record(root)
                holder = live(record.get("supervisor"))
                if holder is not None or time.monotonic() > deadline:
                    holder = holder or live(record.get("watchdog"))
                    who = f"pid {holder.pid}, " if holder else ""
                    raise MedimgError(
                        f"{root}: another medimg server is already running here"
                        f" ({who}port {record.get('port', '?')})"
                    ) from None
                time.sleep(0.2)
        yield fh


class Watchdog:
    """The watchdog process (module docstring, layer 2), started and told `DONE` by `serve()`."""

    def __init__(self, root: Path, lock: IO[str], log: IO[bytes]) -> None:
        read, self._write = os.pipe()  # both ends non-inheritable: only the watchdog gets `read`
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "medimg.tracking.supervise", str(root), str(read)],
                pass_fds=(read, lock.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.close(read)

    def done(self) -> None:
        """Everything is stopped: tell the watchdog so, and wait for it (it holds the lock)."""
        with contextlib.suppress(OSError):
            os.write(self._write, DONE)
        with contextlib.suppress(OSError):
            os.close(self._write)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The ones still running; zombies count as dead (they wait for a reaper, not for us)."""
    left = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
    return left


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes in process group `pgid`."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
    return _alive(found)


def stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM MLflow's process group (server, uvicorn, workers), SIGKILL what is left later."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def marked(root: Path) -> list[psutil.Process]:
    """Processes started for ROOT's MLflow: MARKER_ENV=ROOT is in their environment."""
    want, mine = str(root), {os.getpid(), os.getppid()}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(MARKER_ENV) == want:
                found.append(proc)
    return _alive(found)


def postmaster(pgdata: Path, entry: dict[str, Any] | None = None) -> psutil.Process | None:
    """The running PostgreSQL of `pgdata`: the recorded one, else the pid in postmaster.pid,
    if that process is a postgres naming `pgdata` on its command line."""
    if (proc := live(entry)) is not None:
        return proc
    with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        proc = psutil.Process(pid)
        if proc.name() == "postgres" and str(pgdata) in proc.cmdline():
            return next(iter(_alive([proc])), None)
    return None


def stop_postgres(proc: psutil.Process, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL; True once it is gone."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        _signal([proc], sig)
        if not _wait_gone([proc], wait):
            return True
    return False


def reap(root: Path) -> list[str]:
    """Stop every process a dead supervisor of ROOT left; one phrase per thing stopped.

    Only called with ROOT's lock held (watchdog, or a new start), so nothing of ROOT is live.
    MLflow goes first, so that PostgreSQL's fast shutdown finds no client left.
    """
    record, stopped = read_record(root), []
    procs = marked(root)
    if pgid := (record.get("mlflow") or {}).get("pid"):  # its group, if it still is ours
        group = group_members(pgid)
        if live(record.get("mlflow")) or any(p in procs for p in group):
            procs += [p for p in group if p not in procs]
    if procs:
        stopped.append(f"MLflow pids {' '.join(str(p.pid) for p in procs)}")
        _signal(procs, signal.SIGTERM)
        _signal(_wait_gone(procs, STOP_TIMEOUT_S), signal.SIGKILL)
        _wait_gone(procs, 5)
    pgdata = root / "pgdata"
    if (pg := postmaster(pgdata, record.get("postgres"))) is not None:
        stopped.append(f"PostgreSQL pid {pg.pid}")
        stop_postgres(pg)
    if postmaster(pgdata) is None:  # pgserver's handle list still names the dead supervisor
        (pgdata / ".handle_pids.json").unlink(missing_ok=True)
    for name in ("server.json", RECORD):
        (root / name).unlink(missing_ok=True)
    return stopped


def port_holders(port: int) -> list[psutil.Process]:
    """Every process with a socket listening on TCP `port` (any address): the inodes in
    /proc/net/tcp{,6} matched to /proc/*/fd. uvicorn's master and workers share one socket, and
    psutil names one process per socket. Processes this user may not inspect are left out."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()  # sl local rem st tx:rx tr:when retrnsmt uid timeout inode
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    procs = []
    for proc in psutil.process_iter() if inodes else ():
        with contextlib.suppress(OSError):
            fds = Path(f"/proc/{proc.pid}/fd")
            if any(os.readlink(fds / fd) in inodes for fd in os.listdir(fds)):
                procs.append(proc)
    return _alive(procs)


def describe(procs: list[psutil.Process]) -> str:
    """'pid 12 (python -m uvicorn)': a few words per process, for a one-line error."""
    words = []
    for proc in procs[:4]:
        with contextlib.suppress(psutil.Error):
            argv = proc.cmdline() or [proc.name()]
            what = " ".join(" ".join([Path(argv[0]).name, *argv[1:3]]).split())[:60]
            words.append(f"pid {proc.pid} ({what})")
    return ", ".join(words) or "a process this user cannot see"


def check_port(host: str, port: int) -> None:
    """Refuse, in one line naming pid and port, a port some other process already listens on.

    Without this, MLflow's own bind fails after /health has been answered by the other process.
    SO_REUSEADDR as uvicorn sets it: a socket in TIME_WAIT does not count.
    """
    if holders := port_holders(port):
        raise MedimgError(
            f"port {port} on {host} is already in use by {describe(holders)}:"
            " stop it or choose another --port"
        )
    try:
        addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise MedimgError(f"--host {host}: cannot be resolved ({err.strerror})") from None
    for family, kind, proto, _, addr in addrs:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as err:
                raise MedimgError(
                    f"port {port} on {host} cannot be bound ({err.strerror}):"
                    " stop what uses it or choose another --port"
                ) from None
        return


def watch(root: Path, fd: int) -> int:
    """The watchdog's body: block until the supervisor closes the pipe; reap unless told DONE.

    SIGINT/SIGTERM/SIGHUP are ignored: a service manager that signals every process of the
    server must not kill the watchdog before the supervisor has said DONE or died.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(64):
            data += chunk
    if data == DONE:
        return 0
    stopped = reap(root)
    print(f"medimg watchdog: supervisor gone; stopped {'; '.join(stopped) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(watch(Path(sys.argv[1]), int(sys.argv[2])))
