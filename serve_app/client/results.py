"""Typed results, parsed from the service's JSON so callers get attributes, not dict keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Prediction:
    label: str
    class_id: int
    score: float

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Prediction":
        return cls(label=str(obj["label"]), class_id=int(obj["class_id"]),
                   score=float(obj["score"]))


@dataclass(frozen=True)
class ErrorInfo:
    """Why one image of a batch failed: the service's stable code and a readable message."""

    code: str
    message: str

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ErrorInfo":
        return cls(code=str(obj.get("code", "unknown")), message=str(obj.get("message", "")))


@dataclass(frozen=True)
class Classification:
    """The answer for one image: predictions best first."""

    model: str
    predictions: list[Prediction]
    request_id: str

    @property
    def top(self) -> Prediction:
        """The best prediction (the service always returns at least one)."""
        return self.predictions[0]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Classification":
        return cls(model=str(obj["model"]),
                   predictions=[Prediction.from_json(p) for p in obj["predictions"]],
                   request_id=str(obj.get("request_id", "")))


@dataclass(frozen=True)
class BatchItem:
    """One image of a batch: either ``predictions`` or ``error`` is set."""

    filename: str
    predictions: list[Prediction] | None
    error: ErrorInfo | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "BatchItem":
        if obj.get("error") is not None:
            return cls(filename=str(obj.get("filename", "")), predictions=None,
                       error=ErrorInfo.from_json(obj["error"]))
        return cls(filename=str(obj.get("filename", "")),
                   predictions=[Prediction.from_json(p) for p in obj["predictions"]],
                   error=None)


@dataclass(frozen=True)
class BatchClassification:
    """The answer for a batch: one item per image, in the order they were sent."""

    model: str
    results: list[BatchItem]
    request_id: str

    @property
    def ok(self) -> bool:
        """True when every image was classified."""
        return all(item.ok for item in self.results)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "BatchClassification":
        return cls(model=str(obj["model"]),
                   results=[BatchItem.from_json(r) for r in obj["results"]],
                   request_id=str(obj.get("request_id", "")))
