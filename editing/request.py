"""The user's edit request and its validation."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

MAX_FIELD_CHARS = 300  # longer subjects, relations or targets are refused


def _clean(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError(f"{field} is empty; type the {field} of the fact")
    if len(text) > MAX_FIELD_CHARS:
        raise ValueError(f"{field} is {len(text)} characters long; the limit is {MAX_FIELD_CHARS}")
    bad = sorted({repr(c) for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")})
    if bad:
        raise ValueError(f"{field} contains control or invisible characters: {', '.join(bad)}")
    return text


@dataclass(frozen=True)
class EditRequest:
    """A new fact: ``relation.format(subject)`` should be completed by ``target``.

    ``relation`` holds exactly one ``{}`` where the subject goes, e.g.
    ``"{} is located in the city of"``. Fields are stripped and validated on creation;
    an invalid request raises ``ValueError`` with a message a user can act on.
    """

    subject: str
    relation: str
    target: str
    layer: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "subject", _clean("subject", self.subject))
        object.__setattr__(self, "relation", _clean("relation", self.relation))
        object.__setattr__(self, "target", _clean("target", self.target))
        slots = self.relation.count("{}")
        if slots != 1:
            raise ValueError(
                f"relation must contain exactly one {{}} where the subject goes "
                f"(e.g. '{{}} is located in the city of'); found {slots}"
            )
        if "{" in self.relation.replace("{}", "") or "}" in self.relation.replace("{}", ""):
            raise ValueError("relation may contain no braces other than the single {}")
        if self.relation.endswith("{}") and self.relation.strip() == "{}":
            raise ValueError("relation needs words around {}, e.g. '{} is located in the city of'")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"layer must be a whole number, got {self.layer!r}")
        if self.target.lower() == self.subject.lower():
            raise ValueError("target must differ from the subject")

    @property
    def prompt(self) -> str:
        """The relation with the subject filled in."""
        return self.relation.replace("{}", self.subject)

    def check_layer(self, n_layers: int) -> None:
        if self.layer is not None and not 0 <= self.layer < n_layers:
            raise ValueError(f"layer {self.layer} is out of range; this model has layers 0 to {n_layers - 1}")

    def to_dict(self) -> dict[str, object]:
        return {"subject": self.subject, "relation": self.relation, "target": self.target, "layer": self.layer}
