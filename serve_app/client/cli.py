"""``python -m serve_app.client IMAGE...``: classify image files from the command line.

One request per image (not one batch request): each image gets its own retries and its own
error, and any number of images works, whatever the service's per-batch file limit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from serve_app.client.api import DEFAULT_URL, Client
from serve_app.client.errors import ServeAppError
from serve_app.client.results import Classification

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.client",
        description="Classify image files with a running serve_app service. Sends one "
                    "request per image (retried on 502/503/504 and connection errors), so "
                    "one bad image does not fail the others.",
        epilog="Exit status: 0 when every image was classified, 1 when any failed, 2 for "
               "usage errors. Errors go to stderr as 'FILE: CODE: MESSAGE'.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument("--url", default=os.environ.get("SERVE_APP_URL", DEFAULT_URL),
                        help=f"service URL (default: $SERVE_APP_URL, else {DEFAULT_URL})")
    parser.add_argument("--model", default=None,
                        help="a named model (default: the service's default model)")
    parser.add_argument("--top-k", type=_positive_int, default=5,
                        help="labels per image (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of a table")
    parser.add_argument("--timeout", type=_positive_float, default=30.0,
                        help="seconds per request attempt (default: %(default)s)")
    return parser


def _classify_all(client: Client, paths: Sequence[str], top_k: int,
                  model: str | None) -> list[tuple[str, Classification | ServeAppError]]:
    outcomes: list[tuple[str, Classification | ServeAppError]] = []
    for path in paths:
        try:
            outcome: Classification | ServeAppError = client.classify(
                path, top_k=top_k, model=model)
        except OSError as exc:  # unreadable file: that image fails, the others go on
            outcome = ServeAppError(exc.strerror or str(exc), status=None,
                                    code="unreadable_file")
        except ServeAppError as exc:
            outcome = exc
        outcomes.append((path, outcome))
    return outcomes


def _print_table(outcomes: Sequence[tuple[str, Any]], out: TextIO) -> None:
    header = ("file", "rank", "label", "class_id", "score")
    rows = [(path, str(rank), p.label, str(p.class_id), f"{p.score:.4f}")
            for path, result in outcomes if isinstance(result, Classification)
            for rank, p in enumerate(result.predictions, start=1)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {1, 3, 4}  # numbers line up on the right
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip(), file=out)


def _error_line(path: str, error: ServeAppError) -> str:
    """``FILE: CODE: MESSAGE``, then what helps to follow it up: status, attempts, id."""
    details = [f"HTTP {error.status}"] if error.status is not None else []
    if error.attempts > 1:
        details.append(f"{error.attempts} attempts")
    if error.request_id:
        details.append(f"request_id {error.request_id}")
    suffix = f" ({', '.join(details)})" if details else ""
    return f"{path}: {error.code}: {error.message}{suffix}"


def _as_json(url: str, outcomes: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    items = []
    for path, result in outcomes:
        if isinstance(result, Classification):
            items.append({"file": path, "model": result.model, "request_id": result.request_id,
                          "predictions": [{"label": p.label, "class_id": p.class_id,
                                           "score": p.score} for p in result.predictions]})
        else:
            items.append({"file": path, "error": {"code": result.code,
                                                  "message": result.message,
                                                  "status": result.status,
                                                  "request_id": result.request_id}})
    return {"url": url, "ok": all("error" not in i for i in items), "results": items}


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (argparse's own exits included, never raises
    SystemExit), so tests can call it in-process."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    with Client(args.url, timeout=args.timeout) as client:
        outcomes = _classify_all(client, args.images, args.top_k, args.model)
    for path, result in outcomes:
        if isinstance(result, ServeAppError):
            print(_error_line(path, result), file=err)
    if args.json:
        json.dump(_as_json(args.url, outcomes), out, indent=2)
        out.write("\n")
    elif any(isinstance(result, Classification) for _, result in outcomes):
        _print_table(outcomes, out)
    failed = any(isinstance(result, ServeAppError) for _, result in outcomes)
    return EXIT_FAILED if failed else EXIT_OK
