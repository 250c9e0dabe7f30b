"""What every benchmark script shares: printing its JSON report and saving it with --out."""

from __future__ import annotations

import json
from typing import Any


def emit(report: dict[str, Any], out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
