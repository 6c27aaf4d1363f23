"""The base of every configuration model (`r1core.config` composes them; a component that
other modules import, such as the code-reward sandbox, declares its own next to its code)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Strict(BaseModel):
    """Unknown fields are errors (a typo fails before training starts, naming the field), and
    assignments are validated like construction.

    A section given in part is read onto the field's own default, not onto its class's: with
    `r1_zero: GRPOConfig(steps=16)` as the pipeline's default, `r1_zero: {lr: 1e-4}` in a
    profile keeps 16 steps, and `sampling: {max_new_tokens: 8}` keeps the stage's temperature.
    Dict-valued fields (reward weights, shares) are replaced whole, so an entry can be left out."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _onto_field_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            given = data.get(name)
            if isinstance(given, dict) and (field.default_factory is not None or isinstance(field.default, BaseModel)):
                default = field.get_default(call_default_factory=True)
                if isinstance(default, BaseModel):
                    merged[name] = _onto(default, given)
        return merged


def _onto(default: BaseModel, given: dict) -> dict:
    """`given` over the fields of `default`, sub-models merged the same way, all else replaced."""
    out: dict[str, Any] = {name: getattr(default, name) for name in type(default).model_fields}
    for name, value in given.items():
        current = out.get(name)
        out[name] = _onto(current, value) if isinstance(current, BaseModel) and isinstance(value, dict) else value
    return out
