"""Configuration: every key validated once in init_app, errors naming the key; the placement plan."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask import Flask

from flask_torchpool import ConfigError, TorchPool
from flask_torchpool.config import DEFAULTS, MODEL_OVERRIDES, PoolConfig
from flask_torchpool.placement import plan, split_cores


def _config(**overrides) -> PoolConfig:
    values = {"TORCHPOOL_MODEL": "tests.models:echo", **overrides}
    return PoolConfig.from_mapping(values)


def test_defaults_are_applied_to_app_config() -> None:
    app = Flask("cfg")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_START="lazy")
    TorchPool(app)
    for key, value in DEFAULTS.items():
        if key != "TORCHPOOL_MODEL" and key != "TORCHPOOL_START":
            assert app.config[key] == value


@pytest.mark.parametrize("key, value, fragment", [
    ("TORCHPOOL_MODEL", None, "is not set"),
    ("TORCHPOOL_MODEL", "no colon here", "neither 'package.module:callable'"),
    ("TORCHPOOL_MODEL", "/nonexistent/model.pt", "does not exist"),
    ("TORCHPOOL_MODEL", 42, "not callable"),
    ("TORCHPOOL_MODEL", lambda: None, "cannot be sent to a worker"),
    ("TORCHPOOL_WORKERS", 0, "integer >= 1"),
    ("TORCHPOOL_WORKERS", "many", "or 'auto'"),
    ("TORCHPOOL_WORKERS", True, "integer"),
    ("TORCHPOOL_DEVICES", "tpu", "'cpu', 'cuda'"),
    ("TORCHPOOL_DEVICES", "cpu,cuda:0", "cannot be combined"),
    ("TORCHPOOL_DEVICES", 3, "not allowed"),
    ("TORCHPOOL_THREADS_PER_WORKER", 0, ">= 1"),
    ("TORCHPOOL_ARENA_BYTES", 1000, ">= 1048576"),
    ("TORCHPOOL_PIPELINE_DEPTH", 0, ">= 1"),
    ("TORCHPOOL_TIMEOUT", 0, "> 0"),
    ("TORCHPOOL_TIMEOUT", "10", "seconds"),
    ("TORCHPOOL_START_TIMEOUT", None, "seconds"),
    ("TORCHPOOL_MAX_QUEUE", -1, ">= 0"),
    ("TORCHPOOL_MAX_INPUT_BYTES", 0, ">= 1"),
    ("TORCHPOOL_RETRIES", -1, ">= 0"),
    ("TORCHPOOL_MAX_RESTARTS", 1.5, "integer"),
    ("TORCHPOOL_RESTART_WINDOW", -3, "> 0"),
    ("TORCHPOOL_DRAIN_TIMEOUT", -1, ">= 0"),
    ("TORCHPOOL_START", "now", "'auto', 'eager', 'lazy'"),
    ("TORCHPOOL_HANDLE_SIGTERM", "yes", "True or False"),
    ("TORCHPOOL_RETRY_AFTER", -1, ">= 0"),
    ("TORCHPOOL_WEB_AFFINITY", "core", "'auto', 'off', 'worker'"),
    ("TORCHPOOL_BATCH_BUCKETS", 8, "a list of batch sizes"),
    ("TORCHPOOL_BATCH_BUCKETS", [4, 0], "integers >= 1"),
    ("TORCHPOOL_BATCH_BUCKETS", [4, True], "integers >= 1"),
    ("TORCHPOOL_BATCH_BUCKETS", [1, 4, 8], "no batch grows that big"),   # TORCHPOOL_MAX_BATCH_SIZE is 1
    # Longer than the system's waits (2**31 - 1 ms): accepted, these killed the pool's manager thread
    # (OverflowError) at the first wait, or failed every call of a crash loop.
    ("TORCHPOOL_TIMEOUT", float("inf"), "at most 1000000 or None"),
    ("TORCHPOOL_TIMEOUT", 2_592_000, "at most 1000000"),
    ("TORCHPOOL_START_TIMEOUT", float("inf"), "at most 1000000"),
    ("TORCHPOOL_RESTART_WINDOW", float("inf"), "at most 1000000"),
    ("TORCHPOOL_DRAIN_TIMEOUT", 1e300, "at most 1000000"),
    ("TORCHPOOL_STREAM_TIMEOUT", float("inf"), "at most 1000000"),
    ("TORCHPOOL_MAX_BATCH_DELAY_MS", float("inf"), "milliseconds >= 0 and at most 1000000"),
    ("TORCHPOOL_TIMEOUT", float("nan"), "> 0"),
    ("TORCHPOOL_ARENA_BYTES", 1 << 50, "at most this machine's memory"),
    ("TORCHPOOL_HEALTH_URL", "//", "a URL path"),   # was the prefix "": /status at the site's root
    ("TORCHPOOL_HEALTH_URL", "/tp?x=1", "a URL path"),
    ("TORCHPOOL_HEALTH_URL", "/tp#top", "a URL path"),
    ("TORCHPOOL_HEALTH_URL", "/t p", "a URL path"),
    ("TORCHPOOL_HEALTH_URL", "/a//b", "a URL path"),
    ("TORCHPOOL_MODEL", "tests.models:echo\n", "neither 'package.module:callable'"),
    ("TORCHPOOL_SOCKET", "/tmp/a\0b.sock", "a path of at most 107 bytes, or None"),
    ("TORCHPOOL_SOCKET", "", "a path of at most 107 bytes, or None"),
    ("TORCHPOOL_SOCKET", "/tmp/" + "x" * 120, "a path of at most 107 bytes, or None"),
])
def test_bad_values_name_the_key(key: str, value, fragment: str) -> None:
    app = Flask("cfg")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_START="lazy")
    app.config[key] = value
    with pytest.raises(ConfigError, match=key) as info:
        TorchPool(app)
    assert fragment in str(info.value)
    assert info.value.key == key
    assert isinstance(info.value, ValueError)
    assert "torchpool" not in app.extensions


def test_a_model_name_with_a_final_newline_is_refused() -> None:
    app = Flask("cfg")
    app.config.update(TORCHPOOL_MODELS={"tagger\n": "tests.models:echo"}, TORCHPOOL_START="lazy")
    with pytest.raises(ConfigError, match="TORCHPOOL_MODELS"):
        TorchPool(app)


def _allowed_lines() -> dict[str, str]:
    """Each key of docs/configuration.rst with the literal of its "Allowed:" line."""
    text = (Path(__file__).parent.parent / "docs" / "configuration.rst").read_text()
    allowed = {}
    for block in re.split(r"^\.\. data:: ", text, flags=re.M)[1:]:
        key, body = block.split("\n", 1)
        found = re.search(r"Allowed: ``(.*?)``", " ".join(body.split()))
        if found:
            allowed[key.strip()] = found.group(1)
    return allowed


def test_every_keys_message_says_what_its_allowed_line_says() -> None:
    """configuration.rst: a refused value's message is ``KEY: <value> is not allowed; use <what>``, and
    ``<what>`` is the key's "Allowed" line."""
    allowed = _allowed_lines()
    assert len(allowed) >= 40, sorted(allowed)
    for key, what in allowed.items():
        app = Flask("cfg")
        app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_START="lazy")
        app.config[key] = object()   # no key allows it
        with pytest.raises(ConfigError) as info:
            TorchPool(app)
        assert info.value.key == key
        assert f": {app.config[key]!r} is not allowed; use {what}" in str(info.value), (key, what)


