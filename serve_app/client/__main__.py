"""``python -m serve_app.client``: see serve_app/client/cli.py."""

import sys

from serve_app.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
