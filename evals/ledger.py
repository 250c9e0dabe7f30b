"""RUN/evals: one record per evaluated step and settings, safe beside other evaluators.

Each record is its own file, `evals/steps/<step>-<settings hash>.json`, written whole: the source
of truth, which concurrent evaluators cannot lose (two that evaluate the same step under the same
settings write the same record). The settings hash covers every eval key but how the evaluator
runs (`OPERATIONAL`), so a step evaluated again under other settings (`python -m evals --force`)
gets a second record beside the first. A record matches settings when every key both hold agrees:
a key added to the evals after a record was made takes its default, which keeps the earlier
behaviour. Records of older evaluators (`<step>.json`) keep their names. `evals/ledger.jsonl`, one
line per record in step order, is regenerated from them after every record, under a file lock on
local disk; on an object store (no locks) a view written by two evaluators at once may lack the
other's newest record until the next one rewrites it. A line or file that is empty or not valid
JSON (a torn write by some other tool) is skipped with a warning; its step is evaluated again and
a step file that held it is replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
from typing import Any

from etils import epath

from evals.config import EvalConfig
from trainer.files import write_whole  # evals' writers use it from here


# Keys that say how the evaluator runs, not what a record measures: not part of a record's key.
OPERATIONAL = ("poll_seconds", "wandb_mode")
DEFAULTS = dataclasses.asdict(EvalConfig())  # what a record made before a key existed ran with


def settings_hash(settings: dict[str, Any] | None) -> str:
    """The key of the settings a record was made under ("" for records written without them)."""
    if settings is None:
        return ""
    kept = {k: v for k, v in settings.items() if k not in OPERATIONAL}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                defaults: dict[str, Any] | None = None) -> list[str]:
    """`key old -> new` for each setting of `new` that differs (nested keys with dots), operational
    keys aside. A key `old` lacks (added to the evals after it was recorded) counts as its default."""
    defaults = DEFAULTS if defaults is None else defaults
    found = []
    for key in sorted(new):
        if key in OPERATIONAL or (key not in old and key not in defaults):
            continue
        a, b = old.get(key, defaults.get(key)), new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.", defaults.get(key) or {})
        elif a != b:
            found.append(f"{prefix}{key} {a!r} -> {b!r}")
    return found


class Ledger:
    def __init__(self, run_dir: str):
        self.directory = epath.Path(run_dir) / "evals"
        self.path = self.directory / "ledger.jsonl"
        self.steps_dir = self.directory / "steps"

    def records(self, settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every record in step order (from the step files; lines of an older ledger.jsonl without
        step files count too); with `settings`, the records that match them."""
        by_key: dict[tuple[int, str], dict[str, Any]] = {}
        sources = []
        if self.path.exists():
            sources += [(line, self.path) for line in self.path.read_text().splitlines() if line.strip()]
        if self.steps_dir.exists():
            sources += [(path.read_text(), path) for path in self.steps_dir.glob("*.json")]
        for text, where in sources:
            record = _parse(text, where)
            if record is not None:
                by_key[record["step"], settings_hash(record.get("settings"))] = record
        return [by_key[key] for key in sorted(by_key)
                if settings is None or not differences(by_key[key].get("settings") or {}, settings)]

    def steps(self, settings: dict[str, Any] | None = None) -> set[int]:
        return {r["step"] for r in self.records(settings)}

    def append(self, record: dict[str, Any]) -> None:
        """Records a step under its settings (once: a readable record already there is kept; a
        damaged or empty one, which was evaluated again, is replaced) and rewrites ledger.jsonl."""
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        key = settings_hash(record.get("settings"))
        with _locked(self.directory):
            step_file = self.steps_dir / f"{record['step']:012d}{'-' + key if key else ''}.json"
            if not step_file.exists() or _parse(step_file.read_text(), step_file, quiet=True) is None:
                write_whole(step_file, json.dumps(record))
            write_whole(self.path, "".join(json.dumps(r) + "\n" for r in self.records()))


def _parse(text: str, where: epath.Path, quiet: bool = False) -> dict[str, Any] | None:
    """The record `text` holds, or None (with a warning unless `quiet`) when it is empty or damaged:
    its step is evaluated again and the record replaced."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        if not quiet:
            kind = "an empty" if not text.strip() else "a damaged"
            print(f"warning: skipped {kind} ledger entry in {where}: {text[:60]!r} (its step is evaluated again)")
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
