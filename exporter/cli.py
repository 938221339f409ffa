"""Command line entry point: the daemon, or the `health` subcommands."""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXIT_USAGE = 2  # bad flags, bad counters file, bad policy: like argparse
EXIT_STARTUP = 1  # the environment failed us (NVML missing, port busy)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["health"]:
        from exporter.health.cli import main as health_main

        return health_main(args[1:])
    from exporter.app import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
