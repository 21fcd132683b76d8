"""``python -m serve_app check CONFIG...``: validate Serve config files before deploying them;
``python -m serve_app compile CONFIG...``: build their compiled models ahead of the first start;
``python -m serve_app run CONFIG``: ``serve run`` with Ray's metrics on a fixed port;
``python -m serve_app dashboard``: regenerate the Grafana dashboard."""

from __future__ import annotations

import argparse
import sys

from serve_app.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate Serve config files (Ray's schema and serve_app's)")
    check.add_argument("configs", nargs="+")
    build = sub.add_parser("compile", help="build the compiled model artifacts a config's "
                           "classifiers will load (model.compile: true), if not built yet")
    build.add_argument("configs", nargs="+")
    sub.add_parser("run", add_help=False, help="serve run CONFIG with Ray's metrics on a fixed "
                   "port (python -m serve_app run --help)")
    dash = sub.add_parser("dashboard", help="write monitoring/grafana/serve_app.json")
    dash.add_argument("--check", action="store_true", help="fail if the file is not up to date")
    sub.add_parser("k8s", add_help=False, help="render | check the KubeRay manifests in k8s/ "
                   "(python -m serve_app k8s --help)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["k8s"]:  # its own parser: serve_app.k8s.main
        from serve_app import k8s as k8s_cli

        return k8s_cli.main(argv[1:])
    if argv[:1] == ["run"]:
        from serve_app import runner

        return runner.main(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "check":
        from serve_app.configfile import check_file

        status = 0
        for path in args.configs:
            try:
                for name, settings, batching in check_file(path):
                    models = ", ".join(m.id for m in settings.served)
                    print(f"{path}: {name}: ok (models {models}, default {settings.primary.id}; "
                          f"batch {batching.max_batch_size}/{batching.batch_wait_timeout_s}s)")
            except (ConfigError, OSError) as exc:
                print(exc, file=sys.stderr)
                status = 1
        return status
    if args.command == "compile":
        from serve_app.compiling import compile_configs

        return compile_configs(args.configs)
    if args.command == "dashboard":
        from serve_app import dashboard

        return dashboard.write(check=args.check)
    return 2


if __name__ == "__main__":
    sys.exit(main())
