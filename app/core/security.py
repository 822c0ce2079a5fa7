"""API keys: random secrets shown once, stored only as sha256 hashes (a key has 256 bits of
entropy, so a fast hash is enough), each belonging to one tenant. Each tenant also has a webhook
signing secret (see app/core/webhooks.py), which it may rotate: the previous one keeps signing
alongside the new one for a grace period."""

import base64
import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "bae_"
WEBHOOK_SECRET_PREFIX = "whsec_"  # the Standard Webhooks spelling: whsec_<base64 of the key bytes>


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def rotate_webhook_secret(session: Session, tenant_id: int, grace_s: float) -> Tenant:
    """Issues a new webhook secret; the current one becomes the previous, which also signs
    webhooks for ``grace_s`` more seconds. Returns the tenant as it now is."""
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(
        previous_webhook_secret=Tenant.webhook_secret, webhook_secret=new_webhook_secret(),
        previous_secret_retires_at=utcnow() + timedelta(seconds=grace_s)))
    session.commit()
    return session.get(Tenant, tenant_id, populate_existing=True)


def signing_secrets(tenant: Tenant, now: datetime) -> list[str]:
    """The secrets that sign the tenant's webhooks now: the current one, and the previous one
    until it retires."""
    if tenant.previous_webhook_secret and tenant.previous_secret_retires_at and now < tenant.previous_secret_retires_at:
        return [tenant.webhook_secret, tenant.previous_webhook_secret]
    return [tenant.webhook_secret]


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
