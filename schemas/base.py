"""The strict model base: every wire and stored object is frozen and closed.

``extra="forbid"`` makes an unknown field an error instead of silently
ignored data, and ``frozen=True`` lets the pure cores share models freely.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict

PROTOCOL_VERSION: Final = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)
