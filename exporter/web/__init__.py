"""The HTTP endpoint's protection: exporter-toolkit's web configuration (TLS, mTLS, basic auth, headers,
rate limit), its loader, and the HTTP limits. Imported only by exporter/server.py; PyYAML, ssl and bcrypt
only when a web configuration file is given."""
