"""What the service's operations return: an applied edit's checks, and a verification of the applied edits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chat_app.probes import holds
from db import EditRecord


@dataclass(frozen=True)
class Probe:
    prompt: str
    kind: str  # edited / paraphrase / neighbour
    expected: str  # the target, or for a neighbour its answer before the edit
    before: str | None  # None: still to be answered (``EditService.checks``)
    after: str = ""

    @classmethod
    def of(cls, prompt: str, kind: str, target: str, before: str | None, after: str = "") -> Probe:
        """A check of an edit to ``target``: a neighbour is expected to keep its answer before the edit."""
        return cls(prompt, kind, target if kind != "neighbour" else before, before, after)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, probe: dict[str, Any]) -> Probe:
        return cls(probe["prompt"], probe["kind"], probe["expected"], probe.get("before", ""), probe.get("after", ""))

    @property
    def holds(self) -> bool:
        return holds(self.kind, self.expected, self.after)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "kind": self.kind, "expected": self.expected,
                "before": self.before, "after": self.after, "holds": self.holds}  # fmt: skip


@dataclass(frozen=True)
class ApplyResult:
    edit_id: int
    record: EditRecord
    probes: tuple[Probe, ...]
    superseded: tuple[int, ...]
    stats: dict[str, Any] = field(default_factory=dict)
    pending: tuple[Probe, ...] = ()  # checks answered after returning (``EditService.checks``), ``after`` still empty


@dataclass(frozen=True)
class VerifyItem:
    edit_id: int
    subject: str
    relation: str
    target: str
    probes: tuple[dict[str, Any], ...]

    @property
    def holds(self) -> bool:
        """The edit's own checks hold (prompt, paraphrases, neighbours); the chat row is reported beside them."""
        return all(p["holds"] for p in self.probes if p.get("kind") != "chat")


@dataclass(frozen=True)
class BatchResult:
    """A MEMIT batch as recorded: one ledger edit per fact, in the batch's order."""

    batch_id: str
    edit_ids: tuple[int, ...]
    records: tuple[EditRecord, ...]
    probes: tuple[tuple[Probe, ...], ...]  # per fact: its prompt, then its paraphrases and neighbours
    superseded: tuple[int, ...]
    stats: dict[str, Any] = field(default_factory=dict)
