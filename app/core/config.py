"""Service settings, read from BAERASE_* environment variables (and a .env file, if present).

The defaults are the embedded mode: SQLite and artifacts under ./baerase-data, no broker. Point
BAERASE_DATABASE_URL at PostgreSQL (postgresql+psycopg://...) and BAERASE_BROKER_URL at Redis for
production: the API then queues Celery tasks, and `baerase worker` runs them (worker/celery_worker.py).
"""

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024**2
GiB = 1024**3
HOUR = 3600


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BAERASE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("baerase-data"), description="home of the default database and artifacts")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite in data_dir")
    artifact_dir: Path | None = Field(None, description="uploads and results; default: data_dir/artifacts")
    artifact_store_url: str | None = Field(None, description="s3://BUCKET/PREFIX: keep the artifacts in S3 "
                                           "or an S3-compatible store instead of artifact_dir, so workers "
                                           "on several hosts need no shared disk (credentials from the "
                                           "usual AWS_* variables); unset or empty: artifact_dir")
    s3_endpoint_url: str | None = Field(None, description="the S3 API of an S3-compatible server (MinIO, "
                                        "Ceph, R2, ...), for the artifact store and s3:// inputs; unset: AWS")
    broker_url: str | None = Field(None, description="Celery broker (production mode); unset or empty: "
                                   "workers poll the database")
    api_key: SecretStr | None = Field(None, description="bootstraps this key for api_key_tenant at start-up")
    api_key_tenant: str = "local"
    max_model_bytes: int = Field(1024 * MiB, ge=1, description="largest model upload (413 above)")
    max_samples_bytes: int = Field(1024 * MiB, ge=1, description="largest sample-set upload (413 above)")
    max_active_jobs_per_tenant: int = Field(10, ge=1, description="jobs a tenant may have queued "
                                            "and running at once (429 beyond)")
    api_threads: int = Field(40, ge=1, description="threads that run the API's blocking work "
                             "(database, files); its database pool holds as many connections")
    status_cache_s: float = Field(1.0, ge=0, description="GET /jobs/{id} answers from memory for "
                                  "this long after a read: a status at most this old; 0: never")
    worker_poll_interval_s: float = Field(1.0, gt=0, description="how often an idle polling worker "
                                          "looks for jobs (no broker)")
    job_max_attempts: int = Field(3, ge=1, description="runs a job gets before a lost worker fails it")
    job_soft_time_limit_s: float = Field(4 * HOUR, gt=0, description="a job still running then fails "
                                         "(error code time_limit), on every kind of worker")
    job_time_limit_s: float = Field(4 * HOUR + 300, gt=0, description="Celery kills a job's process then")
    job_memory_limit_bytes: int = Field(16 * GiB, ge=0, description="a job whose engine process uses "
                                        "more memory fails (resource_limit); 0: no limit")
    job_cpu_time_limit_s: float = Field(0, ge=0, description="a job whose engine process uses more "
                                        "CPU seconds, all threads together, fails (resource_limit); "
                                        "0: no limit but the wall-time one")
    sandbox_required: bool = Field(True, description="a worker refuses to start (and to run jobs) when "
                                   "the kernel cannot confine the engine: no Landlock or no seccomp "
                                   "(docs/deploy.md); false: it runs them with a warning")
    heartbeat_interval_s: float = Field(10.0, gt=0, description="how often a running job's process "
                                        "stamps heartbeat_at")
    heartbeat_timeout_s: float = Field(120.0, gt=0, description="a running job whose heartbeat is older "
                                       "has lost its worker")
    sweep_interval_s: float = Field(30.0, gt=0, description="how often each worker's sweeper runs")
    resend_queued_after_s: float = Field(900.0, gt=0, description="a queued job waiting longer gets "
                                         "its Celery message sent again")
    artifact_retention_days: float = Field(30.0, gt=0, le=3650, description="a finished job's files "
                                           "(uploads, sanitized model, trigger pictures) are deleted this "
                                           "long after it finished; its record and report stay, and its "
                                           "downloads answer 410 Gone")
    idempotency_retention_hours: float = Field(24.0, gt=0, le=24 * 365, description="an Idempotency-Key "
                                               "is remembered this long; a retry after it makes a new job")
    webhook_secret_grace_s: float = Field(86400.0, ge=0, le=30 * 86400, description="after a rotation "
                                          "(POST /webhook-secret/rotate) the old secret also signs "
                                          "webhooks this long, so receivers can switch over")
    db_retry_s: float = Field(300.0, ge=0, description="how long a worker retries a status write "
                                                       "while the database is unreachable")
    webhook_max_attempts: int = Field(8, ge=1, description="deliveries of one webhook message at most")
    webhook_retry_base_s: float = Field(30.0, gt=0, description="wait after the first failed "
                                        "delivery; doubled after each further one")
    webhook_timeout_s: float = Field(10.0, gt=0, description="how long a webhook receiver may take")
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        [], description="comma-separated host names, addresses or networks (10.0.0.0/8) that webhooks "
        "may reach although they are not public; by default only public addresses")
    input_url_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        [], description="comma-separated host names, addresses or networks that model_url and "
        "samples_url may fetch from over http(s) although they are not public; by default only public "
        "addresses")
    input_buckets: Annotated[list[str], NoDecode] = Field(
        [], description="comma-separated buckets (s3://NAME, gs://NAME) whose objects model_url and "
        "samples_url may name: they are read with the service's own credentials; by default none "
        "(tenants send presigned https:// URLs)")
    input_url_timeout_s: float = Field(300.0, gt=0, description="how long fetching one model_url or "
                                       "samples_url may take at most")
    mlflow_tracking_uri: str | None = Field(None, description="the MLflow tracking server (http://host:5000) "
                                            "whose models:/ and runs:/ URIs model_url may name, and where "
                                            "their sanitized models are registered; unset: such URIs are "
                                            "refused (docs/integrations.md, MLflow)")
    public_url: str | None = Field(None, description="the URL clients reach the API at "
                                   "(https://baerase.example.com), for links back to a job from elsewhere "
                                   "(the MLflow tags); unset: none")
    log_format: Literal["text", "json"] = Field("text", description="serve and worker logs: text, or "
                                                "json (one object a line, with job_id and tenant)")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    worker_metrics_port: int | None = Field(None, ge=1, le=65535, description="a worker serves "
                                            "Prometheus metrics on this port; unset: none")

    @field_validator("webhook_allowed_hosts", "input_url_allowed_hosts", "input_buckets", mode="before")
    @classmethod
    def split_hosts(cls, value):
        if isinstance(value, str):  # from the environment: a comma-separated list
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @field_validator("artifact_store_url")
    @classmethod
    def check_store_url(cls, value):
        if value and not re.fullmatch(r"s3://[^/]+(/.*)?", value):
            raise ValueError("artifact_store_url must be s3://BUCKET or s3://BUCKET/PREFIX")
        return value

    @model_validator(mode="after")
    def fill_paths(self):
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'baerase.db'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
        self.broker_url = self.broker_url or None  # BAERASE_BROKER_URL= (empty) means no broker
        self.artifact_store_url = self.artifact_store_url or None
        self.s3_endpoint_url = self.s3_endpoint_url or None
        return self

    @model_validator(mode="after")
    def check_time_limits(self):
        if self.job_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError("job_time_limit_s must exceed job_soft_time_limit_s, so that a job can "
                             "fail cleanly at the soft limit before Celery kills its process")
        # A live job misses a heartbeat or two when the database hiccups; only a long silence
        # means its worker is gone.
        if self.heartbeat_timeout_s < 3 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be at least 3 x heartbeat_interval_s")
        return self

    @property
    def broker_visibility_timeout_s(self) -> float:
        """How long Redis waits for the ack of a delivered message before delivering it again.
        Longer than the hard time limit (Celery's advice for late acks), so a running job's message
        is never handed to a second worker; the database claim would stop a duplicate anyway."""
        return self.job_time_limit_s + HOUR
