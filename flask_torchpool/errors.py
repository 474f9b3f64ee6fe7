"""The exception hierarchy of flask_torchpool.

Every error is a :class:`TorchPoolError`. The ones a view can meet also subclass the matching werkzeug
HTTP exception, so Flask renders them without any handler of ours: the body is JSON
(``{"error": message, "type": class name}``), 503 answers carry ``Retry-After``, and
``app.errorhandler(InferenceTimeoutError)`` (or ``app.errorhandler(504)``) overrides them as usual.
A 5xx body says only what kind of failure it was, with an ``error_id``; the message, the fields (pids,
exit codes, socket paths) and the remote traceback go to an ERROR log line with that id, and into the
body only when the operator asks (``app.debug`` or ``TORCHPOOL_ERROR_DETAILS``): Note [Error bodies].

Errors cross every process boundary (worker to pool, pool server to attached web process) through one
pair of functions: :func:`to_wire` turns an exception into a :class:`WireError` of builtins only (class
name, message, ``Retry-After``, extra fields, the remote traceback) and :func:`from_wire` rebuilds the
error from it, so nothing but builtins ever crosses a process boundary for an error, and no received
name can make anything but one of the classes here. Messages that several places raise have named
constructors (``PoolClosedError.before_run()``, ``InferenceError.model_raised()``, ...).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, NamedTuple, TypeVar

from werkzeug.exceptions import (
    BadRequest,
    GatewayTimeout,
    HTTPException,
    InternalServerError,
    RequestEntityTooLarge,
    ServiceUnavailable,
)

__all__ = [
    "TorchPoolError",
    "ConfigError",
    "WorkerStartupError",
    "WorkerCrashedError",
    "InferenceError",
    "OutputError",
    "InvalidInputError",
    "PayloadTooLargeError",
    "InferenceTimeoutError",
    "PoolOverloadedError",
    "PoolClosedError",
    "PoolUnavailableError",
    "RemoteTraceback",
    "WireError",
    "to_wire",
    "from_wire",
]


log = logging.getLogger(__name__)

# Note [Error bodies]
# ~~~~~~~~~~~~~~~~~~~
# What a server error says is for the operator: a model's message can quote its input (another caller's,
# in a batch), a crash names pids and exit codes, a startup failure file paths, an attach error the
# socket path. So a 5xx body is {"error": <the class's public text>, "type": <class name>, "error_id":
# <32 hex digits>}, and the ERROR log line "<error_id> <class>: <message> <fields>" plus the remote
# traceback holds the rest. With app.debug or TORCHPOOL_ERROR_DETAILS=True the body is the full one
# (message and fields) plus the error_id. A 4xx body always keeps its message: it says what was wrong
# with the caller's own input.


class TorchPoolError(Exception):
    """Base class of every error raised by flask_torchpool."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__`` of the error it explains."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class _HTTPError(TorchPoolError, HTTPException):
    """Mixin: an HTTP-facing pool error that renders itself as JSON."""

    code: int = 500
    #: Seconds for the ``Retry-After`` header, or None for no header.
    retry_after: int | None = None
    #: What a 5xx body says without details (Note [Error bodies]).
    public: str = "the server could not run this call"
    #: Set each time the error is rendered as a 5xx answer (the id in the body and in the log line).
    error_id: str | None = None

    def __init__(self, message: str, *, retry_after: int | None = None, **extra: Any) -> None:
        Exception.__init__(self, message)
        self.description = message
        self.response = None
        self.extra = extra
        if retry_after is not None:
            self.retry_after = retry_after

    def __str__(self) -> str:
        return str(self.description)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self.description), self.retry_after, self.extra))

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of the HTTP answer."""
        body: dict[str, Any] = {"error": str(self.description), "type": type(self).__name__}
        body.update(self.extra)
        return body

    def get_body(self, environ: Any = None, scope: Any = None) -> str:
        if self.code < 500:
            return json.dumps(self.to_dict())
        details = _details_wanted()
        # A fresh id per answer: one error object may answer many requests (a failed start's error).
        self.error_id = uuid.uuid4().hex
        _log_details(self)
        body = self.to_dict() if details else {"error": self.public, "type": type(self).__name__}
        body["error_id"] = self.error_id
        return json.dumps(body)

    def get_headers(self, environ: Any = None, scope: Any = None) -> list[tuple[str, str]]:
        headers = [("Content-Type", "application/json")]
        if self.retry_after is not None:
            headers.append(("Retry-After", str(int(self.retry_after))))
        return headers


_E = TypeVar("_E", bound="_HTTPError")


def _rebuild(cls: type[_HTTPError], message: str, retry_after: int | None,
             extra: dict[str, Any]) -> _HTTPError:
    err = cls.__new__(cls)
    _HTTPError.__init__(err, message, retry_after=retry_after, **extra)
    return err


class ConfigError(TorchPoolError, ValueError):
    """A ``TORCHPOOL_*`` value is invalid. Raised by ``init_app``; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class WorkerStartupError(_HTTPError, ServiceUnavailable):  # type: ignore[misc]
    """A worker could not start: its model failed to load or it died while loading.

    ``__cause__`` is a :class:`RemoteTraceback` with the worker's own traceback when there is one.
    """

    code = 503
    public = "the model could not be loaded; try again later"

    @classmethod
    def load_failed(cls, worker: int | str, model: Any, message: str, tb: str | None) -> WorkerStartupError:
        """Worker *worker* could not build *model*: *message* (``Type: text``), its traceback *tb*."""
        return _with_traceback(cls(f"worker {worker} could not load the model ({model!r}): {message}"), tb)


