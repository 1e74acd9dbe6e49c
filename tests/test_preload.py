"""The preload server (`mammodp preload -- dvc repro`): a served command behaves as a fresh process.

Real server processes, real sockets, real signals. Most tests serve a small target module
(preloading numpy only, so each server is ready in well under a second); one runs the real
`mammodp` console script through the real `mammodp preload` wrapper.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mammodp import preload

pytestmark = [pytest.mark.skipif(not preload.supported(), reason="preloading needs Linux (fork, SCM_RIGHTS)"),
              pytest.mark.timeout(300)]  # a hang in a socket or signal path fails, never blocks CI

REPO = Path(__file__).resolve().parents[1]
MAMMODP = Path(sys.executable).with_name("mammodp")

TARGET = textwrap.dedent('''
    import json, logging, os, signal, sys, time

    def main():
        client = sys.argv.pop()  # the client's pid, appended by client.py
        served = client != str(os.getpid())
        mode = sys.argv[1]
        if mode == "echo":
            line = sys.stdin.readline()
            print(json.dumps({"served": served, "argv": sys.argv[1:], "cwd": os.getcwd(), "stdin": line,
                              "var": os.environ.get("SOME_VAR"), "path0": sys.path[0]}))
            print("to stderr", file=sys.stderr)
            sys.exit(3)
        if mode == "streams":
            out = {}
            for name in ("stdin", "stdout", "stderr"):
                st = getattr(sys, name)
                out[name] = [st.name, st.encoding, st.errors, st.line_buffering, st.write_through,
                             type(st.buffer).__name__, st is getattr(sys, "__" + name + "__")]
            mask = os.umask(0)
            import resource
            out["process"] = [mask, os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)),
                              resource.getrlimit(resource.RLIMIT_NOFILE),
                              repr(signal.getsignal(signal.SIGHUP)), repr(signal.getsignal(signal.SIGINT))]
            import tempfile
            out["tmp"] = tempfile.gettempdir()
            print(json.dumps({"served": served, **out}))
        if mode == "rand":
            import numpy as np
            print(json.dumps({"served": served, "rand": float(np.random.rand())}))
        if mode == "log":
            logging.basicConfig(level=logging.INFO, format="MINE %(message)s")
            logging.getLogger("x").info("hello")
            print(json.dumps({"served": served}))
        if mode == "exit":
            print(json.dumps({"served": served}), flush=True)
            code = sys.argv[2]
            sys.exit(int(code) if code.lstrip("-").isdigit() else code)
        if mode == "sleep":
            def on_term(signum, frame):
                open(sys.argv[2], "w").write("terminated")
                sys.exit(0)
            signal.signal(signal.SIGTERM, on_term) if len(sys.argv) > 2 else None
            try:
                print(json.dumps({"served": served, "pid": os.getpid()}), flush=True)
                time.sleep(60)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(130)
        if mode == "touch":
            open(sys.argv[2], "w").write("ran")
        if mode == "crash":
            print(json.dumps({"served": served}), flush=True)
            raise RuntimeError("boom")
''')

CLIENT = textwrap.dedent('''
    import os, sys
    sys.argv.append(str(os.getpid()))
    from mammodp.preload import delegate
    code = delegate(sys.argv)
    if code is None:  # not served: run here, as the console script would
        import target
        try:
            target.main()
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
    sys.exit(code)
''')

# A library that configures the root logger when imported (as Opacus does).
NOISY_LIB = "import logging\nlogging.basicConfig(format='LIB %(message)s')\n"


def _wait_for(predicate, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def served(tmp_path):
    """A server of `target:main` (numpy and a root-logger-configuring library preloaded)."""
    (tmp_path / "target.py").write_text(TARGET)
    (tmp_path / "client.py").write_text(CLIENT)
    (tmp_path / "noisy_lib.py").write_text(NOISY_LIB)
    sock, log = tmp_path / "socket", tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMODP_PRELOAD")}
    env["SOME_VAR"] = "v1"
    proc = subprocess.Popen([sys.executable, "-m", "mammodp.preload", "--socket", str(sock), "--log", str(log),
                             "--entry", "target:main", "--modules", "numpy,noisy_lib"],
                            cwd=tmp_path, env=env, start_new_session=True)
    _wait_for(lambda: log.exists() and "ready" in log.read_text(), what="the server")

    def client_env(extra=None):
        return {**env, preload.SOCKET_ENV: str(sock), **(extra or {})}

    def run(*args, extra_env=None, stdin="", cwd=None, **kw):
        return subprocess.run([sys.executable, str(tmp_path / "client.py"), *args], cwd=cwd or tmp_path,
                              env=client_env(extra_env), input=stdin, capture_output=True, text=True, timeout=60, **kw)

    def popen(*args, **kw):
        return subprocess.Popen([sys.executable, str(tmp_path / "client.py"), *args], cwd=tmp_path,
                                env=client_env(), stdout=subprocess.PIPE, text=True,
                                # a background job (nohup, CI) inherits SIGINT ignored, and so, rightly,
                                # would its worker: these tests need Ctrl-C to count
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)

    run.tmp, run.sock, run.log, run.env, run.popen, run.server = tmp_path, sock, log, env, popen, proc
    yield run
    proc.terminate()
    proc.wait(timeout=10)


def _first(proc) -> dict:
    line = proc.stdout.readline()
    assert line, "the client printed nothing"
    return json.loads(line)


def test_served_command_gets_streams_cwd_env_argv_and_exit_status(served):
    sub = served.tmp / "sub"
    sub.mkdir()
    r = served("echo", "--flag", stdin="line in\r\n", cwd=sub)
    assert r.returncode == 3, r.stderr
    out = json.loads(r.stdout)
    assert out == {"served": True, "argv": ["echo", "--flag"], "cwd": str(sub), "stdin": "line in\r\n",
                   "var": "v1", "path0": str(served.tmp)}  # the client's sys.path; no newline translation
    assert r.stderr.strip() == "to stderr"
    assert "served ['echo', '--flag'" in served.log.read_text()


def test_streams_and_process_state_are_a_fresh_processs(served):
    """Stream names, encodings, error handlers, buffering; umask, niceness, CPU set, limits,
    ignored signals (nohup): served and unserved alike."""
    script = ("import os, resource, signal, subprocess, sys; os.umask(0o077); os.nice(3); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
              "signal.signal(signal.SIGHUP, signal.SIG_IGN); "
              "sys.exit(subprocess.call([sys.executable, 'client.py', 'streams']))")
    outs = []
    for extra in ({}, {preload.DISABLE_ENV: "0"}):
        r = subprocess.run([sys.executable, "-c", script], cwd=served.tmp, capture_output=True, text=True,
                           timeout=60, env={**served.env, preload.SOCKET_ENV: str(served.sock), **extra})
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    assert outs[0].pop("served") is True and outs[1].pop("served") is False
    assert outs[0] == outs[1]
    assert outs[0]["process"][0] == 0o077 and "Handlers.SIG_IGN" in outs[0]["process"][4]


def test_another_environment_is_declined_and_runs_in_the_client(served):
    for extra in ({"OMP_NUM_THREADS": "7"}, {"TMPDIR": str(served.tmp)}, {"SOME_VAR": "v2"}):
        r = served("echo", stdin="x\n", extra_env=extra)
        assert r.returncode == 3
        assert json.loads(r.stdout)["served"] is False
        assert f"environment differs: {next(iter(extra))}" in served.log.read_text()
    # per-command variables may differ
    r = served("echo", stdin="x\n", extra_env={"PWD": "/elsewhere", "DVC_STAGE": "x"})
    assert json.loads(r.stdout)["served"] is True


def test_no_server_means_the_command_runs_in_the_client(served):
    r = served("echo", stdin="x\n", extra_env={preload.SOCKET_ENV: str(served.tmp / "absent")})
    assert r.returncode == 3 and json.loads(r.stdout)["served"] is False
    r = served("echo", stdin="x\n", extra_env={preload.DISABLE_ENV: "0"})
    assert r.returncode == 3 and json.loads(r.stdout)["served"] is False
    # a closed stdin: the socket would take descriptor 0; not served, still runs
    r = subprocess.run([sys.executable, str(served.tmp / "client.py"), "rand"], cwd=served.tmp,
                       env={**served.env, preload.SOCKET_ENV: str(served.sock)}, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.close(0))
    assert r.returncode == 0 and json.loads(r.stdout)["served"] is False


def test_each_worker_draws_fresh_numpy_randomness(served):
    draws = [json.loads(served("rand").stdout) for _ in range(3)]
    assert all(d["served"] for d in draws)
    assert len({d["rand"] for d in draws}) == 3  # numpy was preloaded: without a reseed all three are equal


def test_root_logger_is_as_before_preloading(served):
    r = served("log")
    assert r.returncode == 0 and json.loads(r.stdout)["served"] is True
    assert r.stderr.strip() == "MINE hello"  # noisy_lib's basicConfig at preload time is undone


@pytest.mark.parametrize("code, expect", [("0", 0), ("3", 3), ("-1", 255), ("-2", 254), ("message", 1)])
def test_exit_statuses_are_a_fresh_processs(served, code, expect):
    r = served("exit", code)
    assert json.loads(r.stdout.splitlines()[0])["served"] is True
    assert r.returncode == expect
    if code == "message":
        assert r.stderr.strip() == "message"


def test_an_exception_keeps_its_traceback_and_exit_status_1(served):
    r = served("crash")
    assert r.returncode == 1 and json.loads(r.stdout)["served"] is True
    assert "RuntimeError: boom" in r.stderr and "Traceback" in r.stderr


@pytest.mark.parametrize("sig, expect", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_signals_reach_the_worker_and_its_status_comes_back(served, sig, expect):
    proc = served.popen("sleep")
    first = _first(proc)
    assert first["served"] is True
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == expect  # SIGTERM: the client dies of it, as the worker did
    if sig == signal.SIGINT:
        assert proc.stdout.read().strip() == "interrupted"
    _wait_for(lambda: not _alive(first["pid"]), timeout=10, what="the worker to end")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_killed_by_sigkill_kills_its_client_the_same_way(served):
    proc = served.popen("sleep")
    first = _first(proc)
    assert first["served"] is True
    os.kill(first["pid"], signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # not a traceback and exit 1


def test_a_killed_client_gets_its_worker_terminated(served):
    flag = served.tmp / "flag"
    proc = served.popen("sleep", str(flag))
    assert _first(proc)["served"] is True
    proc.kill()
    proc.wait(timeout=10)
    _wait_for(lambda: flag.exists() and flag.read_text() == "terminated", timeout=10, what="the worker's SIGTERM")


def test_a_client_gone_before_the_start_leaves_nothing_running(served):
    """The request sent, then the client vanishes: the worker must never start."""
    import socket as socketlib

    flag = served.tmp / "ran"
    sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    sock.connect(str(served.sock))
    request = {**preload._identity(), "argv": ["client.py", "touch", str(flag), "0"], "cwd": str(served.tmp),
               "env": {**served.env, preload.SOCKET_ENV: str(served.sock)}, "sys_path": [str(served.tmp)] + sys.path,
               "process": preload._process_state()}
    preload._send(sock, request, fds=[0, 1, 2])
    first, _ = preload._recv(sock)
    assert "pid" in first
    sock.close()  # no acknowledgement
    _wait_for(lambda: not _alive(first["pid"]), timeout=10, what="the unstarted worker to go")
    assert not flag.exists()
    assert json.loads(served("rand").stdout)["served"] is True  # the server is still serving


def test_garbage_and_stalled_connections_do_not_stop_the_server(served):
    import socket as socketlib

    bad = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    bad.connect(str(served.sock))
    bad.sendall(b"\x00\x00\x00\x04nope")
    bad.close()
    arr = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    arr.connect(str(served.sock))
    preload._send(arr, ["not", "an", "object"], fds=[0, 1, 2])
    arr.close()
    r = served("rand")
    assert r.returncode == 0 and json.loads(r.stdout)["served"] is True
    assert served.log.read_text().count("dropped a connection") == 2


def test_a_changed_mammodp_module_of_the_server_is_never_served_stale(tmp_path):
    mod = tmp_path / "plugin.py"
    mod.write_text("x = 1\n")
    own = {str(mod): (mod.stat().st_mtime_ns, mod.stat().st_size)}
    identity, state = preload._identity(), preload._process_state()
    env = preload._comparable_env(dict(os.environ))
    request = {**identity, "env": dict(os.environ), "process": state}
    assert preload._decline_reason(request, identity, env, state, own) is None
    mod.write_text("x = 22\n")
    assert "changed since the server loaded it" in preload._decline_reason(request, identity, env, state, own)


def test_the_wrapper_serves_the_real_cli_and_returns_the_command_status(tmp_path):
    """`mammodp preload -- CMD`: the real console script, default preload list, real wrapper."""
    log = "server.log"  # relative: kept where the wrapper was started, not in its temp folder
    params = REPO / "params.yaml"
    script = (f"until grep -q ready {log} 2>/dev/null; do sleep 0.2; done; "
              f"{MAMMODP} lint-params {params}; echo rc=$?; "
              f"{MAMMODP} lint-params {tmp_path / 'absent.yaml'}; echo rc=$?; exit 5")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMODP_PRELOAD")}
    r = subprocess.run([str(MAMMODP), "preload", "--log", log, "--", "bash", "-c", script], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 5, r.stderr
    assert f"ok     {params}\nrc=0\n" in r.stdout
    assert "absent.yaml: params file not found\nrc=1\n" in r.stdout
    text = (tmp_path / log).read_text()
    assert "served ['lint-params'" in text and "declined" not in text
    plain = subprocess.run([str(MAMMODP), "lint-params", str(tmp_path / "absent.yaml")], env=env,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and plain.stdout in r.stdout  # the same report, served or not
    server_pid = int(text.split("ready pid=")[1].split()[0])
    _wait_for(lambda: not _alive(server_pid), timeout=10, what="the server to end with the command")


def test_the_server_ends_when_the_wrapper_is_killed(tmp_path):
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMODP_PRELOAD")}
    wrapper = subprocess.Popen([str(MAMMODP), "preload", "--log", str(log), "--", "sleep", "120"], env=env)
    _wait_for(lambda: log.exists() and "ready" in log.read_text(), timeout=120, what="the server")
    server_pid = int(log.read_text().split("ready pid=")[1].split()[0])
    wrapper.kill()
    wrapper.wait(timeout=10)
    _wait_for(lambda: not _alive(server_pid), timeout=20, what="the orphaned server to end")


def test_the_wrapper_without_a_command_is_a_usage_error():
    r = subprocess.run([str(MAMMODP), "preload"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no command given" in r.stderr
