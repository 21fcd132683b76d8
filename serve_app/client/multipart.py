"""A multipart/form-data body built once as bytes.

httpx's ``files=`` would build a new stream (and boundary) on every send; building the bytes
ourselves means every retry sends an identical body, and it is encoded only once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from serve_app.client.images import Upload


def _quote(filename: str) -> str:
    """A filename as a quoted-string: backslash-escaped (as python-multipart, the service's
    parser, unescapes it), with the line breaks that would end the header percent-encoded."""
    escaped = filename.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "%0D").replace("\n", "%0A") + '"'


def encode_multipart(field: str, uploads: Sequence[Upload]) -> tuple[str, bytes]:
    """``(content_type, body)`` with one file part per upload, all under ``field``."""
    while True:  # a boundary that occurs in the data would cut it short; 128 random bits
        boundary = uuid.uuid4().hex  # all but rule that out, but checking is cheap
        if not any(boundary.encode() in u.data for u in uploads):
            break
    parts = []
    for upload in uploads:
        head = (f"--{boundary}\r\n"
                f"Content-Disposition: form-data; name=\"{field}\"; "
                f"filename={_quote(upload.filename)}\r\n"
                f"Content-Type: {upload.content_type}\r\n\r\n")
        parts += [head.encode("utf-8"), upload.data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)