class WorkerCrashedError(_HTTPError, ServiceUnavailable):
    """The worker running this call died (crash, kill, out-of-memory) and no retry was left.

    Carries ``pid``, ``exitcode`` and ``signal`` (a name such as ``"SIGKILL"``, or None).
    """

    code = 503
    retry_after = 1
    public = "the worker running this call stopped before it finished; try again"

    @property
    def pid(self) -> int | None:
        return self.extra.get("pid")

    @property
    def exitcode(self) -> int | None:
        return self.extra.get("exitcode")

    @property
    def signal(self) -> str | None:
        return self.extra.get("signal")


class InferenceError(_HTTPError, InternalServerError):
    """The model raised. The message includes the model's own; ``__cause__`` holds its traceback."""

    code = 500
    public = "the model failed on this call"

    @property
    def remote_type(self) -> str | None:
        """The name of the exception class the model raised, e.g. ``"RuntimeError"``."""
        return self.extra.get("remote_type")

    @classmethod
    def model_raised(cls, type_name: str, message: str, tb: str | None) -> InferenceError:
        """The model raised *type_name*: *message*; *tb* is its formatted traceback."""
        return _with_traceback(cls(f"the model raised {type_name}: {message}", remote_type=type_name), tb)


class OutputError(InferenceError):
    """The model returned something that cannot travel back (the message names what and where)."""

    public = "the model's output could not be returned"


class InvalidInputError(_HTTPError, BadRequest):
    """The arguments of a call cannot be carried to a worker (refused in the calling thread)."""

    code = 400


class PayloadTooLargeError(_HTTPError, RequestEntityTooLarge):
    """The tensors of one call exceed ``TORCHPOOL_MAX_INPUT_BYTES``."""

    code = 413


class InferenceTimeoutError(_HTTPError, GatewayTimeout):
    """The call did not finish within its deadline (``TORCHPOOL_TIMEOUT`` or the view's ``timeout``).

    The deadline covers waiting in the queue and running in the worker. A worker still running the call
    at the deadline is killed and replaced.
    """

    code = 504
    public = "the call did not finish within its deadline"

    @classmethod
    def past_deadline(cls, waited: float, queued: bool) -> InferenceTimeoutError:
        """A call that waited *waited* seconds, *queued* for a worker or in one, and got no answer."""
        return cls(f"the call did not finish within its deadline ({waited:.3g}s; it was "
                   f"{'waiting for a worker' if queued else 'in a worker'}). Raise TORCHPOOL_TIMEOUT or the "
                   "view's timeout, or add workers")


class PoolOverloadedError(_HTTPError, ServiceUnavailable):
    """``TORCHPOOL_MAX_QUEUE`` calls are already waiting; this one was refused at once."""

    code = 503
    retry_after = 1
    public = "too many calls are waiting; try again shortly"


class PoolClosedError(_HTTPError, ServiceUnavailable):
    """The pool is shut down, draining, or has no worker left to serve."""

    code = 503
    retry_after = 1
    public = "the model is not serving right now; try again later"

    @classmethod
    def closing(cls, retry_after: int) -> PoolClosedError:
        """A call submitted while the pool shuts down (or drains)."""
        return cls("the pool is shutting down and takes no new calls", retry_after=retry_after)

    @classmethod
    def before_run(cls, retry_after: int, why: str = "") -> PoolClosedError:
        """A queued call failed because the pool shut down before a worker ran it."""
        return cls(f"the pool shut down before this call ran{why}", retry_after=retry_after)

    @classmethod
    def before_finish(cls, retry_after: int, why: str = "") -> PoolClosedError:
        """A call in a worker failed because the pool stopped before it finished."""
        return cls(f"the pool shut down before this call finished{why}", retry_after=retry_after)


