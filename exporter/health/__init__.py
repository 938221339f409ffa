"""Per-GPU health: signals in, verdicts out. Knows nothing of gRPC or HTTP."""
