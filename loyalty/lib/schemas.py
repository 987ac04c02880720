"""The base every API schema shares, and the field types several domains use."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from litestar.params import Parameter
from pydantic import BaseModel, ConfigDict, StringConstraints


class Schema(BaseModel):
    """API shapes: unknown fields are refused so a typo is an error, not silently ignored data."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, str_strip_whitespace=False)

    def content_hash(self) -> str:
        """SHA-256 of the canonical JSON form: equal content, equal hash, whatever the key order sent."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# A storefront's own identifier: printable text, no control characters (they break logs and CSV exports).
ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]
# The same rule for ids in paths, where Litestar checks its own parameter constraints.
ExternalIdPath = Annotated[str, Parameter(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]
# Our own ids (offer_id, run_id, ...) are 64-bit columns: a larger number is refused before it reaches the database.
MAX_ID = 2**63 - 1
