"""RUN/evals: one record per evaluated step, safe beside other evaluators.

Each step's record is its own file, `evals/steps/<step>.json`, written whole: the source of
truth, which concurrent evaluators cannot lose (two that evaluate the same step write the same
record). `evals/ledger.jsonl`, one line per step in step order, is regenerated from them after
every record, under a file lock on local disk; on an object store (no locks) a view written by
two evaluators at once may lack the other's newest step until the next record rewrites it. A
line or file that is not valid JSON (a torn write by some other tool) is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import uuid
from typing import Any

from etils import epath


class Ledger:
    def __init__(self, run_dir: str):
        self.directory = epath.Path(run_dir) / "evals"
        self.path = self.directory / "ledger.jsonl"
        self.steps_dir = self.directory / "steps"

    def records(self) -> list[dict[str, Any]]:
        """Every step's record in step order (from the step files; lines of an older ledger.jsonl
        without step files count too)."""
        by_step: dict[int, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                record = _parse(line, self.path)
                if record is not None:
                    by_step[record["step"]] = record
        if self.steps_dir.exists():
            for path in self.steps_dir.glob("*.json"):
                record = _parse(path.read_text(), path)
                if record is not None:
                    by_step[record["step"]] = record
        return [by_step[step] for step in sorted(by_step)]

    def steps(self) -> set[int]:
        return {r["step"] for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        """Records a step (once: a step already recorded is kept) and rewrites ledger.jsonl."""
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.directory):
            step_file = self.steps_dir / f"{record['step']:012d}.json"
            if not step_file.exists():
                write_whole(step_file, json.dumps(record))
            write_whole(self.path, "".join(json.dumps(r) + "\n" for r in self.records()))


def _parse(text: str, where: epath.Path) -> dict[str, Any] | None:
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        print(f"warning: skipped a damaged ledger entry in {where}: {text[:60]!r}")
        return None
    return record


@contextlib.contextmanager
def _locked(directory: epath.Path):
    """An exclusive lock on `directory/.lock` on local disk (object stores have none)."""
    if "://" in str(directory):
        yield
        return
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
