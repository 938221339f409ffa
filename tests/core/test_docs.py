from __future__ import annotations

from exporter.docgen import main


def test_generated_references_are_current() -> None:
    # Fails when a field or flag changed without `python -m exporter.docgen`.
    assert main(["--check"]) == 0