@pytest.mark.parametrize("drain", [float("nan"), float("inf"), -1.0, True, "5"])
def test_a_bad_drain_timeout_for_shutdown_is_a_value_error(drain: object) -> None:
    app = Flask("cfg")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_START="lazy")
    pool = TorchPool(app)
    with pytest.raises(ValueError, match="drain_timeout must be None or a number of seconds >= 0"):
        pool.shutdown(app=app, drain_timeout=drain)  # type: ignore[arg-type]
    pool.shutdown(app=app)


def test_model_instance_is_refused_with_the_fix() -> None:
    import torch

    with pytest.raises(ConfigError, match="give the function that builds it"):
        _config(TORCHPOOL_MODEL=torch.nn.Linear(2, 2))


def test_valid_values() -> None:
    from tests.models import echo

    cfg = _config(TORCHPOOL_MODEL=echo, TORCHPOOL_DEVICES=["cuda:0", "cuda:1"], TORCHPOOL_TIMEOUT=None,
                  TORCHPOOL_WORKERS=3)
    assert cfg.model is echo and cfg.devices == ("cuda:0", "cuda:1") and cfg.timeout is None
    assert _config(TORCHPOOL_DEVICES="cuda:0, cuda:1").devices == ("cuda:0", "cuda:1")
    assert _config(TORCHPOOL_DEVICES="auto").devices == "auto"


