# syntax=docker/dockerfile:1
# gpu-health-exporter image: NVML comes from the host driver (NVIDIA container toolkit), so the image
# carries only Python and the project.
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY podresources ./podresources
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/python -m compileall -q /opt/venv

FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="gpu-health-exporter" \
      org.opencontainers.image.description="Per-node GPU metrics and health exporter for Kubernetes" \
      org.opencontainers.image.source="https://github.com/gpu-health-exporter/gpu-health-exporter" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility
# Non-root by default. The Kubernetes manifests run it as root (with no capabilities) only where the
# kubelet's root-owned sockets require it: PodResources and the device plugin directory.
USER 65532:65532
EXPOSE 9400
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/health', timeout=4)"]
ENTRYPOINT ["gpu-health-exporter"]
