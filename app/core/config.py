"""Service settings, read from BAERASE_* environment variables (and a .env file, if present).

The defaults are the embedded mode: SQLite and artifacts under ./baerase-data, no broker. Point
BAERASE_DATABASE_URL at PostgreSQL (postgresql+psycopg://...) for production.
"""

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024**2


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BAERASE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("baerase-data"), description="home of the default database and artifacts")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite in data_dir")
    artifact_dir: Path | None = Field(None, description="uploads and results; default: data_dir/artifacts")
    broker_url: str | None = Field(None, description="Celery broker (production mode); /readyz checks it")
    api_key: SecretStr | None = Field(None, description="bootstraps this key for api_key_tenant at start-up")
    api_key_tenant: str = "local"
    max_model_bytes: int = Field(1024 * MiB, ge=1, description="largest model upload (413 above)")
    max_samples_bytes: int = Field(1024 * MiB, ge=1, description="largest sample-set upload (413 above)")
    worker_poll_interval_s: float = Field(1.0, gt=0, description="how often an idle worker looks for jobs")

    @model_validator(mode="after")
    def fill_paths(self):
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'baerase.db'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
        return self
