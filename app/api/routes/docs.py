"""The interactive API documentation, /docs (Swagger UI) and /redoc, served with their scripts
and styles from this server: FastAPI's defaults load them from a CDN, which leaves a blank page
on a machine without internet. The files come from the fastapi-offline package (Swagger UI 5,
ReDoc 2), of which only the static folder is used."""

from importlib.resources import files

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from app.api.problems import Problem

ASSETS = files("fastapi_offline") / "static"
ASSET_TYPES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
OPENAPI_URL = "/openapi.json"
TITLE = "BAERASE API"

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=TITLE,
                               swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs/assets/swagger-ui.css",
                               swagger_favicon_url="/docs/assets/favicon.png")


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url=OPENAPI_URL, title=TITLE, redoc_js_url="/docs/assets/redoc.standalone.js",
                          redoc_favicon_url="/docs/assets/favicon.png", with_google_fonts=False)


@router.get("/docs/assets/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSET_TYPES:  # a fixed list: no path from the request reaches the file system
        raise Problem(404, f"there is no /docs/assets/{name}")
    return FileResponse(str(ASSETS / name), media_type=ASSET_TYPES[name],
                        headers={"Cache-Control": "public, max-age=86400"})
