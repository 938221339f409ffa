"""gpu-health-exporter: a per-node GPU health and metrics exporter for Kubernetes."""

__version__ = "0.1.0"
