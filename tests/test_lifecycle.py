"""Where the pool starts and how it ends, with real servers in real processes.

Each test starts a server the way users do (a script with ``app.run``, ``flask run`` with and without
the reloader, gunicorn with and without ``--preload``, the example app), asks it over HTTP which
process serves and which pool workers it has, and checks the process tree in /proc: exactly one pool,
owned by the process that serves requests, and nothing left alive once the server is stopped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import child_pids, shm_entries
from .servers import (
    ROOT,
    Server,
    all_children,
    free_port,
    is_pool_worker,
    kill_group,
    new_shm_entries,
    nice_of,
    pool_workers_below,
    ppid,
    running,
    server_env,
    wait_gone,
)

WORKERS = 2

# A user's app as a module at the top of a project (also run as a script): the pool is created at
# import time, the server under the main guard.
APP_SOURCE = f'''\
import os

from flask import Flask

from flask_torchpool import TorchPool

app = Flask(__name__)
app.config["TORCHPOOL_MODEL"] = "tests.models:echo"
app.config["TORCHPOOL_WORKERS"] = {WORKERS}
app.config["TORCHPOOL_DEVICES"] = "cpu"
app.config["TORCHPOOL_ARENA_BYTES"] = 8 << 20
pool = TorchPool(app)


@app.get("/pid")
@pool.infer
def pid(model):
    return {{"server": os.getpid(), "worker": model(action="pid")}}


@app.get("/status")
def status():
    return {{"server": os.getpid(), **pool.status()}}


if __name__ == "__main__":
    app.run(port=int(os.environ["PORT"]), debug=os.environ.get("APP_DEBUG") == "1")
'''


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A directory holding ``lifecycle_app.py``; checks that no /dev/shm entry outlives the test."""
    (tmp_path / "lifecycle_app.py").write_text(APP_SOURCE)
    before = shm_entries()
    yield tmp_path
    assert not new_shm_entries(before), f"/dev/shm entries leaked: {new_shm_entries(before)}"


def _check_one_pool(server: Server, serving_pid: int) -> set[int]:
    """Exactly one pool exists below the process we started: WORKERS ready workers, all children of
    *serving_pid*, which answers the requests. Returns the workers' pids."""
    status = server.get("/status").json()
    assert status["server"] == serving_pid, status
    assert [w["state"] for w in status["workers"]] == ["ready"] * WORKERS, status
    workers = {w["pid"] for w in status["workers"]}
    assert len(workers) == WORKERS, status
    # Spawned children re-import the app; had one started a pool of its own, its workers would be
    # grandchildren of the serving process, and any pool elsewhere would show up below the leader.
    assert {p for p in child_pids(serving_pid) if is_pool_worker(p)} == workers, server.log()
    assert pool_workers_below(server.pid) == workers, server.log()
    for _ in range(4):
        answer = server.get("/pid")
        assert answer.status_code == 200, answer.text
        assert answer.json()["server"] == serving_pid
        assert answer.json()["worker"] in workers
    return workers


def _serving_pid(server: Server) -> int:
    answer = server.wait_answers("/pid")
    assert answer.status_code == 200, f"{answer.status_code} {answer.text}\n{server.log()}"
    return answer.json()["server"]


@pytest.mark.timeout(180)
def test_script_with_app_run(project: Path) -> None:
    port = free_port()
    argv = [sys.executable, str(project / "lifecycle_app.py")]
    with running(argv, port, project / "server.log", server_env(PORT=str(port))) as server:
        serving = _serving_pid(server)
        assert serving == server.pid
        workers = _check_one_pool(server, serving)

        # SIGTERM to the server alone: the pool drains and stops its workers, then the server exits
        # (cleanly, or of SIGTERM as a process manager expects, either way said).
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() in (0, -signal.SIGTERM, 128 + signal.SIGTERM), server.log()
        assert not wait_gone(workers), f"workers outlived the server: {server.log()}"


@pytest.mark.timeout(180)
def test_script_with_app_run_debug_starts_one_pool_in_the_serving_child(project: Path) -> None:
    # app.run(debug=True) turns the reloader on: the script runs in a watcher process, which never
    # serves, and again in the serving child (WERKZEUG_RUN_MAIN=true).
    port = free_port()
    argv = [sys.executable, str(project / "lifecycle_app.py")]
    env = server_env(PORT=str(port), APP_DEBUG="1")
    with running(argv, port, project / "server.log", env) as server:
        serving = _serving_pid(server)
        assert serving != server.pid and ppid(serving) == server.pid
        assert child_pids(server.pid) == {serving}, (
            f"the reloader's watcher (pid {server.pid}) started a pool of its own: "
            f"{child_pids(server.pid) - {serving}}")
        workers = _check_one_pool(server, serving)

        kill_group(server.pid, signal.SIGTERM)
        server.wait_exit()
        assert not wait_gone(workers | {serving}), f"processes outlived the group: {server.log()}"


