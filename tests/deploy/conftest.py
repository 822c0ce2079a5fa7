# The service fixtures of tests/api (a migrated database on SQLite and PostgreSQL, an app, a
# client, an API key, submit), shared here without moving them.
from tests.api.conftest import (app, auth, client, database_url, postgres_url, samples,  # noqa: F401
                                sessions, settings, submit, torchscript_model)
