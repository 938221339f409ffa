"""Command line entry point: the daemon, the `health` subcommands, `device-plugin` (the kubelet
device plugin as its own process, exporter/deviceplugin/process.py) or `device-plugin-proxy` (the
health proxy in front of NVIDIA's plugin, exporter/proxy/process.py); exit codes and signals.

Imports go one way: cli -> app (the wiring) -> parts. The daemon's modules are imported only
when the daemon runs, so `health list|clear` stays light.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

EXIT_USAGE = 2  # bad flags, bad counters file, bad policy: like argparse
EXIT_STARTUP = 1  # the environment failed us (NVML missing, port busy)


def run(argv: Sequence[str]) -> int:
    """The daemon: parse the flags, start every part, run until SIGTERM/SIGINT."""
    import structlog

    from exporter.app import App
    from exporter.backend import BackendError
    from exporter.config import ConfigError, parse_config
    from exporter.counters import CountersError
    from exporter.logs import configure_logging

    log = structlog.get_logger("exporter.app")
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        print(f"gpu-health-exporter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(cfg.log_format, cfg.log_level)
    try:
        app = App(cfg)
    except (ConfigError, CountersError) as exc:
        print(f"gpu-health-exporter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()

    def _terminate(signum: int, _frame: FrameType | None) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    def _hup(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=app.reload_counters, name="reload", daemon=True).start()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGHUP, _hup)
    try:
        app.start()
    except BackendError as exc:  # NVML unusable, or another daemon owns the state dir
        log.error("startup_failed", error=str(exc))
        print(f"gpu-health-exporter: {exc}", file=sys.stderr)
        app.stop()
        return EXIT_STARTUP
    except OSError as exc:
        log.error("startup_failed", error=str(exc))
        print(f"gpu-health-exporter: cannot listen on {cfg.address}: {exc}", file=sys.stderr)
        app.stop()
        return EXIT_STARTUP
    except ConfigError as exc:
        print(f"gpu-health-exporter: {exc}", file=sys.stderr)
        app.stop()
        return EXIT_USAGE
    while not stop.wait(1.0):
        pass
    app.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["health"]:
        from exporter.health.cli import main as health_main

        return health_main(args[1:])
    if args[:1] == ["device-plugin"]:
        from exporter.deviceplugin.process import run as plugin_run

        return plugin_run(args[1:])
    if args[:1] == ["device-plugin-proxy"]:
        from exporter.proxy.process import run as proxy_run

        return proxy_run(args[1:])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
