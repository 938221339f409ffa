"""Pod label keys -> label names: sanitised, allowlisted, never colliding."""

from __future__ import annotations

from exporter.pods.podlabels import RESERVED_LABELS, compile_allowlist, pod_label_pairs, sanitize_label_name


def test_sanitize() -> None:
    assert sanitize_label_name("app.kubernetes.io/name") == "app_kubernetes_io_name"
    assert sanitize_label_name("9lives") == "_9lives"
    assert sanitize_label_name("team") == "team"


def test_reserved_collisions_and_dunder_are_dropped() -> None:
    labels = [("pod", "x"), ("Hostname", "h"), ("__meta", "m"), ("a-b", "1"), ("a.b", "2"), ("z", "3")]
    assert pod_label_pairs(labels, None) == [("a_b", "1"), ("z", "3")]  # the first of two that collide wins
    assert {"container", "namespace", "pod", "vgpu", "pod_uid", "UUID", "gpu"} <= RESERVED_LABELS


def test_allowlist_is_a_full_match_on_the_key() -> None:
    allow = compile_allowlist("app.*|team")
    assert pod_label_pairs([("app.kubernetes.io/name", "n"), ("teams", "t"), ("team", "u")], allow) == [
        ("app_kubernetes_io_name", "n"),
        ("team", "u"),
    ]
    assert compile_allowlist(None) is None and compile_allowlist("") is None
