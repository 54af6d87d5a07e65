"""The image's HEALTHCHECK: GET /health on the port the server was started with. The port is read
from the server's own command line (PID 1), so `docker run expertflow --port 9000` stays healthy
without a second setting; a port set only in a --config file needs EXPERTFLOW_PORT."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path


def server_port() -> int:
    if "EXPERTFLOW_PORT" in os.environ:
        return int(os.environ["EXPERTFLOW_PORT"])
    argv = Path("/proc/1/cmdline").read_bytes().decode().split("\0")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_known_args(argv)[0].port


def main() -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server_port()}/health", timeout=4) as r:
            return 0 if r.status == 200 else 1
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
