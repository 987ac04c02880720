"""The vendored Swagger UI, stored gzip-compressed and served as is with `Content-Encoding: gzip`.

Compressed it is a quarter of the size in the package and on the wire; every browser accepts gzip.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from litestar import Controller, Response, get
from litestar.params import Parameter

from loyalty.lib.errors import NOT_FOUND, ProblemError

ASSETS_DIR = Path(__file__).parent / "static" / "swagger-ui"
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


@cache
def _compressed(name: str) -> bytes | None:
    """The file's gzip bytes, read once; None for anything that is not one of the shipped assets."""
    path = ASSETS_DIR / f"{name}.gz"
    if "/" in name or name.startswith(".") or not path.is_file():
        return None
    return path.read_bytes()


class SchemaAssetsController(Controller):
    path = "/schema-assets/swagger-ui"
    include_in_schema = False

    @get("/{name:str}", cache_control=None)
    async def asset(self, name: str = Parameter(max_length=64)) -> Response[bytes]:
        """A Swagger UI file."""
        body = _compressed(name)
        media_type = MEDIA_TYPES.get(Path(name).suffix)
        if body is None or media_type is None:
            raise ProblemError(NOT_FOUND, f"No asset {name!r}")
        return Response(
            body,
            media_type=media_type,
            headers={"Content-Encoding": "gzip", "Cache-Control": "public, max-age=86400", "Vary": "Accept-Encoding"},
        )
