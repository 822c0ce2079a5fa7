"""The service: the API (app/api, app/ui), the `baerase` command (app/cli), the Python client
(app/client.py) and the service core (app/core) that the worker runtime (worker/) shares too.
The import-linter contracts in pyproject.toml say which layer may import which."""
