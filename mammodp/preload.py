"""Preloaded stage processes: import torch, timm and MLflow once, fork one worker per command.

A demo `dvc repro` starts 27 `mammodp` processes. Each used to spend 6-9 s importing torch,
timm (which pulls in torchvision and torch._dynamo), MLflow's SQL store, scikit-learn and
pandas before doing a second of its own work: about a third of the demo's wall time.

`mammodp preload -- dvc repro` (what `make repro` runs) starts a server that imports those
libraries once and listens on a private Unix socket, named to the command in
`$MAMMODP_PRELOAD_SOCKET`. The `mammodp` console script, before importing anything heavy,
offers its command line to that server. The server forks; the fork forks the worker, which
takes over the client's stdin/stdout/stderr (passed as file descriptors), working directory,
environment, `sys.argv` and `sys.path`, and runs the same CLI a fresh process would run. The
client relays signals (Ctrl-C, SIGTERM, SIGHUP) to the worker and exits with its status,
or dies of the same signal. DVC sees an ordinary process.

What keeps a worker equal to a fresh process:
- Only third-party libraries are preloaded (`PRELOAD_MODULES`). mammodp's own modules are
  imported by each worker from the client's `sys.path`, so a source file edited between two
  stages (DVC hashes them as dependencies) is never run stale. The one exception, the
  artifact-store plugin MLflow loads through its entry point while importing, is watched: if
  its file changes, the server declines from then on.
- The environment must equal the server's as it was before preloading, but for a few
  per-command variables (`PER_COMMAND_ENV`: PWD, SHLVL, DVC_*, make's): libraries read many
  variables when they load (thread pools, allocators, CUDA, TMPDIR, MPLBACKEND, colours...).
  So must the interpreter, `sys.prefix`, the mammodp package's folder and the user. A
  worker takes the client's umask, CPU affinity, niceness, resource limits, ignored signals
  (`nohup`) and signal mask; a client asking for more than the server has (a higher hard
  limit, a lower niceness) is declined. A declined command, or one that finds no server, runs
  in the client itself. Nothing runs twice: the worker is forked first but starts only once
  the client has acknowledged its pid with its signal relays in place; a client that goes
  away before that leaves nothing running.
- The server never runs a torch operation, refuses to serve if importing started a Python
  thread or initialised CUDA. (Native thread pools that exist after the imports, OpenBLAS'
  and jemalloc's, handle fork themselves.)
- The root logger and warnings' display are as they were before preloading (Opacus
  configures the root logger on import, a library routes warnings into logging). Warning
  filters that libraries add on import stay: they name those libraries' own categories.
- numpy's global generator is reseeded from the OS in each worker (Python's `random`
  reseeds itself after a fork); torch's default generator is untouched (a fresh process
  starts from the same fixed seed). Not reproduced: string hashing keeps the server's seed
  in every worker (set PYTHONHASHSEED to make that moot); nothing in mammodp depends on it.
- Standard streams are rebuilt over the passed descriptors as CPython builds them (names,
  error handlers, newline handling, line buffering on a terminal, unbuffered with
  PYTHONUNBUFFERED), and at the end the worker joins its threads and runs `atexit` handlers
  as an interpreter exit does, then exits with the command's status (120 if its output could
  not be flushed).
- The worker leads a process group of its own; the client relays SIGINT, SIGTERM, SIGHUP,
  SIGQUIT, SIGUSR1/2, SIGWINCH and SIGCONT to the whole group (the worker's own children get
  them as from a terminal) and turns Ctrl-Z into SIGSTOP of the group. The worker has no
  controlling terminal (`/dev/tty`): mammodp never reads one.
- If the client is killed, the worker's group is sent SIGTERM (its run unwinds: temporary
  outputs removed, MLflow run marked KILLED), then SIGKILL after `KILL_AFTER_S`.
- Only a process of the same user may connect (SO_PEERCRED, checked on both ends), the socket
  lives in a 0700 folder of its own, one malformed or stalled request cannot stop the server
  for long, and the server ends with the wrapper, however the wrapper ends (PR_SET_PDEATHSIG).

Linux only (fork, SCM_RIGHTS, SO_PEERCRED); elsewhere `mammodp preload -- CMD` just runs CMD.
`MAMMODP_PRELOAD=0` turns delegation off. This module imports only the standard library at
module level: the client side costs milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "MAMMODP_PRELOAD_SOCKET"
DISABLE_ENV = "MAMMODP_PRELOAD"  # "0": never delegate
DEBUG_ENV = "MAMMODP_PRELOAD_DEBUG"  # set: say on stderr why a command was not served
DEFAULT_ENTRY = "mammodp.cli:main"
PROTOCOL = 2
KILL_AFTER_S = 30.0  # after the client vanished: SIGTERM to the worker's group, then SIGKILL
HANDSHAKE_TIMEOUT_S = 60.0  # a request, a pid or an acknowledgement slower than this: not served

# Third-party only (see the module docstring). A module missing from an install is skipped.
PRELOAD_MODULES = (
    "numpy", "pandas", "yaml", "typer", "tqdm", "PIL.Image", "scipy.ndimage", "scipy.stats",
    "torch", "torch.nn.functional", "torch.func", "timm", "timm.models.swin_transformer",
    "sklearn.linear_model", "sklearn.metrics", "sklearn.preprocessing",
    "mlflow", "mlflow.pyfunc", "mlflow.models", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store", "pyarrow", "pyarrow.parquet",
    "opacus", "optuna", "radiomics", "SimpleITK", "pydicom",
    "matplotlib", "matplotlib.figure", "sklearn.ensemble",
)

# The whole environment must equal the server's (as it was before preloading): libraries read
# all sorts of variables when they load (thread pools, allocators, CUDA, TMPDIR, MPLBACKEND,
# SKLEARN_*, XDG_*, colours, ...). Only these may differ per command.
PER_COMMAND_ENV = ("PWD", "OLDPWD", "SHLVL", "_", "DVC_", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKE_TERMOUT",
                   "MAKE_TERMERR", SOCKET_ENV, DEBUG_ENV)

# Signals the client relays to the worker's process group (as a terminal would send them).
RELAYED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGCONT")
# Resource limits a worker takes over from its client (the server declines higher hard limits).
RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CPU", "RLIMIT_FSIZE",
           "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_MEMLOCK", "RLIMIT_RSS")

_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 64 << 20


# ----------------------------------------------------------------------------- messages

def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    data = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, head: bytes = b"") -> bytes | None:
    buf = bytearray(head)
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket, with_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One JSON object (None at end of stream) and the descriptors that came with it.

    Raises OSError / ValueError; the descriptors received are closed when it raises.
    """
    fds: list[int] = []
    try:
        head = b""
        if with_fds:
            head, fds, _flags, _addr = socket.recv_fds(sock, 4096, with_fds)
            if not head:
                return None, fds
        header = _recv_exact(sock, _HEADER.size, head[:_HEADER.size])
        if header is None:
            return None, fds
        (size,) = _HEADER.unpack(header)
        if size > _MAX_MESSAGE:
            raise ValueError(f"message of {size} bytes refused")
        body = _recv_exact(sock, size, head[_HEADER.size:])
        if body is None:
            return None, fds
        message = json.loads(body)
        if not isinstance(message, dict):
            raise ValueError("a message must be a JSON object")
        return message, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _per_command(key: str) -> bool:
    return key.startswith(PER_COMMAND_ENV)


