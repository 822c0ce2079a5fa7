"""API keys: random secrets shown once, stored only as sha256 hashes (a key has 256 bits of
entropy, so a fast hash is enough), each belonging to one tenant. Each tenant also has a webhook
signing secret (see app/core/webhooks.py)."""

import base64
import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.models import ApiKey, Tenant

KEY_PREFIX = "bae_"
WEBHOOK_SECRET_PREFIX = "whsec_"  # the Standard Webhooks spelling: whsec_<base64 of the key bytes>


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def tenant_named(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name, webhook_secret=new_webhook_secret())
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant_name: str) -> str:
    """Creates a key for the tenant (and the tenant, if new); returns the key, shown only once."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    add_api_key(session, tenant_name, key)
    return key


def add_api_key(session: Session, tenant_name: str, key: str) -> None:
    session.add(ApiKey(tenant=tenant_named(session, tenant_name), key_hash=hash_key(key), prefix=key[:12]))
    session.commit()


def ensure_api_key(session: Session, tenant_name: str, key: str) -> None:
    """Registers a key given in the environment (BAERASE_API_KEY), once."""
    if session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key))) is not None:
        return
    try:
        add_api_key(session, tenant_name, key)
    except IntegrityError:  # another process registered it at the same moment
        session.rollback()


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    api_key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return api_key.tenant if api_key else None
