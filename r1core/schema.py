"""The base of every configuration model (`r1core.config` composes them; a component that
other modules import, such as the code-reward sandbox, declares its own next to its code)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown fields are errors (a typo fails before training starts, naming the field), and
    assignments are validated like construction."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
