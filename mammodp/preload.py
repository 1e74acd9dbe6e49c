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
  stages (DVC hashes them as dependencies) is never run stale.
- Environment read at import time (thread pools, allocator, CUDA, locale, Python's own
  `PYTHON*`, hub and MLflow settings: `IMPORT_TIME_ENV_PREFIXES`) must equal the server's;
  so must the interpreter, `sys.prefix` and the mammodp package's folder. Otherwise the
  server declines, and the client runs the command itself, as it also does when no server
  answers. Nothing runs twice: a request is either declined before anything ran, or run.
- The server never runs a torch operation and refuses to serve if importing started a thread
  (forking a threaded process is unsafe). CUDA is never initialised before the fork.
- The root logger and warnings' display are as they were before preloading (Opacus
  configures the root logger on import, a library routes warnings into logging). Warning
  filters that libraries add on import stay: they name those libraries' own categories.
- numpy's global generator is reseeded from the OS in each worker (Python's `random`
  reseeds itself after a fork); torch's default generator is untouched (a fresh process
  starts from the same fixed seed).
- Standard streams are rebuilt over the passed descriptors (line-buffered on a terminal),
  and at the end the worker joins its threads and runs `atexit` handlers as an interpreter
  exit does, then exits with the command's status.
- If the client is killed, the worker is sent SIGTERM (its run unwinds: temporary outputs
  removed, MLflow run marked KILLED), then SIGKILL after `KILL_AFTER_S`.
- Only a process of the same user may connect (SO_PEERCRED), the socket lives in a
  0700 folder of its own, and the server ends with the command it was started for.

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
DEFAULT_ENTRY = "mammodp.cli:main"
PROTOCOL = 1
KILL_AFTER_S = 30.0  # after the client vanished: SIGTERM, then SIGKILL this much later

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

# Read by the interpreter or the preloaded libraries when they load: must match the server's.
IMPORT_TIME_ENV_PREFIXES = (
    "PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "BLIS_", "CUDA_", "CUBLAS_", "CUDNN_",
    "NVIDIA_", "PYTORCH_", "TORCH", "NCCL_", "LD_", "MALLOC_", "GLIBC_", "LC_", "LANG", "HF_",
    "HUGGINGFACE_", "TIMM_", "MLFLOW_", "SQLALCHEMY_", "TZ",
)

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
    """One message (None at end of stream) and the descriptors that came with it."""
    fds: list[int] = []
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
    return json.loads(body), fds


def _import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV_PREFIXES)}


def _package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _identity() -> dict:
    """What must be equal between client and server for a worker to equal a fresh process."""
    return {"protocol": PROTOCOL, "executable": os.path.realpath(sys.executable), "prefix": sys.prefix,
            "package": _package_dir()}


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "fork")


# ----------------------------------------------------------------------------- client

def delegate(argv: list[str]) -> int | None:
    """Run `argv` in a preloaded worker; its exit status, or None to run it here instead.

    None means nothing ran: no server, a refusal (other environment), or a server that went
    away before forking. Once the worker started, its status is returned (or the client dies
    of the signal that killed the worker).
    """
    path = os.environ.get(SOCKET_ENV)
    if not path or os.environ.get(DISABLE_ENV) == "0" or not supported():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = {**_identity(), "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ),
                   "sys_path": list(sys.path)}
        _send(sock, request, fds=[0, 1, 2])
        first, _ = _recv(sock)
    except (OSError, ValueError):
        sock.close()
        return None
    if first is None or "pid" not in first:
        if first and first.get("decline") and os.environ.get("MAMMODP_PRELOAD_DEBUG"):
            print(f"mammodp preload: declined: {first['decline']}", file=sys.stderr)
        sock.close()
        return None
    worker = int(first["pid"])

    def relay(signum, _frame):
        try:
            os.kill(worker, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, relay)
    try:
        status, _ = _recv(sock)
    except (OSError, ValueError):
        status = None
    sock.close()
    if status is None:
        print("mammodp: the preloaded worker ended without reporting a status", file=sys.stderr)
        return 1
    if status.get("signal"):
        sig = int(status["signal"])
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig  # not reached for deadly signals
    return int(status["exit"])


def console_main() -> None:
    """The `mammodp` console script: a preloaded worker when one is on offer, else the CLI here."""
    code = delegate(sys.argv)
    if code is not None:
        sys.exit(code)
    from mammodp.cli import main

    main()


# ----------------------------------------------------------------------------- server

def _decline_reason(request: dict, identity: dict, env: dict[str, str]) -> str | None:
    for key, value in identity.items():
        if request.get(key) != value:
            return f"{key} differs (server {value!r}, client {request.get(key)!r})"
    theirs = _import_time_env(request.get("env", {}))
    if theirs != env:
        keys = sorted(k for k in set(theirs) | set(env) if theirs.get(k) != env.get(k))
        return "import-time environment differs: " + ", ".join(keys)
    return None


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _log(log, text: str) -> None:
    if log is not None:
        log.write(text + "\n")
        log.flush()


