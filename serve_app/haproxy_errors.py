"""HAProxy's own error answers in serve_app's JSON shape, with their real status codes.

In HAProxy mode Ray points HAProxy's 502, 503 and 504 at one file that says
"500 Internal Server Error" in plain text (ray/serve/_private/haproxy.py). So a client whose
ingress replica died mid-request, or who arrived while no ingress replica was reachable, read
a 500: "a bug, do not retry", when the truth is "retry in a second". Ray exposes no setting
for those pages, only the binary it runs (``RAY_SERVE_HAPROXY_BINARY_PATH``). serve_app sets
that to a small wrapper (:func:`install`) that points the config's ``errorfile`` lines at the
pages below and then execs the real HAProxy, same PID and arguments, on every start and
reload. The same rewrite adds the rule of serve_app's replay of dropped requests that
Ray has no option for (serve_app/haproxy_replay.py), and the rules that shed past capacity at
the edge (serve_app/haproxy_shedding.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from serve_app import haproxy_replay, haproxy_shedding

BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"

#: status -> (code, message, Retry-After seconds or None), as serve_app's own errors say them.
PAGES: dict[int, tuple[str, str, int | None]] = {
    502: ("replica_lost", "The ingress replica holding this request stopped before it answered; "
          "retry.", 1),
    503: ("unavailable", "No ingress replica can take the request now; retry later.", 1),
    504: ("timeout", "The ingress did not answer in time.", None),
}
_REASONS = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_ERRORFILE = re.compile(r"^(\s*errorfile\s+)(50[234])(\s+)\S+\s*$", re.MULTILINE)


def error_page(status: int) -> bytes:
    """A whole HTTP response, as HAProxy's ``errorfile`` wants it: headers, then the JSON body
    ``{"error": {"code", "message"}}``."""
    code, message, retry_after = PAGES[status]
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [f"HTTP/1.1 {status} {_REASONS[status]}", "Content-Type: application/json",
               f"Content-Length: {len(body)}", "Cache-Control: no-cache"]
    if retry_after is not None:
        headers.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


def rewrite_config(text: str, pages: dict[int, Path]) -> str:
    """``text`` with each ``errorfile 502|503|504 <path>`` line pointing at ``pages``."""
    return _ERRORFILE.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{pages[int(m.group(2))]}",
                          text)


def rewrite(text: str, directory: Path, environ) -> str:
    """All the wrapper changes in Ray's config: the error pages, the request buffering of the
    replay, and the edge shedding of the apps :data:`haproxy_shedding.LIMITS_ENV` names (added
    last, so its rules come first: a refused request is not waited for)."""
    text = haproxy_replay.buffer_requests(rewrite_config(text, page_paths(directory)))
    shed = json.loads(environ.get(haproxy_shedding.LIMITS_ENV) or "{}")
    return haproxy_shedding.shed_requests(text, shed, haproxy_shedding.pages(directory))


def page_paths(directory: Path) -> dict[int, Path]:
    return {status: directory / f"{status}.http" for status in PAGES}


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically: clusters started side by side may install into the same directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


def install(directory: Path, real_binary: str | None = None) -> Path:
    """Write the pages and the wrapper into ``directory``; return the wrapper's path, the value
    for :data:`BINARY_ENV`. ``real_binary``: the HAProxy to exec (default: Ray's choice)."""
    if real_binary is None:
        from ray.serve._private.haproxy import get_haproxy_binary

        real_binary = get_haproxy_binary()
    directory.mkdir(parents=True, exist_ok=True)
    for status, path in page_paths(directory).items():
        _write(path, error_page(status))
    for protocol, path in haproxy_shedding.pages(directory).items():
        _write(path, haproxy_shedding.page_bodies()[protocol])
    wrapper = directory / "haproxy"
    _write(wrapper, (
        "#!/bin/sh\n"
        "# serve_app's JSON error pages, replay and shedding (serve_app/haproxy_errors.py)\n"
        f'exec "{sys.executable}" -m serve_app.haproxy_errors "{real_binary}" "{directory}" "$@"\n'
    ).encode(), 0o755)
    return wrapper


def _config_path(args: list[str]) -> Path | None:
    for flag, value in zip(args, args[1:]):
        if flag == "-f":
            return Path(value)
    return None


def main(argv: list[str]) -> None:
    """``python -m serve_app.haproxy_errors REAL_BINARY PAGES_DIR HAPROXY_ARGS...``: rewrite the
    config HAProxy is about to read, then become HAProxy.
    ``python -m serve_app.haproxy_errors install DIR``: write the pages and the wrapper into DIR
    (the Dockerfile does, for the pods of k8s/) and print the wrapper's path."""
    if argv[:1] == ["install"] and len(argv) == 2:
        print(install(Path(argv[1])))
        return
    real, directory, args = argv[0], Path(argv[1]), argv[2:]
    config = _config_path(args)
    if config is not None and config.is_file():
        import fcntl

        with open(f"{config}.lock", "w") as lock:  # the lock Ray writes the config under
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            text = config.read_text()
            rewritten = rewrite(text, directory, os.environ)
            if rewritten != text:
                config.write_text(rewritten)
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
