"""Alembic environment: the database is the app's (BAERASE_DATABASE_URL) unless `app.core.db`
passes another URL. Runs on PostgreSQL and SQLite alike (batch mode for SQLite's ALTERs)."""

from alembic import context

from app.core.config import Settings
from app.core.db import make_engine
from app.core.models import Base

config = context.config
database_url = config.attributes.get("database_url") or Settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=database_url, target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url)
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch mode rebuilds a table by copying it and dropping the original; with foreign
            # keys enforced, that drop would cascade-delete the rows that refer to it (a tenant's
            # jobs). The pragma only works outside a transaction: end the one SQLAlchemy began for
            # it, or Alembic would run inside that one and never commit. This connection is
            # closed, pragma and all, when the migration ends.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
