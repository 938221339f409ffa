"""The generator behind deploy/generate.py, one module per kind of output.

- `paths`:      where sources and outputs live.
- `yamltext`:   the YAML dumper the outputs share.
- `version`:    pyproject.toml's version -> Chart.yaml, values-full.yaml.
- `rules`:      the Prometheus rules file -> the chart's PrometheusRule template (thresholds from values).
- `manifests`:  the chart rendered with PLAIN_VALUES -> deploy/kubernetes/.
- `dashboards`: the Grafana dashboards (one module each; `panels` is the panel and board builder).
"""