@pytest.mark.timeout(180)
def test_flask_run_with_reloader_starts_one_pool_in_the_serving_child(project: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "flask", "--app", "lifecycle_app", "run", "--debug", "--port", str(port)]
    with running(argv, port, project / "server.log", server_env(project)) as server:
        serving = _serving_pid(server)
        # The process we started is the reloader's watcher; it serves nothing and owns no pool.
        assert serving != server.pid
        assert ppid(serving) == server.pid
        assert child_pids(server.pid) == {serving}, server.log()
        workers = _check_one_pool(server, serving)

        kill_group(server.pid, signal.SIGTERM)
        server.wait_exit()
        assert not wait_gone(workers | {serving}), f"processes outlived the group: {server.log()}"


@pytest.mark.timeout(180)
def test_flask_run_without_reloader(project: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "flask", "--app", "lifecycle_app", "run", "--port", str(port)]
    with running(argv, port, project / "server.log", server_env(project)) as server:
        serving = _serving_pid(server)
        assert serving == server.pid
        workers = _check_one_pool(server, serving)

        server.proc.send_signal(signal.SIGTERM)
        server.wait_exit()
        assert not wait_gone(workers), f"workers outlived the server: {server.log()}"


def _gunicorn_argv(port: int, *extra: str) -> list[str]:
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extra: pip install -e '.[test]'")
    return [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "1",
            "-b", f"127.0.0.1:{port}", *extra, "lifecycle_app:app"]


@pytest.mark.timeout(180)
def test_gunicorn_pool_lives_in_the_gunicorn_worker(project: Path) -> None:
    port = free_port()
    with running(_gunicorn_argv(port), port, project / "server.log", server_env(project)) as server:
        serving = _serving_pid(server)
        assert serving != server.pid and ppid(serving) == server.pid
        assert all_children(server.pid) == {serving}, "the master has children besides its worker"
        workers = _check_one_pool(server, serving)
        # TORCHPOOL_WORKER_NICE "auto" behind threaded web workers: the web tier first.
        assert {nice_of(w) for w in workers} == {10}, server.log()

        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.log()
        assert not wait_gone(workers | {serving}), f"processes outlived the master: {server.log()}"


@pytest.mark.timeout(180)
def test_gunicorn_preload_starts_the_pool_in_the_worker_on_first_use(project: Path) -> None:
    port = free_port()
    argv = _gunicorn_argv(port, "--preload")
    with running(argv, port, project / "server.log", server_env(project)) as server:
        # The app was imported in the master, which then forked; nothing has called the model yet.
        status = server.wait_answers("/status").json()
        serving = status["server"]
        assert serving != server.pid and ppid(serving) == server.pid
        assert status["started"] is False, status
        assert not pool_workers_below(server.pid), "a pool started before its first use"
        # The master forks more workers whenever one dies: it must not have spawned anything (not
        # even multiprocessing's resource tracker).
        assert all_children(server.pid) == {serving}, server.log()

        assert _serving_pid(server) == serving
        assert all_children(server.pid) == {serving}, "the master has children besides its worker"
        workers = _check_one_pool(server, serving)

        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.log()
        assert not wait_gone(workers | {serving}), f"processes outlived the master: {server.log()}"


@pytest.mark.timeout(180)
def test_gunicorn_preload_started_by_a_shell_script(project: Path) -> None:
    # As with Docker's shell-form CMD, a Procfile or a start script: the master's parent is a shell
    # whose command line names gunicorn. The master must still not start the pool.
    port = free_port()
    gunicorn = " ".join(map(shlex.quote, _gunicorn_argv(port, "--preload")))
    script = (f"cd {shlex.quote(str(project))} && {gunicorn}\n"
              "status=$?\necho gunicorn exited: $status\nexit $status\n")
    with running(["sh", "-c", script], port, project / "server.log", server_env(project)) as server:
        status = server.wait_answers("/status").json()
        serving = status["server"]
        master = ppid(serving)
        assert master is not None and ppid(master) == server.pid
        assert not pool_workers_below(master) - pool_workers_below(serving), (
            f"the gunicorn master started a pool: {server.log()}")

        assert _serving_pid(server) == serving
        assert all_children(master) == {serving}, "the master has children besides its worker"
        workers = _check_one_pool(server, serving)

        os.kill(master, signal.SIGTERM)
        assert server.wait_exit() == 0, server.log()
        assert not wait_gone(workers | {serving, master}), f"processes outlived the master: {server.log()}"