def test_batch_buckets_are_sorted_and_checked_per_model() -> None:
    from flask_torchpool.config import load

    cfg = _config(TORCHPOOL_MAX_BATCH_SIZE=16, TORCHPOOL_BATCH_BUCKETS=[16, 4, 1, 8, 4])
    assert cfg.batch_buckets == (1, 4, 8, 16) and _config().batch_buckets == ()
    with pytest.raises(ConfigError, match=r'TORCHPOOL_MODELS\["m"\]\["batch_buckets"\]') as info:
        load({"TORCHPOOL_MODELS": {"m": {"model": "tests.models:echo", "max_batch_size": 4,
                                         "batch_buckets": [2, 8]}}})
    assert "above TORCHPOOL_MODELS[\"m\"][\"max_batch_size\"] (4)" in str(info.value)


def test_registering_twice_says_the_fix() -> None:
    app = Flask("cfg")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_START="lazy")
    TorchPool(app)
    with pytest.raises(RuntimeError, match="already registered on this app; use that instance"):
        TorchPool(app)


def test_plan_splits_cores_disjointly() -> None:
    placements = plan(_config(TORCHPOOL_WORKERS=2, TORCHPOOL_DEVICES="cpu"), cores=[0, 1, 2, 3, 4])
    assert [p.cores for p in placements] == [(0, 1, 2), (3, 4)]
    assert [p.threads for p in placements] == [3, 2]
    assert all(p.device == "cpu" for p in placements)
    assert split_cores([0, 1], 3) == [(0,), (1,), (0,)]


def test_plan_threads_override_and_auto_workers() -> None:
    placements = plan(_config(TORCHPOOL_DEVICES="cpu", TORCHPOOL_THREADS_PER_WORKER=2), cores=[0, 1, 2])
    assert len(placements) == 3 and all(p.threads == 2 for p in placements)
    assert len(plan(_config(TORCHPOOL_DEVICES="cpu"), cores=list(range(6)))) == 4
    assert len(plan(_config(TORCHPOOL_DEVICES="cpu"), cores=list(range(64)))) == 16


def test_plan_round_robins_gpus() -> None:
    placements = plan(_config(TORCHPOOL_WORKERS=3, TORCHPOOL_DEVICES="cuda"), cores=[0, 1, 2, 3],
                      gpu_count=2)
    assert [p.device for p in placements] == ["cuda:0", "cuda:1", "cuda:0"]
    auto = plan(_config(TORCHPOOL_DEVICES="auto"), cores=[0, 1], gpu_count=2)
    assert [p.device for p in auto] == ["cuda:0", "cuda:1"]
    with pytest.raises(ConfigError, match="cuda:5 does not exist"):
        plan(_config(TORCHPOOL_DEVICES="cuda:5"), cores=[0], gpu_count=2)
    with pytest.raises(ConfigError, match="none is visible"):
        plan(_config(TORCHPOOL_DEVICES="cuda"), cores=[0], gpu_count=0)


def test_plan_is_visible_without_starting() -> None:
    app = Flask("cfg")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_START="lazy", TORCHPOOL_WORKERS=2,
                      TORCHPOOL_DEVICES="cpu")
    pool = TorchPool(app)
    with app.app_context():
        assert [p.worker for p in pool.plan] == [0, 1]
        status = pool.status()
    assert status["started"] is False and len(status["workers"]) == 2


def test_the_docs_list_every_per_model_key() -> None:
    """docs/configuration.rst, TORCHPOOL_MODELS: the keys an entry may set are MODEL_OVERRIDES, all."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "configuration.rst").read_text()
    start = text.index("model alone, with the values that key allows:")
    listed = re.findall(r"``([a-z_0-9]+)``", text[start:text.index("A model takes the top-level", start)])
    assert listed == list(MODEL_OVERRIDES)

