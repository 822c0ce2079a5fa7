"""The service fixtures of tests/api (both databases, a client, an API key, ``submit``), for the
security tests that go through the service."""

from tests.api.conftest import (  # noqa: F401  (fixtures, found by name)
    app,
    auth,
    client,
    database_url,
    other_auth,
    postgres_url,
    samples,
    sessions,
    settings,
    submit,
    torchscript_model,
    webhook_receiver,
)
