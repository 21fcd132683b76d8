"""Ray's HAProxy config as text: where serve_app's rules go (serve_app/haproxy_errors.py's
wrapper rewrites it before HAProxy reads it)."""

from __future__ import annotations

import re
from typing import Callable, Optional

#: A ``backend http-<app>`` section (one per Serve application): its header line, then its
#: indented lines.
_BACKEND = re.compile(r"^(?P<head>backend (?P<name>http-\S+)[ \t]*\n)"
                      r"(?P<body>(?:[ \t]+[^\n]*\n|\n)*)", re.MULTILINE)
_BUFSIZE = re.compile(r"^\s+tune\.bufsize\s+(\d+)\s*$", re.MULTILINE)


def backend_name(app: str) -> str:
    """The backend Ray names for an HTTP application (HAProxyManager._generate_backend_name,
    get_safe_name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"http-{app}".replace("#", "-").replace("/", "."))


def add_to_app_backends(text: str, mark: str,
                        lines_for: Callable[[str], Optional[list[str]]]) -> str:
    """``text`` with ``lines_for(backend name)`` (none: that backend is left alone) first in
    each application's backend, under a ``# <mark>`` comment; a backend that already has the
    mark is left as it is, so a reload's rewrite adds nothing."""
    def add(match: re.Match) -> str:
        lines = lines_for(match.group("name"))
        if not lines or f"# {mark}" in match.group("body"):
            return match.group(0)
        block = "".join(f"    {line}\n" for line in [f"# {mark}", *lines])
        return match.group("head") + block + match.group("body")

    return _BACKEND.sub(add, text)


def bufsize(text: str, default: int = 16384) -> int:
    """The config's ``tune.bufsize`` (HAProxy's default 16 KiB without one)."""
    found = _BUFSIZE.search(text)
    return int(found.group(1)) if found else default
