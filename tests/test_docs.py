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


ROOT = DOC.parent.parent
#: What a clone of the project has: README.md and everything under docs/.
OWN_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", OWN_DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_the_docs_stand_on_their_own(doc):
    """No page sends a reader outside the project (there was a ../shared/DESIGN.md),
    and every project file a page names in backticks exists."""
    text = doc.read_text()
    assert "../shared" not in text
    assert "DESIGN.md" not in text
    for ref in re.findall(r"`((?:docs|tests|zq)/[\w./-]*)`", text):
        assert (ROOT / ref).exists(), f"{doc.name} names {ref}, which does not exist"


def test_readme_points_at_the_design_and_porting_pages():
    readme = (ROOT / "README.md").read_text()
    for page in ("docs/design.md", "docs/celery.md"):
        assert f"`{page}`" in readme
        assert (ROOT / page).exists()
