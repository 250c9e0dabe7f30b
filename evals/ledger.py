"""RUN/evals/ledger.jsonl: one line per evaluated step, replaced whole so no line is ever partial."""

from __future__ import annotations

import json
import uuid
from typing import Any

from etils import epath


class Ledger:
    def __init__(self, run_dir: str):
        self.directory = epath.Path(run_dir) / "evals"
        self.path = self.directory / "ledger.jsonl"

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def steps(self) -> set[int]:
        return {r["step"] for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        """Adds a line unless the step is already there: written to a new file, then renamed over."""
        records = self.records()
        if record["step"] in {r["step"] for r in records}:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_whole(self.path, "".join(json.dumps(r) + "\n" for r in [*records, record]))


def write_whole(path: epath.Path, content: str | bytes) -> None:
    """Replaces a file so that readers see the old or the new content, never a part: an object
    store publishes an object only once fully uploaded; a local file is renamed into place."""
    write = "write_bytes" if isinstance(content, bytes) else "write_text"
    if "://" in str(path):
        getattr(path, write)(content)
        return
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    getattr(tmp, write)(content)
    tmp.replace(path)