FORK_SOURCE = '''\
import json
import os

from lifecycle_app import app, pool


def main():
    # The pool of lifecycle_app started when it was imported; a fork (what a gunicorn master does)
    # leaves the child without it, and the child starts its own on first use.
    with app.app_context():
        parent_worker = pool(action="pid")
        child = os.fork()
        if child == 0:
            try:
                worker = pool(action="pid")
                with open(f"/proc/{worker}/stat") as f:
                    worker_parent = int(f.read().rsplit(")", 1)[1].split()[1])
                result = {"worker": worker, "worker_parent": worker_parent, "me": os.getpid()}
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(result), flush=True)
            pool.shutdown()
            os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pool(action="pid") == parent_worker, "the parent's pool changed"


if __name__ == "__main__":
    main()
'''


@pytest.mark.timeout(180)
def test_a_forked_child_starts_its_own_pool_on_first_use(project: Path) -> None:
    (project / "fork_after_start.py").write_text(FORK_SOURCE)
    argv = [sys.executable, str(project / "fork_after_start.py")]
    with running(argv, 0, project / "fork.log", server_env(project)) as proc:
        rc = proc.wait_exit(120)
        log = proc.log()
    assert rc == 0, log
    results = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(results) == 1, log
    result = results[0]
    assert "error" not in result, log
    assert result["worker_parent"] == result["me"], result


# --- example_app ---------------------------------------------------------------------------------------