def serve(path: str, entry: str = DEFAULT_ENTRY, modules: tuple[str, ...] = PRELOAD_MODULES,
          log_path: str | None = None) -> None:
    """Preload `modules`, then serve `entry` (`module:function`) on the Unix socket `path`."""
    import importlib
    import logging
    import threading

    log = open(log_path, "a", buffering=1) if log_path else None
    before = dict(os.environ)
    # Opacus configures the root logger when imported; in a fresh process the CLI has done so
    # first and Opacus' call is a no-op. Each worker gets the root logger as it was before.
    root_state = (list(logging.root.handlers), logging.root.level)
    import warnings

    showwarning = warnings.showwarning  # a library's logging.captureWarnings(True) is undone too
    env = _import_time_env(before)  # the client's must equal this, as it was before importing
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            _log(log, f"skip {name}: not installed")
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        raise RuntimeError(f"preloading started threads ({names}); forking would be unsafe")
    identity = _identity()
    # Variables the imports set (torch sets KMP_*, TORCHINDUCTOR_CACHE_DIR): a fresh process's
    # imports would set them too, so each worker gets them on top of the client's environment.
    set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
    server_pid = os.getpid()
    # Supervisors are reaped by the kernel; each restores SIGCHLD's default for its own use.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
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
                if _peer_uid(conn) != os.getuid():
                    raise PermissionError("another user")
                request, fds = _recv(conn, with_fds=3)
                if request is None or len(fds) != 3:
                    raise ValueError("incomplete request")
                reason = _decline_reason(request, identity, env)
                if reason:
                    _log(log, f"declined {request['argv'][1:]}: {reason}")
                    _send(conn, {"decline": reason})
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                if os.fork() == 0:
                    sock.close()
                    request["env"] = {**request["env"], **set_by_imports}
                    logging.root.handlers[:], _ = root_state
                    logging.root.setLevel(root_state[1])
                    if warnings.showwarning is not showwarning:
                        logging.captureWarnings(False)
                    _supervise(conn, fds, request, entry, log)  # never returns
                _log(log, f"served {request['argv'][1:]}")
            except (OSError, ValueError) as exc:
                _log(log, f"dropped a connection: {exc}")
            finally:
                for fd in fds:
                    os.close(fd)
                conn.close()
    finally:
        if os.getpid() == server_pid:
            sock.close()


def _supervise(conn: socket.socket, fds: list[int], request: dict, entry: str, log) -> None:
    """In the server's fork: fork the worker, relay its pid and exit status to the client."""
    import select
    import time

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 1
    try:
        worker = os.fork()
        if worker == 0:
            conn.close()
            if log is not None:
                log.close()
            _run_worker(fds, request, entry)  # never returns
        for fd in fds:
            os.close(fd)
        fds.clear()
        _send(conn, {"pid": worker})
        status, term_at = None, None
        while status is None:
            if term_at is None:
                readable, _, _ = select.select([conn], [], [], 0.05)
                try:
                    gone = bool(readable) and not conn.recv(1)
                except OSError:
                    gone = True
                if gone:  # the client was killed: unwind the worker as its own SIGTERM would
                    os.kill(worker, signal.SIGTERM)
                    term_at = time.monotonic()
            else:
                time.sleep(0.05)
                if time.monotonic() - term_at > KILL_AFTER_S:
                    os.kill(worker, signal.SIGKILL)
            pid, st = os.waitpid(worker, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(st)
        try:
            _send(conn, {"exit": status} if status >= 0 else {"exit": 128 - status, "signal": -status})
        except OSError:
            pass
        code = 0
    finally:
        os._exit(code)


def _rebuild_std_streams() -> None:
    """New sys.stdin/stdout/stderr over descriptors 0-2, buffered as a fresh interpreter would."""
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))  # -u is not offered to the client

    def text(fd: int, mode: str, line: bool, errors: str):
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=sys.__stdout__.encoding if sys.__stdout__ else "utf-8",
                                errors=errors, line_buffering=line, write_through=unbuffered)

    stdin = text(0, "r", False, "strict")
    stdout = text(1, "w", os.isatty(1), "strict")
    stderr = text(2, "w", True, "backslashreplace")  # stderr is line-buffered (Python >= 3.9)
    sys.stdin = sys.__stdin__ = stdin
    sys.stdout = sys.__stdout__ = stdout
    sys.stderr = sys.__stderr__ = stderr


def _run_worker(fds: list[int], request: dict, entry: str) -> None:
    """In the worker: become the client's process, run `entry`, exit like an interpreter."""
    import atexit
    import importlib
    import threading
    import traceback

    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.setpgid(0, 0)  # its own process group: a stage may signal its group
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
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
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = -signal.SIGINT
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
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code == -signal.SIGINT:  # like Python: die of SIGINT after an uncaught Ctrl-C
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF if code >= 0 else 1)


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
    path = os.path.join(folder, "socket")
    server_cmd = [sys.executable, "-m", "mammodp.preload", "--socket", path]
    if log_path:
        server_cmd += ["--log", log_path]
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
    parser.add_argument("--modules", help="comma-separated modules to preload (default: the libraries mammodp uses)")
    args = parser.parse_args()
    modules = tuple(m for m in args.modules.split(",") if m) if args.modules is not None else PRELOAD_MODULES
    serve(args.socket, entry=args.entry, modules=modules, log_path=args.log)


if __name__ == "__main__":
    _server_main()
