"""The HTTP API: routes (app/api/routes), what they depend on, upload parsing, submission and
queries, and problem+json errors. It changes a job's state only through app/core/lifecycle.py."""