def _comparable_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not _per_command(k)}


def _package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _identity() -> dict:
    """What must be equal between client and server for a worker to equal a fresh process."""
    return {"protocol": PROTOCOL, "executable": os.path.realpath(sys.executable), "prefix": sys.prefix,
            "package": _package_dir(), "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())}


def _process_state() -> dict:
    """The process attributes a fresh process inherits from its parent (applied in the worker)."""
    import resource

    mask = os.umask(0)
    os.umask(mask)
    ignored = [name for name in RELAYED + ("SIGPIPE", "SIGTSTP", "SIGTTIN", "SIGTTOU")
               if signal.getsignal(getattr(signal, name)) is signal.SIG_IGN]
    return {"umask": mask, "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "affinity": sorted(os.sched_getaffinity(0)), "ignored": ignored,
            "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            "rlimits": {name: list(resource.getrlimit(getattr(resource, name)))
                        for name in RLIMITS if hasattr(resource, name)}}


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "fork")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# ----------------------------------------------------------------------------- client

def _std_fds_open() -> bool:
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            return False
    return True


def _not_served(sock: socket.socket | None, why: str) -> None:
    if sock is not None:
        sock.close()
    if os.environ.get(DEBUG_ENV):
        print(f"mammodp preload: not served: {why}", file=sys.stderr)


