"""Validation of raw records into documents, and the dead-letter record for the rest."""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from pipelines.sources import MalformedJson, RawRecord

# Fields each dataset's records carry, in record order.
DATASET_FIELDS = {
    "tinystories": ("tokens",),
    "tfds": ("tokens",),
    "dmax_trajectories": ("prompt", "response"),
}


class Document(NamedTuple):
    key: str  # sha256 of the content: split, shard and order all derive from it
    texts: tuple[str, ...]  # one per DATASET_FIELDS entry
    source: str
    position: int


class BadRecord(NamedTuple):
    source: str
    position: int
    reason: str
    detail: str
    raw: str  # the whole record, so nothing is lost

    def to_json(self) -> str:
        return json.dumps(self._asdict(), ensure_ascii=False, sort_keys=True)


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def content_key(texts: tuple[str, ...]) -> str:
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()


def _as_text(value: Any, reason_if_missing: str, name: str) -> str:
    if value is None:
        raise _Reject(reason_if_missing, f"no {name!r} field")
    if isinstance(value, bytes):  # TFDS text features arrive as bytes
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Reject("invalid_utf8", str(e)) from None
    if not isinstance(value, str):
        raise _Reject(reason_if_missing, f"{name!r} is a {type(value).__name__}, not a string")
    try:  # JSON escapes can spell lone surrogates ("\ud800"): text no tokenizer or hash can encode
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Reject("invalid_text", str(e)) from None
    return value


def _row(payload: Any) -> dict:
    if isinstance(payload, MalformedJson):
        raise _Reject("malformed_json", payload.error)
    if not isinstance(payload, dict):
        raise _Reject("malformed_json", f"a JSON {type(payload).__name__}, not an object")
    return payload


def _story_text(payload: Any, text_field: str) -> tuple[str, ...]:
    if isinstance(payload, bytes):
        return (_as_text(payload, "missing_field", text_field),)
    return (_as_text(_row(payload).get(text_field), "missing_field", text_field),)


def _trajectory_texts(payload: Any) -> tuple[str, ...]:
    """(prompt, response) from `question`/`answer` fields or a chat `messages` list."""
    row = _row(payload)
    messages = row.get("messages")
    if messages is None:
        prompt, response = row.get("question"), row.get("answer")
    elif isinstance(messages, list):
        by_role: dict[str, Any] = {}
        for message in messages:
            if isinstance(message, dict):
                by_role.setdefault(message.get("role"), message.get("content"))
        prompt, response = by_role.get("user"), by_role.get("assistant")
    else:
        raise _Reject("malformed_json", "'messages' is not a list")
    return (
        _as_text(prompt, "missing_prompt", "question"),
        _as_text(response, "missing_response", "answer"),
    )


def _raw_text(payload: Any) -> str:
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "backslashreplace")
    if isinstance(payload, MalformedJson):
        return payload.line.decode("utf-8", "backslashreplace")
    # Lone surrogates cannot be written as UTF-8: they stay as the JSON escapes they came in as.
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, default=repr)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validate(
    record: RawRecord, dataset: str, text_field: str, max_doc_chars: int
) -> Document | BadRecord:
    try:
        if dataset == "dmax_trajectories":
            # A response keeps its leading white space: a continuation's first word (" there")
            # tokenizes as it was generated, after a prompt that ends mid-text.
            prompt, response = _trajectory_texts(record.payload)
            texts = (prompt.strip(), response.rstrip())
        else:
            texts = tuple(t.strip() for t in _story_text(record.payload, text_field))
        if any(not t.strip() for t in texts):
            raise _Reject("empty", "empty or whitespace-only text")
        length = sum(len(t) for t in texts)
        if length > max_doc_chars:
            raise _Reject("too_long", f"{length} characters > --max_doc_chars {max_doc_chars}")
    except _Reject as r:
        return BadRecord(record.source, record.position, r.reason, r.detail, _raw_text(record.payload))
    return Document(content_key(texts), texts, record.source, record.position)
