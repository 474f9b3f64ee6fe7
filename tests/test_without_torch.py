"""Note [A pool server without torch]: the process that runs a process pool moves bytes only. An embedded
web app whose module imports no torch and whose views pass numpy arrays (batched, streamed, over one-off
segments) never loads torch in the web process; only its model workers do. The attached side (web
processes and pool server) is tested in ``test_attach.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .servers import ROOT, server_env

pytestmark = pytest.mark.timeout(180)

EMBEDDED_NUMPY = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from flask import Flask, request
from flask_torchpool import OutputError, TorchPool

app = Flask("embedded_numpy")
app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_WORKERS=1, TORCHPOOL_MAX_BATCH_SIZE=8,
                  TORCHPOOL_ARENA_BYTES=4 << 20, TORCHPOOL_HEALTH_URL="/torchpool",
                  TORCHPOOL_HANDLE_SIGTERM=False, TORCHPOOL_HANDLE_SIGHUP=False)


def main():
    pool = TorchPool(app)

    @app.post("/predict")
    @pool.infer
    def predict(model):
        y = model(np.frombuffer(request.get_data(), dtype=np.float32).reshape(-1, 4))
        return {"type": type(y).__name__, "rows": y.tolist()}

    client = app.test_client()
    out = {"predict": client.post("/predict", data=np.arange(8, dtype=np.float32).tobytes()).get_json()}
    with app.app_context():
        proxy = pool.model()
        big = np.arange(1 << 20, dtype=np.float32)   # 4 MiB: more than the arena holds, a one-off memfd
        back = proxy(big, np.ones((512, 256))[:, ::2], tag="x")
        out["big"] = [type(back["args"][0]).__name__, bool(np.array_equal(back["args"][0], big)),
                      back["args"][1].shape == (512, 128)]
        out["stream"] = [type(c).__name__ for c in proxy.stream(np.zeros(1, np.float32), action="yield", n=3)]
        try:
            proxy(np.ones(2, np.float32), action="cast", dtype="bfloat16")
        except OutputError as exc:
            out["bf16"] = str(exc)
        rows = [np.full((1, 4), i, np.float32) for i in range(16)]
        with ThreadPoolExecutor(8) as threads:
            backs = list(threads.map(lambda x: pool.submit(x).result(60), rows))
        out["rows"] = all(type(b).__name__ == "ndarray" and np.array_equal(b, x) for b, x in zip(backs, rows))
        out["batches"] = pool.status()["counters"]["batches"]
    out["status"] = client.get("/torchpool/status").status_code
    out["metrics"] = client.get("/torchpool/metrics").status_code
    out["torch"] = "torch" in sys.modules
    out["asyncio"] = "asyncio" in sys.modules
    pool.shutdown(app=app)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
"""


def test_an_embedded_pool_serving_numpy_arrays_never_loads_torch_in_the_web_process(tmp_path: Path) -> None:
    script = tmp_path / "embedded_numpy.py"
    script.write_text(EMBEDDED_NUMPY)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                          env=server_env(), timeout=150)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["predict"] == {"type": "ndarray", "rows": [[0, 1, 2, 3], [4, 5, 6, 7]]}, out
    assert out["big"] == ["ndarray", True, True], out
    assert out["stream"] == ["ndarray", "dict", "ndarray"], out
    assert "bfloat16 tensor has no numpy dtype" in out["bf16"], out
    assert out["rows"] is True and out["batches"] >= 1, out
    assert (out["status"], out["metrics"]) == (200, 200), out
    assert out["torch"] is False, "the embedded web process imported torch"
    # 2 MiB of every web process's memory: only an async view (ModelProxy.acall, async for) loads it.
    assert out["asyncio"] is False, "the embedded web process imported asyncio"


EXIT_WITHOUT_SHUTDOWN = """
import numpy as np
from flask import Flask
from flask_torchpool import TorchPool

if __name__ == "__main__":
    app = Flask("exit_without_shutdown")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_WORKERS=2, TORCHPOOL_ARENA_BYTES=4 << 20,
                      TORCHPOOL_HANDLE_SIGTERM=False, TORCHPOOL_HANDLE_SIGHUP=False)
    pool = TorchPool(app)
    with app.app_context():
        print(pool.submit(np.ones((1, 4), np.float32)).result(60).tolist())
    # No shutdown: the pool's exit hook stops it.
"""


def test_a_web_process_without_torch_stops_its_pool_cleanly_at_exit(tmp_path: Path) -> None:
    """The forked workers' pidfds were closed by weakref.finalize's exit hook, which ran before the
    pool's own when the first finalizer of the process was the pool's (no torch imported): stopping
    the workers then failed on a closed descriptor (a traceback from the manager thread at every
    exit, and the fork server left to die with its parent)."""
    script = tmp_path / "exit_without_shutdown.py"
    script.write_text(EXIT_WITHOUT_SHUTDOWN)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                          env=server_env(), timeout=150)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[[1.0, 1.0, 1.0, 1.0]]", done.stdout
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr
