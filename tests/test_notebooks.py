"""The notebooks in ``notebooks/``: stored clean (fast) and executed end to end (slow).

The slow tests run each notebook in a fresh ``python3`` kernel with nbclient (the LLM notebook with
a tiny random chat LLaMA as its ``FEDLORA_NOTEBOOK_MODEL``, not SmolLM2), in a temporary working
directory and with ``TMPDIR`` pointing there, so whatever the notebook writes (it uses
``tempfile.mkdtemp``) lands under pytest's ``tmp_path``. A cell that raises fails the test with the
cell's source and traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["quickstart.ipynb", "compare_strategies.ipynb", "llm_instruction_tuning.ipynb"]
CELL_TIMEOUT_S = 600


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / name, as_version=nbformat.NO_CONVERT)


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_clean(name):
    nb = _read(name)
    assert nb.nbformat == 4
    nbformat.validate(nb)  # raises nbformat.ValidationError
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {i} has stored outputs; clear them"
            assert cell.execution_count is None, f"{name}: cell {i} has an execution count"
        assert "execution" not in cell.get("metadata", {}), f"{name}: cell {i} has timing metadata"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, request):
    from nbclient import NotebookClient

    nb = _read(name)
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if name == "llm_instruction_tuning.ipynb":  # the notebook's model parameter: a tiny random LLaMA here
        env["FEDLORA_NOTEBOOK_MODEL"] = str(request.getfixturevalue("tiny_chat_llama_dir"))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises nbclient.exceptions.CellExecutionError on a failing cell
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors
    # what a reader sees on stderr: fedlora's notes, no library's warnings (tqdm's "IProgress not found",
    # bitsandbytes' missing CPU kernel), and no note that the job cut every prompt (the LLM notebook's
    # 96 tokens held no BBC News lead: "1780 of 1780 sft examples exceed --max-length 96")
    stderr = "".join(out.text for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                     if out.output_type == "stream" and out.name == "stderr")
    assert "warning" not in stderr.lower(), stderr
    assert not re.search(r"\b(\d+) of \1 \w+ examples exceed", stderr), stderr
    assert any(tmp_path.iterdir()), "the notebook wrote nothing under TMPDIR"
