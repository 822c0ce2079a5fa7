"""Where a webhook may be sent: only to public addresses, unless the operator lists a host.

A tenant chooses its webhook_url, and a worker POSTs to it; without these checks any tenant could
make the workers reach the database, the cloud metadata service or other internal hosts, and read
what they answered in GET /jobs/{id}/webhooks. The host is resolved and every address it has must
be public (or allowed by ``webhook_allowed_hosts``): at submit time, to refuse the job, and again
just before each delivery, which then connects to the address it checked (DNS may answer
differently the second time).
"""

import ipaddress
import socket
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeWebhookUrl(ValueError):
    """The URL may not be called; the message says why."""


@dataclass(frozen=True)
class WebhookTarget:
    url: httpx.URL  # as the tenant gave it: its host goes into the Host header and TLS
    addresses: list[IPAddress]  # what the host resolved to, each checked


def is_public(address: IPAddress) -> bool:
    # An IPv4 address written as IPv6 (::ffff:127.0.0.1) reaches the IPv4 host.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not (
        address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
        or address.is_reserved or address.is_unspecified)


def is_allowed(host: str, address: IPAddress, allowed_hosts: list[str]) -> bool:
    """Whether the operator's list names this host, or a network that holds this address."""
    for entry in allowed_hosts:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # not an address or network: a host name
            if host.rstrip(".").lower() == entry.rstrip(".").lower():
                return True
    return False


def check_webhook_url(text: str, allowed_hosts: list[str]) -> WebhookTarget:
    """Parses, resolves and checks a webhook URL; raises UnsafeWebhookUrl."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as e:
        raise UnsafeWebhookUrl(f"it is not a valid URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UnsafeWebhookUrl("it must be an http:// or https:// URL with a host")
    if url.userinfo:
        # They would be stored, logged and shown back; the signature authenticates the sender.
        raise UnsafeWebhookUrl("it must not carry credentials (user:password@); verify the "
                               "webhook-signature header instead")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UnsafeWebhookUrl(f"its host {url.host} does not resolve ({e})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    refused = [a for a in addresses if not (is_public(a) or is_allowed(url.host, a, allowed_hosts))]
    if refused:
        raise UnsafeWebhookUrl(f"its host {url.host} resolves to {refused[0]}, which is not a public "
                               "address (loopback, private, link-local, multicast or reserved); the "
                               "operator can allow internal hosts with BAERASE_WEBHOOK_ALLOWED_HOSTS")
    return WebhookTarget(url, addresses)


def without_credentials(text: str) -> str:
    """The URL with any user:password@ left out, for logs and the delivery log."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        return "(an invalid URL)"
    return str(url.copy_with(username=None, password=None)) if url.userinfo else text
