"""The device plugin's settings from the command line: one function for the in-process plugin
(`exporter/app.py`) and the plugin's own process (`exporter/deviceplugin/process.py`)."""

from __future__ import annotations

from exporter.config import Config, ConfigError
from exporter.deviceplugin.config import DevicePluginConfig


def plugin_config(cfg: Config) -> DevicePluginConfig:
    """The device plugin's settings from the flags, checked (the in-process plugin uses the same).
    Raises ConfigError (exit 2): a bad value, or a CDI mode without nvidia-ctk to write the spec."""
    from exporter.deviceplugin.cdi import check_nvidia_ctk

    try:
        config = DevicePluginConfig(
            resource_name=cfg.resource_name,
            plugin_dir=cfg.device_plugin_dir,
            mig_strategy=cfg.mig_strategy,
            replicas=cfg.replicas,
            device_list_strategy=cfg.device_list_strategy,
            device_id_strategy=cfg.device_id_strategy,
            pass_device_specs=cfg.pass_device_specs,
            dev_root=cfg.dev_root,
            mig_minors_file=cfg.mig_minors_file,
            cdi_annotation_prefix=cfg.cdi_annotation_prefix,
            cdi_kind=cfg.cdi_kind,
            nvidia_ctk_path=cfg.nvidia_ctk_path,
            cdi_generate_args=cfg.cdi_generate_args,
            cdi_spec_file=cfg.cdi_spec_file,
            cdi_spec_dirs=cfg.cdi_spec_dirs,
            cdi_generate_timeout_s=cfg.cdi_generate_timeout_s,
        )
        if config.generates_cdi_spec:  # refuse to start rather than hand out names no spec defines
            check_nvidia_ctk(config.nvidia_ctk_path)
    except ValueError as exc:
        raise ConfigError(f"device plugin: {exc}") from None
    return config