class PoolUnavailableError(_HTTPError, ServiceUnavailable):
    """``TORCHPOOL_MODE`` ``"attach"``/``"auto"``: no pool server answers on the socket, or the
    connection to it was lost (the server stopped, died or restarted) while this call was pending.
    Carries ``socket``. The next call reconnects; retry after ``Retry-After``."""

    code = 503
    retry_after = 1
    public = "the model server is not reachable; try again later"


class ReloadError(TorchPoolError):
    """A reload did not happen: refused (another one runs, the pool is not serving, the backend cannot
    reload) or aborted (the new version failed; Note [Rolling reload]). The old version keeps serving.
    ``model``, ``version`` (the generation tried) and ``cause`` say which and why."""

    def __init__(self, message: str, model: str = "", version: int | None = None, cause: str = "") -> None:
        super().__init__(message)
        self.model = model
        self.version = version
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.model, self.version, self.cause))


class WireError(NamedTuple):
    """An error as it crosses a process boundary: builtins only. See :func:`to_wire`."""

    type_name: str                 # a class of this module; anything else is read as InferenceError
    message: str
    retry_after: int | None
    extra: dict[str, Any]          # None, bool, int, float and str values only
    tb: str | None                 # the remote traceback, when there is one


_WIRE_SCALARS = (type(None), bool, int, float, str)


def to_wire(exc: BaseException) -> WireError:
    """*exc* as builtins. A pool error keeps its class, message, ``Retry-After``, extra fields and remote
    traceback; any other exception (a bug on the sending side) becomes an :class:`InferenceError` that
    names it."""
    cause = exc.__cause__
    tb = cause.tb if isinstance(cause, RemoteTraceback) else None
    if isinstance(exc, _HTTPError):
        extra = {k: v for k, v in exc.extra.items() if isinstance(k, str) and isinstance(v, _WIRE_SCALARS)}
        return WireError(type(exc).__name__, str(exc.description), exc.retry_after, extra, tb)
    return WireError("InferenceError", f"the pool failed to run the call: {type(exc).__name__}: {exc}",
                     None, {}, tb)


def from_wire(wire: WireError) -> TorchPoolError:
    """The error :func:`to_wire` described, with its remote traceback as ``__cause__``. Only the HTTP-facing
    classes of this module can come out of it, whatever the names received."""
    cls = _WIRE_CLASSES.get(wire.type_name, InferenceError)
    extra = {k: v for k, v in dict(wire.extra).items() if isinstance(k, str) and isinstance(v, _WIRE_SCALARS)}
    retry_after = wire.retry_after if isinstance(wire.retry_after, int) else None
    return _with_traceback(_rebuild(cls, str(wire.message), retry_after, extra), wire.tb)


def _details_wanted() -> bool:
    """Whether the app being served asked for full 5xx bodies (``app.debug``, ``TORCHPOOL_ERROR_DETAILS``).
    Outside an app context (a plain WSGI use of the exception): no."""
    from flask import current_app, has_app_context

    if not has_app_context():
        return False
    app: Any = current_app
    state = app.extensions.get("torchpool")
    config = getattr(state, "app_config", None)
    wanted = getattr(config, "error_details", None)
    if wanted is None:
        wanted = app.config.get("TORCHPOOL_ERROR_DETAILS", False) is True
    return bool(app.debug or wanted)


def _log_details(err: _HTTPError) -> None:
    """The ERROR line that goes with a 5xx body: its id, the class, the message, the fields and the
    remote traceback (Note [Error bodies]). To the app's logger when there is an app."""
    from flask import current_app, has_app_context

    logger = current_app.logger if has_app_context() else log
    fields = "".join(f" {k}={v!r}" for k, v in err.extra.items())
    cause = err.__cause__
    tb = f"\nremote traceback:\n{cause.tb}" if isinstance(cause, RemoteTraceback) else ""
    logger.error("error %s: %s %d: %s%s%s", err.error_id, type(err).__name__, err.code,
                 err.description, fields, tb)


def placing_failed(error: BaseException, retry_after: int) -> TorchPoolError:
    """What a caller gets when its inputs could not be written into a worker's arena."""
    if isinstance(error, OSError):
        hint = (" (the open-file limit: raise it with ulimit -n)" if error.errno == 24 else "")
        return PoolOverloadedError(f"cannot place the inputs in shared memory: {error}{hint}",
                                   retry_after=retry_after)
    return InvalidInputError(f"cannot write the inputs: {type(error).__name__}: {error}")


def _with_traceback(err: _E, tb: str | None) -> _E:
    if tb:
        err.__cause__ = RemoteTraceback(str(tb))
    return err


_WIRE_CLASSES: dict[str, type[_HTTPError]] = {
    cls.__name__: cls for cls in (WorkerStartupError, WorkerCrashedError, InferenceError, OutputError,
                                  InvalidInputError, PayloadTooLargeError, InferenceTimeoutError,
                                  PoolOverloadedError, PoolClosedError, PoolUnavailableError)}