def _fenced_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced code block, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)\n(.*?)^```", markdown, re.M | re.S)]


def _readme_top() -> str:
    """The top of the repository's README, before its first section: how to run things."""
    return (ROOT / "README.md").read_text().split("\n## ", 1)[0]


def _curl(command: str, base_url: str) -> tuple[int, Any]:
    """Run a README curl command against *base_url*; returns (HTTP status, parsed JSON body)."""
    argv = shlex.split(command.replace("http://127.0.0.1:5000", base_url))
    assert argv[0] == "curl", command
    if shutil.which("curl") is None:  # pragma: no cover - same request with requests
        return _curl_with_requests(argv)
    done = subprocess.run([*argv, "-w", "\n%{http_code}"], cwd=ROOT, capture_output=True, timeout=60,
                          check=True)
    body, _, code = done.stdout.decode().rpartition("\n")
    return int(code), json.loads(body)


def _check_event_stream(command: str, base_url: str) -> None:
    """Run the README's ``curl -N`` line: one ``data`` event per generated character, then ``end``; the
    text is what the generator yields for that prompt when run here."""
    from example_app.generator import build_generator, encode

    argv = shlex.split(command.replace("http://127.0.0.1:5000", base_url))
    body = json.loads(argv[argv.index("--data") + 1])
    if shutil.which("curl") is not None:
        text = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=60, check=True).stdout.decode()
    else:  # pragma: no cover
        text = requests.post(argv[-1], json=body, timeout=60).text
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "event: end\ndata: {}", text
    chars = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(e.startswith("data: ") for e in events[:-1]) and len(chars) == body["max_new_tokens"], text
    assert "".join(chars) == "".join(build_generator()(encode(body["prompt"]), body["max_new_tokens"]))


def _curl_with_requests(argv: list[str]) -> tuple[int, Any]:  # pragma: no cover
    method, headers, data, url = "GET", {}, None, argv[-1]
    args = iter(argv[1:-1])
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg in ("-d", "--data", "--data-binary"):
            value = next(args)
            data = (ROOT / value[1:]).read_bytes() if value.startswith("@") else value.encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
            method = "POST" if method == "GET" else method
    answer = requests.request(method, url, headers=headers, data=data, timeout=60)
    return answer.status_code, answer.json()


def _check_prediction(label: int, probabilities: list[float]) -> None:
    assert isinstance(label, int) and 0 <= label <= 9
    assert len(probabilities) == 10 and all(isinstance(p, float) and 0 <= p <= 1 for p in probabilities)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
    assert probabilities.index(max(probabilities)) == label


def _assert_same_prediction(answer: dict[str, Any], expected: dict[str, Any]) -> None:
    """Two answers, from either endpoint, for the same image (probabilities are rounded to 6 places,
    and two workers may differ in the last bit before rounding)."""
    def flat(a: dict[str, Any]) -> tuple[list[int], list[float]]:
        if "labels" in a:
            return a["labels"], [p for row in a["probabilities"] for p in row]
        return [a["label"]], a["probabilities"]

    labels, probabilities = flat(answer)
    expected_labels, expected_probabilities = flat(expected)
    assert labels == expected_labels, (answer, expected)
    assert probabilities == pytest.approx(expected_probabilities, abs=2e-6), (answer, expected)


@pytest.mark.parametrize("payload", [
    {"inputs": [[True] * 784]},
    {"inputs": [[0.5] * 783 + [False]]},
    {"image": [[1] * 28] * 27 + [[1] * 27 + [True]]},
])
def test_the_example_app_refuses_true_and_false_as_pixel_values(payload: dict[str, Any]) -> None:
    """example_app/README.md: a non-numeric list is a 400 (torch.tensor would take true as 1)."""
    from example_app.decoding import images_from_json
    from flask_torchpool import InvalidInputError

    with pytest.raises(InvalidInputError, match="true and false are not numbers"):
        images_from_json(payload)


@pytest.mark.timeout(180)
def test_example_app_answers_the_readme_examples(tmp_path: Path) -> None:
    blocks = _fenced_blocks((ROOT / "example_app" / "README.md").read_text())
    # Each curl example is followed by the JSON it answers.
    examples = [(text.strip(), blocks[i + 1][1] if i + 1 < len(blocks) and blocks[i + 1][0] == "json"
                 else None)
                for i, (lang, text) in enumerate(blocks) if lang == "sh" and text.startswith("curl")]
    assert len(examples) == 4, examples

    port = free_port()
    before_shm = shm_entries()
    argv = [sys.executable, "-m", "example_app"]
    with running(argv, port, tmp_path / "server.log", server_env(PORT=str(port))) as server:
        index = server.wait_answers("/")
        assert index.status_code == 200, server.log()
        # The README: "the pool has started by then".
        workers = {p for p in child_pids(server.pid) if is_pool_worker(p)}
        # Two for the classifier, one for the text generator.
        assert len(workers) == 3 and pool_workers_below(server.pid) == workers, server.log()

        answers = {}
        for command, documented in examples:
            status, body = _curl(command, server.base_url)
            kind = ("image" if "/predict/image" in command else "json" if "sample.json" in command else
                    "bad" if "[[0.5, 0.5]]" in command else "index")
            assert kind not in answers, examples
            answers[kind] = (status, body, documented)

        status, image, _ = answers["image"]
        assert status == 200, image
        assert set(image) == {"label", "probabilities"}
        _check_prediction(image["label"], image["probabilities"])

        status, batch, _ = answers["json"]
        assert status == 200, batch
        assert set(batch) == {"labels", "probabilities"}
        assert len(batch["labels"]) == len(batch["probabilities"]) == 1
        _check_prediction(batch["labels"][0], batch["probabilities"][0])
        # sample.json is sample.pgm as numbers: the same image, the same answer.
        _assert_same_prediction(batch, image)

        status, index_body, _ = answers["index"]
        assert status == 200 and index_body["model"] == "example_app.model:build_classifier"
        assert {"GET /", "POST /predict", "POST /predict/image"} <= set(index_body["endpoints"])

        status, body, documented = answers["bad"]
        assert status == 400 and body == json.loads(documented), body

        # The curl commands at the top of the repository's README ask the same questions.
        top = [line for lang, text in _fenced_blocks(_readme_top()) if lang == "sh"
               for line in text.splitlines() if line.startswith("curl ")]
        for command in top:
            if command.startswith("curl -N "):
                _check_event_stream(command, server.base_url)
                continue
            status, body = _curl(command, server.base_url)
            expected = answers["image" if "/predict/image" in command else "json"][1]
            assert status == 200, (command, body)
            _assert_same_prediction(body, expected)

        # Ctrl-C in the terminal interrupts the whole foreground group; the workers ignore it and are
        # shut down by the server on its way out.
        kill_group(server.pid, signal.SIGINT)
        assert server.wait_exit() == 0, server.log()
        assert not wait_gone(workers), f"workers outlived the example app: {server.log()}"
    assert not new_shm_entries(before_shm), f"/dev/shm entries leaked: {new_shm_entries(before_shm)}"


def test_readme_commands_run_the_example_app_and_the_tests() -> None:
    commands = [line for lang, text in _fenced_blocks(_readme_top()) if lang == "sh"
                for line in text.splitlines()]
    runs = [c for c in commands if "python -m example_app" in c or "python -m pytest" in c]
    assert any("python -m example_app" in c for c in runs), commands
    assert any("python -m pytest" in c for c in runs), commands
    # Both install the test extra first, which must hold what these tests import; the tests also install
    # the ray extra, so that the Ray backend's tests run (not skip).
    assert all('pip install -e ".[test' in c.split("python -m ")[0] for c in runs), runs
    assert any('pip install -e ".[test,ray]"' in c for c in runs if "python -m pytest" in c), runs
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in extras["test"]}
    assert {"pytest", "pytest-timeout", "requests", "gunicorn"} <= names, extras["test"]
    assert [re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0] for req in extras["ray"]] == ["ray"], extras["ray"]
