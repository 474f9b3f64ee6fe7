"""README.md's code blocks, run as a reader would run them.

Every fenced block of the README is listed in ``BLOCKS`` under its language and first line, with how it
is checked: run by a test here, run by a test elsewhere (named), or skipped with the reason. A block
that is not listed, or a listed one that is gone, fails :func:`test_every_readme_block_is_listed`, so
the README cannot drift away from what the tests run.

The quickstart's ``python`` blocks are written to the files their ``# path`` comment names, in an
empty project folder, and its ``sh`` block serves them with ``flask run`` exactly as written (only
the port comes from ``FLASK_RUN_PORT``, so that the test takes a free one).
"""

from __future__ import annotations

import re
import shlex
import signal
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import requests
import torch

from .conftest import shm_entries
from .servers import (
    ROOT,
    free_port,
    kill_group,
    new_shm_entries,
    pool_workers_below,
    running,
    server_env,
    wait_gone,
)

README = ROOT / "README.md"


class Block(NamedTuple):
    language: str
    text: str
    line: int  # of the opening fence, 1-based

    @property
    def key(self) -> tuple[str, str]:
        return self.language, self.text.split("\n", 1)[0]


def fenced_blocks(markdown: str) -> list[Block]:
    """Every fenced code block of *markdown*, in order."""
    return [Block(m[1], m[2], markdown.count("\n", 0, m.start()) + 1)
            for m in re.finditer(r"^```(\w*)\n(.*?)^```[ \t]*$", markdown, re.M | re.S)]


class Run(NamedTuple):
    """Run by *test*, in this module or another."""

    test: str


class Skip(NamedTuple):
    """Not run, for *reason*."""

    reason: str


_SETUP_REASON = ("creates .venv and installs torch and the package from the registries (minutes, and a "
                 "second copy of torch); .ci/run runs the same steps, and "
                 "test_lifecycle.py::test_readme_commands_run_the_example_app_and_the_tests checks that "
                 "the extra it installs holds what the tests import")

#: Each README block, by (language, first line), and how it is checked.
BLOCKS: dict[tuple[str, str], Run | Skip] = {
    ("sh", 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
           'pip install -e ".[test]" && python -m example_app'):
        Skip(_SETUP_REASON + "; the example app it starts is run by "
             "test_lifecycle.py::test_example_app_answers_the_readme_examples"),
    ("sh", 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
           'pip install -e ".[test,ray]" && python -m pytest'):
        Skip(_SETUP_REASON + "; the test suite it runs is this one"),
    ("sh", "curl -s -X POST --data-binary @example_app/sample.pgm http://127.0.0.1:5000/predict/image"):
        Run("test_lifecycle.py::test_example_app_answers_the_readme_examples (every `curl` line above "
            "the README's first section, against the example app)"),
    ("sh", "curl -N -X POST -H 'Content-Type: application/json' --data '{\"prompt\": \"the \", "
           "\"max_new_tokens\": 32}' http://127.0.0.1:5000/generate"):
        Run("test_lifecycle.py::test_example_app_answers_the_readme_examples (runs it with curl against the "
            "example app: every character arrives as its own event, then `event: end`, and the text is "
            "the generator's run in the test process)"),
    ("python", "# myproject/model.py"): Run("test_quickstart_serves_as_the_readme_says"),
    ("python", "# myproject/app.py"): Run("test_quickstart_serves_as_the_readme_says"),
    ("sh", "flask --app myproject.app run"): Run("test_quickstart_serves_as_the_readme_says"),
}


def readme_blocks() -> list[Block]:
    return fenced_blocks(README.read_text())


def test_every_readme_block_is_listed() -> None:
    blocks = readme_blocks()
    keys = [b.key for b in blocks]
    unlisted = [f"README.md:{b.line}: ```{b.language} {b.key[1]!r}" for b in blocks if b.key not in BLOCKS]
    assert not unlisted, ("README.md has code blocks that tests/test_readme.py does not know: run them in a "
                          "test or list them in BLOCKS with the reason they are skipped:\n"
                          + "\n".join(unlisted))
    gone = [key for key in BLOCKS if key not in keys]
    assert not gone, f"BLOCKS lists blocks that README.md no longer has; remove them: {gone}"
    assert len(set(keys)) == len(keys), f"two README blocks share a language and first line: {keys}"
    assert all(b.language for b in blocks), "a README code block has no language after its fence"


