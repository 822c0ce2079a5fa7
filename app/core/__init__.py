"""The service core, shared by the API and the worker runtime and importing neither: settings,
database, tables, artifact store, job lifecycle, job views, webhooks, logging, metrics and the
broker. Of the engine it uses only torch-free modules (config, errors, formats, sample_sizes)."""
