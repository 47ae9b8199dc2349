"""Run records that tasks write and tests read while the tasks still run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` as JSON, whole or not at all: a test polling the
    directory must never read a file that is still being written (it read an empty
    one, under load)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
