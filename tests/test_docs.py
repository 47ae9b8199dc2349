"""The examples in docs/workflows.md, run in order against a real broker and worker."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

DOC = Path(__file__).resolve().parent.parent / "docs" / "workflows.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_workflow_examples_run(broker, start_worker, tmp_path, monkeypatch):
    module, *examples = python_blocks(DOC.read_text())
    assert module.startswith("# flow.py"), "the first block is the tasks module"
    assert len(examples) >= 8
    (tmp_path / "flow.py").write_text(module)
    monkeypatch.setenv("ZQ_BROKER", broker.endpoint)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("flow", None)
    flow = importlib.import_module("flow")
    start_worker("flow", pool="thread", concurrency=4, env={"PYTHONPATH": str(tmp_path)})
    try:
        for number, block in enumerate(examples, 1):
            code = compile(block, f"{DOC.name}, example {number}", "exec")
            exec(code, {"__name__": f"example{number}"})
    finally:
        flow.app.close()
        sys.modules.pop("flow", None)
