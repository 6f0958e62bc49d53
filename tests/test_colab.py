"""The notebook's first cell: in Colab it fetches the repository and runs the install step
(scripts/colab_setup.py); elsewhere it does nothing. Colab is simulated by a `google.colab` module."""

import json
import subprocess
import sys
import types

import pytest

from streaming_lm import config as C

NOTEBOOK = C.ROOT / "lab2_streaming_lm.ipynb"


def colab_cell() -> str:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    (cell,) = [c for c in cells if c.get("id") == "colab-setup"]
    return "".join(cell["source"])


@pytest.fixture
def in_colab(monkeypatch, tmp_path):
    """/content of a fresh Colab session: a `google.colab` module, an empty working folder."""
    google = types.ModuleType("google")
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "colab_setup", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_outside_colab_the_first_cell_does_nothing(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(colab_cell(), {})
    assert capsys.readouterr().out.startswith("not in Colab: nothing to install")


def test_in_colab_the_notebook_alone_asks_for_its_repository(in_colab, monkeypatch):
    monkeypatch.delenv("LAB_REPO", raising=False)
    with pytest.raises(RuntimeError, match="Set LAB_REPO in this cell to its git URL"):
        exec(colab_cell(), {})


def test_in_colab_the_first_cell_clones_the_repository_and_says_what_it_kept(in_colab, monkeypatch, capsys):
    monkeypatch.setenv("LAB_REPO", f"file://{C.ROOT}")  # this repository, committed
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # everything is installed here: pip must not need the index
    exec(colab_cell(), {})
    out = capsys.readouterr().out
    assert (in_colab / "lab" / "lab2_helpers.py").exists()
    assert "kept (the runtime's own): torch" in out and "ipywidgets" in out
    assert "replaced: none" in out and "added: none" in out
    exec(colab_cell(), {})  # a restarted session, back in /content: the clone is reused
    assert "kept (the runtime's own)" in capsys.readouterr().out


def test_the_install_step_reports_what_it_replaced_and_added():
    sys.path.insert(0, str(C.ROOT / "scripts"))
    try:
        import colab_setup
    finally:
        sys.path.remove(str(C.ROOT / "scripts"))
    before = {"datasets": "4.0.0", "pyarrow": "18.1.0", "ipywidgets": "7.7.1"}
    after = {"datasets": "5.2.0", "pyarrow": "26.0.1", "ipywidgets": "7.7.1", "multiprocess": "0.70.18"}
    assert colab_setup.changes(before, after) == {
        "replaced": ["datasets 4.0.0 -> 5.2.0", "pyarrow 18.1.0 -> 26.0.1"],
        "added": ["multiprocess 0.70.18"],
    }
    assert {"datasets", "ipywidgets", "torch"} <= set(colab_setup.required_names())


def test_the_colab_runtime_pins_what_the_lab_touches():
    pins = [
        line for line in (C.ROOT / "tests" / "colab-runtime.txt").read_text().splitlines() if "==" in line
    ]
    assert "ipywidgets==7.7.1" in pins and "datasets==4.0.0" in pins
    assert subprocess.run(["make", "-n", "colab-check"], cwd=C.ROOT, capture_output=True).returncode == 0