def test_skipped_blocks_are_the_setup_commands() -> None:
    """What is skipped is only what cannot sensibly run here; everything else runs."""
    for block in readme_blocks():
        if isinstance(BLOCKS.get(block.key), Skip):
            assert block.language == "sh" and block.text.startswith("python3 -m venv .venv && "), block


def test_curl_examples_are_where_test_lifecycle_runs_them() -> None:
    """test_lifecycle runs the ``curl`` lines of the ``sh`` blocks above the README's first section: a
    block listed as run there must stay there and hold nothing but ``curl`` lines."""
    markdown = README.read_text()
    top_end = markdown.count("\n", 0, markdown.index("\n## ")) + 1
    covered = [b for b in readme_blocks()
               if isinstance(BLOCKS.get(b.key), Run) and BLOCKS[b.key].test.startswith("test_lifecycle.py")]
    assert covered
    for block in covered:
        assert block.line < top_end, f"README.md:{block.line} moved below the first section: {block}"
        assert all(line.startswith("curl ") for line in block.text.splitlines()), block


def write_python_blocks(project: Path) -> list[Path]:
    """Write every ``python`` block to the file its ``# path`` first line names, under *project*."""
    written = []
    for block in readme_blocks():
        if block.language != "python":
            continue
        match = re.fullmatch(r"# ((?:\w+/)*\w+\.py)", block.key[1])
        assert match, f"README.md:{block.line}: a python block must start with a `# path/to/file.py` line"
        path = project / match[1]
        assert path not in written, f"README.md:{block.line}: a second block for {match[1]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text)
        written.append(path)
    return written


def check_linear_4_2(inputs: list[list[float]], outputs: list[list[float]]) -> None:
    """*outputs* are what ``torch.nn.Linear(4, 2)`` (weights unknown) gives for *inputs*, whose first
    five rows are zero and the four unit vectors: the rest must follow from those."""
    out = torch.tensor(outputs, dtype=torch.float64)
    assert out.shape == (len(inputs), 2), outputs
    bias = out[0]
    weight = (out[1:5] - bias).T
    expected = torch.tensor(inputs, dtype=torch.float64) @ weight.T + bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(180)
def test_quickstart_serves_as_the_readme_says(tmp_path: Path) -> None:
    project = tmp_path / "project"
    written = write_python_blocks(project)
    assert {p.relative_to(project).as_posix() for p in written} == {"myproject/model.py", "myproject/app.py"}

    commands = [b.text.strip() for b in readme_blocks() if b.key == ("sh", "flask --app myproject.app run")]
    assert len(commands) == 1 and "\n" not in commands[0], commands
    argv = shlex.split(commands[0])
    argv[0:1] = [sys.executable, "-m", "flask"]  # the `flask` of this interpreter

    port = free_port()
    before_shm = shm_entries()
    env = server_env(FLASK_RUN_PORT=str(port))
    with running(argv, port, tmp_path / "server.log", env, cwd=project) as server:
        # `flask run` starts the pool before it listens: it is ready once anything answers.
        assert server.wait_answers("/").status_code == 404, server.log()
        workers = pool_workers_below(server.pid)
        assert workers, f"no pool workers below the server: {server.log()}"

        inputs = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
                  [0.0, 0.0, 0.0, 1.0], [0.5, -1.0, 2.0, 3.0], [-2.0, 0.25, 1.5, -0.75]]
        answer = requests.post(server.base_url + "/predict", json={"inputs": inputs}, timeout=60)
        assert answer.status_code == 200, (answer.text, server.log())
        body = answer.json()
        assert set(body) == {"outputs"}, body
        check_linear_4_2(inputs, body["outputs"])

        # Ctrl-C in the terminal: the server shuts its pool down on the way out.
        kill_group(server.pid, signal.SIGINT)
        assert server.wait_exit() == 0, server.log()
        assert not wait_gone(workers), f"workers outlived the server: {server.log()}"
    assert not new_shm_entries(before_shm), f"/dev/shm entries leaked: {new_shm_entries(before_shm)}"
