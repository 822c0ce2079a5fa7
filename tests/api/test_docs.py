"""/docs and /redoc work without internet: their pages load scripts and styles from this server
only (tests/clients/test_ui.py renders them in Chromium)."""

import re

import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_documentation_pages_load_nothing_from_elsewhere(client, page):
    html = client.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    urls = re.findall(r'(?:src|href|url)\s*[=:(]\s*["\']([^"\']+)', html.text)
    assert urls and all(url.startswith("/") for url in urls), urls
    for url in urls:
        if url != "/openapi.json":
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url


def test_only_the_listed_assets_are_served(client):
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    for name in ("core.py", "..%2f__init__.py", "LICENSE"):
        assert client.get(f"/docs/assets/{name}").status_code == 404
