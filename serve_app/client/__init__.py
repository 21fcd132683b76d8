"""A Python client for the serve_app HTTP API, sync (:class:`Client`) and async
(:class:`AsyncClient`), with bounded retries and typed results.

    from serve_app.client import Client

    with Client("http://127.0.0.1:8000") as client:
        result = client.classify("cat.jpg", top_k=3)
        print(result.top.label, result.top.score)

Command line: ``python -m serve_app.client IMAGE... [--url URL] [--json]``.
"""

from serve_app.client.api import DEFAULT_URL, AsyncClient, Client
from serve_app.client.errors import (
    RequestRejected,
    ServeAppConnectionError,
    ServeAppError,
    ServerError,
)
from serve_app.client.images import Upload, to_upload
from serve_app.client.results import (
    BatchClassification,
    BatchItem,
    Classification,
    ErrorInfo,
    Prediction,
)
from serve_app.client.retry import RetryPolicy

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "BatchClassification",
    "BatchItem",
    "Classification",
    "Client",
    "ErrorInfo",
    "Prediction",
    "RequestRejected",
    "RetryPolicy",
    "ServeAppConnectionError",
    "ServeAppError",
    "ServerError",
    "Upload",
    "to_upload",
]
