"""gpu-health-exporter: a per-node GPU health and metrics exporter for Kubernetes."""

from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    """The package's version: pyproject.toml's `version`, through the installed metadata.

    Without metadata (the source tree on PYTHONPATH, never installed) it is read from
    pyproject.toml next to the package, if there is one.
    """
    try:
        return version("gpu-health-exporter")
    except PackageNotFoundError:
        pass
    import re
    from pathlib import Path

    try:
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    except OSError:
        return "0+unknown"
    m = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    return m.group(1) if m else "0+unknown"


__version__ = _version()
