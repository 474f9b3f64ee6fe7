"""Model files are code: the optional SHA-256 pin (issue 11, item 9), TORCHPOOL_MODEL_SHA256 and the
per-model "model_sha256"."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from flask_torchpool import ConfigError, TorchPool, WorkerStartupError
from flask_torchpool.config import PinnedFile, load
from flask_torchpool.worker import load_model

from .conftest import make_app


class _AddOne(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


@pytest.fixture
def model_file(tmp_path: Path) -> tuple[str, str]:
    path = tmp_path / "add_one.pt"
    torch.jit.save(torch.jit.script(_AddOne()), str(path))
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_pinned_file_that_matches_loads(model_file: tuple[str, str]) -> None:
    path, digest = model_file
    model = load_model(PinnedFile(path, digest, "TORCHPOOL_MODEL_SHA256"), "cpu")
    assert torch.equal(model(torch.zeros(2)), torch.ones(2))


def test_a_file_that_does_not_match_is_refused(model_file: tuple[str, str]) -> None:
    path, _ = model_file
    with pytest.raises(ConfigError, match=r"TORCHPOOL_MODEL_SHA256: the model file .* has SHA-256 "
                                          r"[0-9a-f]{64}, not the pinned 0{64}; refusing to load it"):
        load_model(PinnedFile(path, "0" * 64, "TORCHPOOL_MODEL_SHA256"), "cpu")


@pytest.mark.parametrize("value, fragment", [
    ("abc", "is not allowed; use None or 64 hex digits"),
    (123, "is not allowed; use None or 64 hex digits"),
])
def test_a_bad_pin_is_a_config_error(model_file: tuple[str, str], value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=f"TORCHPOOL_MODEL_SHA256: .*{fragment}"):
        load({"TORCHPOOL_MODEL": model_file[0], "TORCHPOOL_MODEL_SHA256": value})


def test_a_pin_on_a_factory_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r'TORCHPOOL_MODELS\["m"\]\["model_sha256"\]: pins the SHA-256 '
                                          r"of a model file, but the model 'tests.models:echo' is not"):
        load({"TORCHPOOL_MODELS": {"m": {"model": "tests.models:echo", "model_sha256": "a" * 64}}})


def test_the_pin_travels_to_the_worker_with_its_key(model_file: tuple[str, str]) -> None:
    path, digest = model_file
    _, models = load({"TORCHPOOL_MODELS": {"m": {"model": path, "model_sha256": digest.upper()}}})
    spec = models["m"].spec
    assert spec == PinnedFile(path, digest, 'TORCHPOOL_MODELS["m"]["model_sha256"]')
    assert repr(spec) == repr(path)


@pytest.mark.timeout(180)
def test_a_pool_refuses_a_file_that_does_not_match(model_file: tuple[str, str]) -> None:
    path, _ = model_file
    app = make_app(TORCHPOOL_MODEL=path, TORCHPOOL_MODEL_SHA256="f" * 64, TORCHPOOL_START="lazy")
    pool = TorchPool(app)
    try:
        with pytest.raises(WorkerStartupError, match="TORCHPOOL_MODEL_SHA256: the model file"):
            pool.start(app=app)
    finally:
        pool.shutdown(app=app)


@pytest.mark.timeout(180)
def test_a_pool_serves_a_file_that_matches(model_file: tuple[str, str]) -> None:
    path, digest = model_file
    app = make_app(TORCHPOOL_MODEL=path, TORCHPOOL_MODEL_SHA256=digest, TORCHPOOL_START="lazy")
    pool = TorchPool(app)
    try:
        with app.app_context():
            assert torch.equal(pool(torch.zeros(3)), torch.ones(3))
    finally:
        pool.shutdown(app=app)


def test_inline_mode_checks_the_pin_too(model_file: tuple[str, str]) -> None:
    path, digest = model_file
    app = make_app(TORCHPOOL_MODEL=path, TORCHPOOL_MODEL_SHA256="f" * 64, TORCHPOOL_INLINE=True)
    pool = TorchPool(app)
    with pytest.raises(WorkerStartupError, match="TORCHPOOL_MODEL_SHA256: the model file"):
        pool.start(app=app)
    good = make_app(TORCHPOOL_MODEL=path, TORCHPOOL_MODEL_SHA256=digest, TORCHPOOL_INLINE=True)
    good_pool = TorchPool(good)
    with good.app_context():
        assert torch.equal(good_pool(torch.zeros(3)), torch.ones(3))
    good_pool.shutdown(app=good)
