"""Packaging smoke test: build the sdist and the wheel, install each into a fresh venv, serve once.

``python .ci/smoke.py`` (from ``.ci/run``, or by hand with ``build`` installed). It

1. runs ``python -m build`` into a temporary folder (the sdist first, then the wheel built from the
   unpacked sdist, so the sdist is shown to hold what a build needs) and checks what each contains:
   the sdist the project files and the whole package with ``py.typed``, the wheel the package and
   nothing else;
2. for the wheel and for the sdist: creates a venv, installs ``torch==2.13.0`` first (that pin is
   the local CPU build; leaving torch to the ``torch>=2.1`` requirement would pull a CUDA build of
   several gigabytes), then the artifact;
3. from a temporary folder outside the repository, so that only the installed package can be
   imported, runs a tiny Flask app: ``TorchPool(app)`` with a ``torch.nn.Linear(4, 2)`` factory
   from that folder, a ``@pool.infer`` POST view called through ``app.test_client()``, an answer
   from a spawned worker checked against the same model run in the app's process, and
   ``pool.shutdown()`` leaving no worker behind.

Exits non-zero on the first failure. pip's cache is used as configured (nothing is downloaded
twice across runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "flask_torchpool"
TORCH_PIN = "torch==2.13.0"

MODEL_SOURCE = '''\
import torch


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights in the worker and in the check below
    return torch.nn.Linear(4, 2)
'''

APP_SOURCE = '''\
import os
import sys
from pathlib import Path

import torch
from flask import Flask, request

import flask_torchpool
from flask_torchpool import TorchPool
from smoke_model import build_model

installed = Path(flask_torchpool.__file__).resolve().parent
assert Path(sys.prefix).resolve() in installed.parents, f"imported from {installed}, not the venv"
assert (installed / "py.typed").is_file(), f"py.typed missing from {installed}"


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


app = Flask(__name__)
app.config.update(TORCHPOOL_MODEL="smoke_model:build_model", TORCHPOOL_WORKERS=1,
                  TORCHPOOL_DEVICES="cpu", TORCHPOOL_ARENA_BYTES=8 << 20)
pool = TorchPool(app)


@app.post("/predict")
@pool.infer
def predict(model):
    inputs = torch.tensor(request.get_json()["inputs"], dtype=torch.float32)
    return {"outputs": model(inputs).tolist()}


def main():
    inputs = [[1.0, 2.0, 3.0, 4.0], [-0.5, 0.0, 0.5, 1.5]]
    try:
        answer = app.test_client().post("/predict", json={"inputs": inputs})
        assert answer.status_code == 200, (answer.status_code, answer.get_data(as_text=True))
        with torch.inference_mode():
            expected = build_model()(torch.tensor(inputs)).tolist()
        got = answer.get_json()["outputs"]
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-6), (got, expected)
        workers = pool.status(app)["workers"]
        assert len(workers) == 1 and workers[0]["pid"] not in (None, os.getpid()), workers
        assert workers[0]["calls"] == 1 and workers[0]["state"] == "ready", workers
        worker_pid = workers[0]["pid"]
    finally:
        pool.shutdown(app=app)
    assert not alive(worker_pid), f"worker {worker_pid} outlived pool.shutdown()"
    print(f"ok: flask_torchpool {flask_torchpool.__version__} from {installed}: worker {worker_pid} "
          f"answered {got}")


# Spawned workers import this script again (as __mp_main__): only the app's process calls the model.
if __name__ == "__main__":
    main()
'''


class SmokeError(Exception):
    pass


def run(argv: list[str | os.PathLike[str]], **kwargs: object) -> None:
    print("+", " ".join(map(str, argv)), flush=True)
    done = subprocess.run(list(map(str, argv)), **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise SmokeError(f"exit status {done.returncode}: {' '.join(map(str, argv))}")


def build(outdir: Path) -> tuple[Path, Path]:
    # No --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist.
    run([sys.executable, "-m", "build", "--outdir", outdir, ROOT])
    sdists, wheels = sorted(outdir.glob("*.tar.gz")), sorted(outdir.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise SmokeError(f"expected one sdist and one wheel in {outdir}, found {sdists + wheels}")
    return sdists[0], wheels[0]


def package_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).iterdir()
            if p.is_file() and (p.suffix == ".py" or p.name == "py.typed")}


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    required = {"pyproject.toml", "README.md", "PKG-INFO", f"{PACKAGE}/py.typed"} | package_files()
    if missing := required - names:
        raise SmokeError(f"{sdist.name} lacks {sorted(missing)}")
    # Tests go in whole or not at all: the test modules import conftest and helpers beside them.
    tests = {n for n in names if n.startswith("tests/")}
    if tests and (missing := {f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")} - tests):
        raise SmokeError(f"{sdist.name} has tests/ without {sorted(missing)}")
    if junk := {n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))}:
        raise SmokeError(f"{sdist.name} holds build leftovers: {sorted(junk)}")
    print(f"ok: {sdist.name}: {len(names)} entries, the package with py.typed, pyproject.toml, README.md")


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    if missing := package_files() - names:
        raise SmokeError(f"{wheel.name} lacks {sorted(missing)}")
    if stray := {n for n in names if not n.startswith((f"{PACKAGE}/", f"{PACKAGE}-"))}:
        raise SmokeError(f"{wheel.name} holds files outside the package: {sorted(stray)}")
    print(f"ok: {wheel.name}: {len(names)} files, the package only")


def install_and_serve(artifact: Path, work: Path) -> None:
    venv = work / "venv"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", TORCH_PIN])
    run([python, "-m", "pip", "install", "--quiet", artifact])
    app_dir = work / "app"
    app_dir.mkdir()
    (app_dir / "smoke_model.py").write_text(MODEL_SOURCE)
    (app_dir / "smoke_app.py").write_text(APP_SOURCE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
           and not k.startswith(("FLASK_", "TORCHPOOL_"))}
    env["PYTHONNOUSERSITE"] = "1"
    run([python, "smoke_app.py"], cwd=app_dir, env=env, timeout=300)


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="torchpool-smoke-") as tmp:
        tmp_path = Path(tmp)
        if ROOT in tmp_path.resolve().parents:
            raise SmokeError(f"the temporary folder {tmp_path} is inside the repository")
        try:
            sdist, wheel = build(tmp_path / "dist")
            check_sdist(sdist)
            check_wheel(wheel)
            for kind, artifact in (("wheel", wheel), ("sdist", sdist)):
                print(f"\n-- {kind}: {artifact.name}", flush=True)
                work = tmp_path / kind
                work.mkdir()
                install_and_serve(artifact, work)
        except (SmokeError, subprocess.TimeoutExpired) as error:
            print(f"smoke test FAILED: {error}", file=sys.stderr)
            return 1
    print(f"\nsmoke test passed in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
