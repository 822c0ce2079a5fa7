"""Where a webhook may be sent: only to public addresses, unless the operator lists a host.

A tenant chooses its webhook_url, and a worker POSTs to it; without these checks any tenant could
make the workers reach the database, the cloud metadata service or other internal hosts, and read
what they answered in GET /jobs/{id}/webhooks. The host is resolved and every address it has must
be public (or allowed by ``webhook_allowed_hosts``): at submit time, to refuse the job, and again
just before each delivery, which then connects to the address it checked (DNS may answer
differently the second time).

The same rules guard the job inputs fetched by URL (app/core/remote_inputs.py), with their own
list of allowed hosts.
"""

import ipaddress
import socket
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeUrl(ValueError):
    """The URL may not be called; the message says why."""


@dataclass(frozen=True)
class CheckedTarget:
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


def check_webhook_url(text: str, allowed_hosts: list[str]) -> CheckedTarget:
    """Parses, resolves and checks a webhook URL; raises UnsafeUrl."""
    url = parse_http_url(text)
    if url.userinfo:
        # They would be stored, logged and shown back; the signature authenticates the sender.
        raise UnsafeUrl("it must not carry credentials (user:password@); verify the "
                        "webhook-signature header instead")
    return check_addresses(url, allowed_hosts, "BAERASE_WEBHOOK_ALLOWED_HOSTS")


def parse_http_url(text: str) -> httpx.URL:
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as e:
        raise UnsafeUrl(f"it is not a valid URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UnsafeUrl("it must be an http:// or https:// URL with a host")
    return url


def check_addresses(url: httpx.URL, allowed_hosts: list[str], allow_setting: str) -> CheckedTarget:
    """Resolves the URL's host; every address must be public or allowed (``allowed_hosts``, which
    the operator sets with ``allow_setting``)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UnsafeUrl(f"its host {url.host} does not resolve ({e})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    refused = [a for a in addresses if not (is_public(a) or is_allowed(url.host, a, allowed_hosts))]
    if refused:
        raise UnsafeUrl(f"its host {url.host} resolves to {refused[0]}, which is not a public "
                        "address (loopback, private, link-local, multicast or reserved); the "
                        f"operator can allow internal hosts with {allow_setting}")
    return CheckedTarget(url, addresses)


def send_checked(client: httpx.Client, target: CheckedTarget, method: str, *, stream: bool = False,
                 headers: dict[str, str] | None = None, **request) -> httpx.Response:
    """Sends a request to the addresses just checked, not to whatever a second DNS lookup would
    answer, trying each in turn until one accepts the connection (else the last ConnectError is
    raised). The host name still goes into the Host header and TLS (SNI and certificate check).
    ``client`` should not follow redirects (they could point anywhere) nor trust the environment
    (a proxy from it would make its own connection)."""
    headers = {"host": target.url.netloc.decode("ascii")} | (headers or {})
    for address in target.addresses:
        try:
            return client.send(client.build_request(method, target.url.copy_with(host=str(address)),
                                                    headers=headers, extensions={"sni_hostname": target.url.host},
                                                    **request), stream=stream)
        except httpx.ConnectError as e:  # the host's next address may answer
            error = e
    raise error


def without_credentials(text: str) -> str:
    """The URL with any user:password@ left out, for logs and the delivery log."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        return "(an invalid URL)"
    return str(url.copy_with(username=None, password=None)) if url.userinfo else text
