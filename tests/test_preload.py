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

pytestmark = pytest.mark.skipif(not preload.supported(), reason="preloading needs Linux (fork, SCM_RIGHTS)")

REPO = Path(__file__).resolve().parents[1]
MAMMODP = Path(sys.executable).with_name("mammodp")

TARGET = textwrap.dedent('''
    import json, logging, os, signal, sys, time

    def main():
        mode = sys.argv[1]
        served = os.environ.get("CLIENT_PID") != str(os.getpid())
        if mode == "echo":
            line = sys.stdin.readline().strip()
            print(json.dumps({"served": served, "argv": sys.argv[1:], "cwd": os.getcwd(), "stdin": line,
                              "var": os.environ.get("SOME_VAR"), "path0": sys.path[0]}))
            print("to stderr", file=sys.stderr)
            sys.exit(3)
        if mode == "rand":
            import numpy as np
            print(json.dumps({"served": served, "rand": float(np.random.rand())}))
        if mode == "log":
            logging.basicConfig(level=logging.INFO, format="MINE %(message)s")
            logging.getLogger("x").info("hello")
        if mode == "sleep":
            def on_term(signum, frame):
                open(sys.argv[2], "w").write("terminated")
                sys.exit(0)
            signal.signal(signal.SIGTERM, on_term) if len(sys.argv) > 2 else None
            print(json.dumps({"served": served, "pid": os.getpid()}), flush=True)
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(130)
        if mode == "crash":
            raise RuntimeError("boom")
''')

CLIENT = textwrap.dedent('''
    import os, sys
    os.environ["CLIENT_PID"] = str(os.getpid())
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
    env = {k: v for k, v in os.environ.items() if k != preload.SOCKET_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "mammodp.preload", "--socket", str(sock), "--log", str(log),
                             "--entry", "target:main", "--modules", "numpy,noisy_lib"],
                            cwd=tmp_path, env=env, start_new_session=True)
    _wait_for(lambda: log.exists() and "ready" in log.read_text(), what="the server")

    def run(*args, extra_env=None, stdin="", **kw):
        cenv = {**env, preload.SOCKET_ENV: str(sock), **(extra_env or {})}
        return subprocess.run([sys.executable, str(tmp_path / "client.py"), *args], cwd=tmp_path, env=cenv,
                              input=stdin, capture_output=True, text=True, timeout=60, **kw)

    run.tmp, run.sock, run.log, run.env = tmp_path, sock, log, env
    yield run
    proc.terminate()
    proc.wait(timeout=10)


def test_served_command_gets_streams_cwd_env_argv_and_exit_status(served):
    sub = served.tmp / "sub"
    sub.mkdir()
    r = subprocess.run([sys.executable, str(served.tmp / "client.py"), "echo", "--flag"], cwd=sub, input="line in\n",
                       env={**served.env, preload.SOCKET_ENV: str(served.sock), "SOME_VAR": "v1"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    out = json.loads(r.stdout)
    assert out["served"] is True
    assert out == {"served": True, "argv": ["echo", "--flag"], "cwd": str(sub), "stdin": "line in", "var": "v1",
                   "path0": str(served.tmp)}  # the client's sys.path, not the server's
    assert r.stderr.strip() == "to stderr"
    assert "served ['echo', '--flag']" in served.log.read_text()


def test_other_import_time_environment_is_declined_and_runs_in_the_client(served):
    r = served("echo", stdin="x\n", extra_env={"OMP_NUM_THREADS": "7"})
    assert r.returncode == 3
    assert json.loads(r.stdout)["served"] is False
    assert "declined ['echo']: import-time environment differs: OMP_NUM_THREADS" in served.log.read_text()


def test_no_server_means_the_command_runs_in_the_client(served):
    r = served("echo", stdin="x\n", extra_env={preload.SOCKET_ENV: str(served.tmp / "absent")})
    assert r.returncode == 3 and json.loads(r.stdout)["served"] is False
    r = served("echo", stdin="x\n", extra_env={preload.DISABLE_ENV: "0"})
    assert r.returncode == 3 and json.loads(r.stdout)["served"] is False


def test_each_worker_draws_fresh_numpy_randomness(served):
    draws = [json.loads(served("rand").stdout) for _ in range(3)]
    assert all(d["served"] for d in draws)
    assert len({d["rand"] for d in draws}) == 3  # numpy was preloaded: without a reseed all three are equal


def test_root_logger_is_as_before_preloading(served):
    r = served("log")
    assert r.returncode == 0
    assert r.stderr.strip() == "MINE hello"  # noisy_lib's basicConfig at preload time is undone


def test_an_exception_keeps_its_traceback_and_exit_status_1(served):
    r = served("crash")
    assert r.returncode == 1
    assert "RuntimeError: boom" in r.stderr and "Traceback" in r.stderr


@pytest.mark.parametrize("sig, expect", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_signals_reach_the_worker_and_its_status_comes_back(served, sig, expect):
    cenv = {**served.env, preload.SOCKET_ENV: str(served.sock)}
    proc = subprocess.Popen([sys.executable, str(served.tmp / "client.py"), "sleep"], cwd=served.tmp, env=cenv,
                            stdout=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())
    assert first["served"] is True
    proc.send_signal(sig)
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == expect  # SIGTERM: the client dies of it, as the worker did
    if sig == signal.SIGINT:
        assert rest.strip() == "interrupted"
    with pytest.raises(ProcessLookupError):
        os.kill(first["pid"], 0)


def test_a_killed_client_gets_its_worker_terminated(served):
    flag = served.tmp / "flag"
    cenv = {**served.env, preload.SOCKET_ENV: str(served.sock)}
    proc = subprocess.Popen([sys.executable, str(served.tmp / "client.py"), "sleep", str(flag)], cwd=served.tmp,
                            env=cenv, stdout=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())
    assert first["served"] is True
    proc.kill()
    proc.wait(timeout=10)
    _wait_for(lambda: flag.exists() and flag.read_text() == "terminated", timeout=10, what="the worker's SIGTERM")


def test_the_wrapper_serves_the_real_cli_and_returns_the_command_status(tmp_path):
    """`mammodp preload -- CMD`: the real console script, default preload list, real wrapper."""
    log = tmp_path / "server.log"
    params = REPO / "params.yaml"
    script = (f"until grep -q ready {log} 2>/dev/null; do sleep 0.2; done; "
              f"{MAMMODP} lint-params {params}; echo rc=$?; "
              f"{MAMMODP} lint-params {tmp_path / 'absent.yaml'}; echo rc=$?; exit 5")
    env = {k: v for k, v in os.environ.items() if k != preload.SOCKET_ENV}
    r = subprocess.run([str(MAMMODP), "preload", "--log", str(log), "--", "bash", "-c", script], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 5, r.stderr
    assert f"ok     {params}\nrc=0\n" in r.stdout
    assert "absent.yaml: params file not found\nrc=1\n" in r.stdout
    text = log.read_text()
    assert "served ['lint-params'" in text and "declined" not in text
    plain = subprocess.run([str(MAMMODP), "lint-params", str(tmp_path / "absent.yaml")], env=env,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and plain.stdout in r.stdout  # the same report, served or not
    server_pid = int(text.split("ready pid=")[1].split()[0])
    with pytest.raises(ProcessLookupError):  # the server ended with the command
        os.kill(server_pid, 0)


def test_the_wrapper_without_a_command_is_a_usage_error():
    r = subprocess.run([str(MAMMODP), "preload"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no command given" in r.stderr
