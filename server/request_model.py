"""The base of every request body: strict types, unknown fields ignored with a warning."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger(__name__)


class RequestModel(BaseModel):
    """Unknown fields are ignored with a warning in the server log, as vLLM does: OpenAI clients
    send new optional fields long before servers learn them, and refusing would break them."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {f.alias or name for name, f in cls.model_fields.items()}
            unknown = sorted(set(data) - known)
            if unknown:
                logger.warning("%s: ignoring unknown fields: %s", cls.__name__, ", ".join(unknown))
        return data
