"""The worker runtime: the runner (runner.py), the sweeper (sweeper.py), the sandbox that runs the
engine (sandbox.py, confine.py) and the Celery worker (celery_worker.py); and the engine itself
(worker/sanitize), which imports nothing from the service."""
