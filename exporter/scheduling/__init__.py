"""Reaching the scheduler through the Kubernetes API: DRA DeviceTaintRules, a Node taint, pod Events.

Each consumer reads verdicts through `HealthView` and transitions through the engine's transition
listener, and reconciles what it wants in the API from a thread of its own: the engine only wakes
it, so an unreachable API server can never delay a fence (docs/scheduling.md).
"""
