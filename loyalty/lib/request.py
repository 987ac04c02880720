"""The request class: a JSON body the decoder cannot take is the client's malformed request, never a 500."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.exceptions import SerializationException


class JsonRequest(Request[Any, Any, Any]):
    """Litestar's request, with the two decoder failures it lets escape turned into its own 400.

    Litestar answers undecodable JSON with 400 only for the decoder's own error type. Nesting deep enough to reach
    the interpreter's recursion limit (a few hundred levels, e.g. ``[[[[...]]]]`` in any field) raises
    ``RecursionError``, and bytes that are not UTF-8 raise ``UnicodeDecodeError``; both are the sender's fault.
    """

    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise SerializationException("JSON is malformed: nested too deeply") from None
        except UnicodeDecodeError as error:
            raise SerializationException(f"JSON is malformed: not UTF-8 (byte {error.start})") from None