def _die_like(sig: int) -> int:
    """Die of `sig` as the worker did (shells and DVC see the same status); 128 + sig if we cannot."""
    try:
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    except (OSError, ValueError):
        pass
    return 128 + sig  # reached only for signals that do not end a process


def delegate(argv: list[str]) -> int | None:
    """Run `argv` in a preloaded worker; its exit status, or None to run it here instead.

    None means nothing ran: no server, a refusal (another environment or process state), or a
    handshake that failed. The worker starts only once this client has acknowledged its pid
    with its signal relays in place; a client that goes away before that leaves nothing
    running. Once the worker started, its status is returned (or the client dies of the
    signal that killed the worker).
    """
    path = os.environ.get(SOCKET_ENV)
    if not path or os.environ.get(DISABLE_ENV) == "0" or not supported():
        return None
    if not _std_fds_open():  # a closed 0-2 would be taken by the socket itself
        _not_served(None, "a standard stream is closed")
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        sock.connect(path)
        if _peer_uid(sock) != os.getuid():
            _not_served(sock, "the server belongs to another user")
            return None
        request = {**_identity(), "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ),
                   "sys_path": list(sys.path), "process": _process_state()}
        _send(sock, request, fds=[0, 1, 2])
        first, _ = _recv(sock)
    except (OSError, ValueError) as exc:
        _not_served(sock, f"{type(exc).__name__}: {exc}")
        return None
    if first is None or "pid" not in first:
        _not_served(sock, (first or {}).get("decline", "the server closed the connection"))
        return None
    worker = int(first["pid"])

    def relay(signum, _frame):
        try:
            os.killpg(worker, signum)  # the worker leads its own group: its children get it too
        except (ProcessLookupError, PermissionError):
            pass

    def suspend(_signum, _frame):  # Ctrl-Z: stop the worker's group, then this client
        relay(signal.SIGSTOP, None)
        os.kill(os.getpid(), signal.SIGSTOP)  # `fg` sends SIGCONT, relayed below

    for name in RELAYED:
        sig = getattr(signal, name)
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup`: stays ignored, here and there
            signal.signal(sig, relay)
    if signal.getsignal(signal.SIGTSTP) is not signal.SIG_IGN:
        signal.signal(signal.SIGTSTP, suspend)
    try:
        _send(sock, {"ack": True})
        sock.settimeout(None)
        status, _ = _recv(sock)
    except (OSError, ValueError):
        status = None
    sock.close()
    if status is None:
        print("mammodp: the preloaded worker ended without reporting a status", file=sys.stderr)
        return 1
    if status.get("signal"):
        return _die_like(int(status["signal"]))
    return int(status["exit"])


def console_main() -> None:
    """The `mammodp` console script: a preloaded worker when one is on offer, else the CLI here."""
    code = delegate(sys.argv)
    if code is not None:
        sys.exit(code)
    from mammodp.cli import main

    main()


# ----------------------------------------------------------------------------- server

def _stamp(path: str) -> tuple[int, int]:
    """(mtime_ns, size) of a file; (0, -1) when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, -1)
    return (st.st_mtime_ns, st.st_size)


def _own_module_files() -> dict[str, tuple[int, int]]:
    """`_stamp` of the files of mammodp modules the server has loaded besides this one
    (MLflow loads `mammodp.mlflow_plugin` through its entry point while it imports)."""
    return {mod.__file__: _stamp(mod.__file__) for name, mod in list(sys.modules.items())
            if name.startswith("mammodp.") and name != __name__ and getattr(mod, "__file__", None)}


def _decline_reason(request: dict, identity: dict, env: dict[str, str], state: dict,
                    own_files: dict[str, tuple[int, int]]) -> str | None:
    for key, value in identity.items():
        if request.get(key) != value:
            return f"{key} differs (server {value!r}, client {request.get(key)!r})"
    theirs = _comparable_env(request.get("env") or {})
    if theirs != env:
        keys = sorted(k for k in set(theirs) | set(env) if theirs.get(k) != env.get(k))
        return "environment differs: " + ", ".join(keys)
    proc = request.get("process") or {}
    if proc.get("nice", state["nice"]) < state["nice"]:
        return f"the command runs at a higher priority (nice {proc['nice']}) than the server ({state['nice']})"
    for name, (soft, hard) in (proc.get("rlimits") or {}).items():
        server_hard = state["rlimits"].get(name, [soft, hard])[1]
        if server_hard != -1 and (hard == -1 or hard > server_hard):
            return f"{name} hard limit {hard} above the server's {server_hard}"
    for path, stamp in own_files.items():
        if _stamp(path) != stamp:
            return f"{path} changed since the server loaded it"
    return None


def _log(log, text: str) -> None:
    if log is not None:
        log.write(text + "\n")
        log.flush()


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent (the wrapper) dies, however it dies."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(path: str, entry: str = DEFAULT_ENTRY, modules: tuple[str, ...] = PRELOAD_MODULES,
          log_path: str | None = None, parent: int | None = None) -> None:
    """Preload `modules`, then serve `entry` (`module:function`) on the Unix socket `path`.

    With `parent`, the server ends when that process does (the `mammodp preload` wrapper).
    """
    import importlib
    import logging
    import threading
    import warnings

    if parent is not None:
        _die_with_parent()
        if os.getppid() != parent:
            return
    log = open(log_path, "a", buffering=1) if log_path else None
    before = dict(os.environ)
    env = _comparable_env(before)  # the client's must equal this, as it was before importing
    # Opacus configures the root logger when imported; in a fresh process the CLI has done so
    # first and Opacus' call is a no-op. Each worker gets the root logger as it was before.
    root_state = (list(logging.root.handlers), logging.root.level)
    showwarning = warnings.showwarning  # a library's logging.captureWarnings(True) is undone too
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            _log(log, f"skip {name}: not installed")
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        raise RuntimeError(f"preloading started threads ({names}); forking would be unsafe")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("preloading initialised CUDA; a forked worker could not use it")
    identity = _identity()
    state = _process_state()
    own_files = _own_module_files()
    # Variables the imports set (torch sets KMP_*, TORCHINDUCTOR_CACHE_DIR): a fresh process's
    # imports would set them too, so each worker gets those its client does not set itself.
    set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
    server_pid = os.getpid()
    # Supervisors are reaped by the kernel; each restores SIGCHLD's default for its own use.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)

    def stop(_signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    _log(log, f"ready pid={server_pid}")
    try:
        while True:
            conn, _ = sock.accept()
            fds: list[int] = []
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)  # a stalled client cannot hold the others up for long
                if _peer_uid(conn) != os.getuid():
                    raise PermissionError("a process of another user")
                request, fds = _recv(conn, with_fds=3)
                if request is None or len(fds) != 3:
                    raise ValueError("incomplete request")
                argv = [str(a) for a in request.get("argv") or []][1:]
                reason = _decline_reason(request, identity, env, state, own_files)
                if reason:
                    _log(log, f"declined {argv}: {reason}")
                    _send(conn, {"decline": reason})
                    continue
                request["env"] = {**set_by_imports, **request["env"]}
                sys.stdout.flush()
                sys.stderr.flush()
                if os.fork() == 0:
                    sock.close()
                    logging.root.handlers[:] = root_state[0]
                    logging.root.setLevel(root_state[1])
                    if warnings.showwarning is not showwarning:
                        logging.captureWarnings(False)
                    _supervise(conn, fds, request, entry, log)  # never returns
                _log(log, f"served {argv}")
            except Exception as exc:  # one bad connection never ends the server
                _log(log, f"dropped a connection: {type(exc).__name__}: {exc}")
            finally:
                for fd in fds:
                    os.close(fd)
                conn.close()
    finally:
        if os.getpid() == server_pid:
            sock.close()
            try:
                os.unlink(path)
            except OSError:
                pass


def _supervise(conn: socket.socket, fds: list[int], request: dict, entry: str, log) -> None:
    """In the server's fork: fork the worker, start it once the client has acknowledged its
    pid (relays in place), relay its exit status; kill its group if the client vanishes."""
    import select
    import time

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 1
    worker = 0
    try:
        go_r, go_w = os.pipe()
        worker = os.fork()
        if worker == 0:
            os.close(go_w)
            conn.close()
            if log is not None:
                log.close()
            started = os.read(go_r, 1) == b"g"
            os.close(go_r)
            if not started:  # the client went away before the start: nothing runs
                os._exit(0)
            _run_worker(fds, request, entry)  # never returns
        os.close(go_r)
        for fd in fds:
            os.close(fd)
        fds.clear()
        _send(conn, {"pid": worker})
        ack, _ = _recv(conn)
        if not (ack and ack.get("ack")):
            raise ConnectionError("the client did not acknowledge")
        conn.settimeout(None)
        os.write(go_w, b"g")
        os.close(go_w)
        status, term_at = None, None
        while status is None:
            if term_at is None:
                readable, _, _ = select.select([conn], [], [], 0.05)
                try:
                    gone = bool(readable) and not conn.recv(1)
                except OSError:
                    gone = True
                if gone:  # the client was killed: unwind the worker as its own SIGTERM would
                    _signal_group(worker, signal.SIGTERM)
                    term_at = time.monotonic()
            else:
                time.sleep(0.05)
                if time.monotonic() - term_at > KILL_AFTER_S:
                    _signal_group(worker, signal.SIGKILL)
            pid, st = os.waitpid(worker, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(st)
        try:
            _send(conn, {"exit": status} if status >= 0 else {"exit": 128 - status, "signal": -status})
        except OSError:
            pass
        code = 0
    except BaseException:
        if worker:  # never started (the pipe closes with us) or orphaned: it must not run on
            _signal_group(worker, signal.SIGKILL)
    finally:
        os._exit(code)


def _signal_group(pid: int, sig: int) -> None:
    for send in (os.killpg, os.kill):
        try:
            send(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            continue


def _rebuild_std_streams() -> None:
    """New sys.stdin/stdout/stderr over descriptors 0-2, as CPython builds them at start-up
    (encoding and error handlers as the server's, which share its environment)."""
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))  # -u is not offered to the client
    template = {0: sys.__stdin__, 1: sys.__stdout__, 2: sys.__stderr__}

    def text(fd: int, name: str):
        mode = "r" if fd == 0 else "w"
        raw = io.FileIO(fd, mode, closefd=False)
        raw.name = name
        if fd != 0 and unbuffered:
            binary = raw
        else:
            binary = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        t = template[fd]
        return io.TextIOWrapper(binary, encoding=getattr(t, "encoding", None) or "utf-8",
                                errors=getattr(t, "errors", None) or ("backslashreplace" if fd == 2 else "strict"),
                                newline="\n", line_buffering=not unbuffered and (fd == 2 or os.isatty(fd)),
                                write_through=unbuffered)

    streams = [text(0, "<stdin>"), text(1, "<stdout>"), text(2, "<stderr>")]
    sys.stdin = sys.__stdin__ = streams[0]
    sys.stdout = sys.__stdout__ = streams[1]
    sys.stderr = sys.__stderr__ = streams[2]


def _apply_process_state(state: dict) -> None:
    import resource

    os.umask(int(state.get("umask", 0o022)))
    try:
        os.sched_setaffinity(0, state["affinity"])
    except (KeyError, OSError):
        pass
    delta = int(state.get("nice", 0)) - os.getpriority(os.PRIO_PROCESS, 0)
    if delta > 0:
        os.nice(delta)
    for name, (soft, hard) in (state.get("rlimits") or {}).items():
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError):
            pass
    for name in state.get("ignored", []):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [signal.Signals(s) for s in state.get("blocked", [])])


def _run_worker(fds: list[int], request: dict, entry: str) -> None:
    """In the worker: become the client's process, run `entry`, exit like an interpreter."""
    import atexit
    import importlib
    import tempfile
    import threading
    import traceback

    code, interrupted = 1, False
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.setpgid(0, 0)  # its own process group, the client relays signals to all of it
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # recomputed from this environment, as in a new process
        _apply_process_state(request.get("process") or {})
        sys.argv = list(request["argv"])
        sys.path[:] = list(request["sys_path"])
        _rebuild_std_streams()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # fresh OS entropy, as in a new process
        module, _, func = entry.partition(":")
        try:
            getattr(importlib.import_module(module), func)()
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code & 0xFF
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            interrupted = True
        except BaseException:
            traceback.print_exc()
            code = 1
        # As the interpreter does at exit: join non-daemon threads, then atexit handlers.
        try:
            threading._shutdown()
        except Exception:
            pass
        atexit._run_exitfuncs()
    except BaseException:  # the worker's own set-up failed: say so where the client's stderr is
        os.write(2, ("mammodp preload worker failed:\n" + traceback.format_exc()).encode(errors="replace"))
        code = 1
    finally:
        try:
            sys.stdout.flush()
        except Exception:
            code = code or 120  # as CPython: output that could not be written is a failure
        try:
            sys.stderr.flush()
        except Exception:
            pass
        if interrupted:  # like Python: die of SIGINT after an uncaught Ctrl-C
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


# ----------------------------------------------------------------------------- wrapper

def run_with_server(command: list[str], log_path: str | None = None) -> int:
    """Run `command` (e.g. `dvc repro`) with a preload server beside it; its exit status.

    The command starts at once: stages that begin before the server has finished importing
    (a few seconds) simply run in processes of their own.
    """
    import shutil
    import subprocess
    import tempfile

    if not command:
        raise ValueError("no command given")
    if not supported() or os.environ.get(DISABLE_ENV) == "0":
        return subprocess.call(command)
    folder = tempfile.mkdtemp(prefix="mammodp-preload-")  # mode 0700
    if len(folder) > 90:  # a Unix socket's path has at most 107 bytes: a long TMPDIR would not do
        os.rmdir(folder)
        folder = tempfile.mkdtemp(prefix="mammodp-preload-", dir="/tmp")
    path = os.path.join(folder, "socket")
    server_cmd = [sys.executable, "-m", "mammodp.preload", "--socket", path, "--parent", str(os.getpid())]
    if log_path:
        server_cmd += ["--log", os.path.abspath(log_path)]
    server = subprocess.Popen(server_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              start_new_session=True, cwd=folder)
    env = {**os.environ, SOCKET_ENV: path}
    try:
        child = subprocess.Popen(command, env=env)
        forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
        # Ctrl-C reaches the command from the terminal itself (one process group): wait for it.
        previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                    signal.SIGHUP: signal.signal(signal.SIGHUP, forward)}
        try:
            rc = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)
    return rc if rc >= 0 else 128 - rc


def _server_main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mammodp.preload", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--entry", default=DEFAULT_ENTRY)
    parser.add_argument("--log")
    parser.add_argument("--parent", type=int, help="end when this process (the wrapper) ends")
    parser.add_argument("--modules", help="comma-separated modules to preload (default: the libraries mammodp uses)")
    args = parser.parse_args()
    modules = tuple(m for m in args.modules.split(",") if m) if args.modules is not None else PRELOAD_MODULES
    serve(args.socket, entry=args.entry, modules=modules, log_path=args.log, parent=args.parent)


if __name__ == "__main__":
    _server_main()
