"""Checked by mypy --strict in CI (``[tool.mypy] files`` in pyproject.toml), not run by pytest.

``@pool.infer`` is typed with ``ParamSpec``/``Concatenate``: mypy sees the view without its first
parameter (the :class:`ModelProxy`), keeps the return type, and refuses a wrong argument; the
``type: ignore`` below turns into an "unused ignore" error if that ever stops being true.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Callable

from flask_torchpool import ModelProxy, TorchPool

pool = TorchPool()


@pool.infer
def predict(model: ModelProxy, item: int) -> dict[str, int]:
    return {"item": item}


@pool.infer("other", timeout=2.0, batch=False)
def named(model: ModelProxy, name: str) -> str:
    return name


@pool.infer
async def asynchronous(model: ModelProxy) -> int:
    return 1


checked_predict: Callable[[int], dict[str, int]] = predict
checked_named: Callable[[str], str] = named
checked_async: Callable[[], Coroutine[Any, Any, int]] = asynchronous
predict("not an int")  # type: ignore[arg-type]
