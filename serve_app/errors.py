"""Errors a client can cause, each with the stable code and HTTP status the API promises.

They are raised in any replica (decoding happens in the preprocessor) and pickled back to the
ingress, which turns them into ``{"error": {"code", "message"}}`` responses.
"""

from __future__ import annotations


class ClientError(Exception):
    """A request the service refuses; never a server fault, never a 500."""

    code = "bad_request"
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep the subclass and message across Ray's pickling
        return (type(self), (self.message,))


class InvalidImage(ClientError):
    code = "invalid_image"
    status = 400


class ImageTooLarge(ClientError):
    code = "image_too_large"
    status = 413


class PayloadTooLarge(ClientError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(ClientError):
    code = "unsupported_media_type"
    status = 415


class TooManyFiles(ClientError):
    code = "too_many_files"
    status = 413


def find_client_error(exc: BaseException) -> ClientError | None:
    """The ClientError behind ``exc``, also when Ray wrapped it in a RayTaskError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ClientError):
            return exc
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # RayTaskError keeps the original here
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None


class UnknownModel(ClientError):
    code = "model_not_found"
    status = 404


class Unavailable(Exception):
    """The service cannot take the request now: a 503 the client should retry after
    ``retry_after_s`` (sent as ``Retry-After``); never a 4xx."""

    code = "unavailable"
    status = 503

    def __init__(self, message: str, retry_after_s: float | None = 1.0):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.retry_after_s))


class NotReady(Unavailable):
    """The model cannot answer yet (loading, or no replica is up)."""

    code = "not_ready"


class Overloaded(Unavailable):
    """Every queue for the model is full: refused at once instead of queueing until timeouts."""

    code = "overloaded"


class ReplicaLost(Unavailable):
    """The replica that held the request stopped (killed, crashed, replaced): nothing was
    answered, so the client may safely send it again."""

    code = "replica_lost"


def is_replica_loss(exc: BaseException) -> bool:
    """Whether ``exc`` (or what Ray wrapped in it) says the replica running the call is gone."""
    from ray.exceptions import RayActorError, WorkerCrashedError
    from ray.serve.exceptions import ReplicaUnavailableError

    lost = (RayActorError, WorkerCrashedError, ReplicaUnavailableError)
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, lost):
            return True
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return False
