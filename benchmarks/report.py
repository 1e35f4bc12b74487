"""How every benchmark hands over its result: one JSON document on stdout, and the same file with --out.

One place, so every report is written the same way (indent 2, trailing newline, parent folders made).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], out: Path | None = None) -> None:
    """Print the report as JSON and, when ``out`` is given, write the same text there."""
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    print(text)
