"""Fixtures shared by the test packages (helpers are in ``tests/support.py``)."""

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from tests.support import ROOT, TABLE4, TINY_CONFIG, copy_run, copy_workflow, snakemake, write_coloured_imagenet

# keep the 2-core CI machine responsive: one intra-op thread per test process
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def coloured_imagenet(tmp_path_factory) -> Path:
    """The S-LDM tests' training folder (``support.write_coloured_imagenet``); read only."""
    return write_coloured_imagenet(tmp_path_factory.mktemp("coloured_imagenet"))


def _session_dir(tmp_path_factory) -> Path:
    """A folder of this test session that every xdist worker sees (each worker's base temp is a
    subfolder of the session's); without xdist, the session's own base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny run of results/table4.csv in a private copy of the workflow, built once per
    test session: under xdist by the first worker that asks, while the others wait on a file lock.
    Tests only read it (dry-runs, reports written elsewhere); a test that edits, kills, scrubs or
    extends a run works on ``copy_run(tiny_run, ...)``."""
    shared = _session_dir(tmp_path_factory)
    work, done = shared / "tiny_run", shared / "tiny_run.done"
    with FileLock(shared / "tiny_run.lock"):
        if not done.exists():
            shutil.rmtree(work, ignore_errors=True)  # a failed attempt of another worker
            copy_workflow(work)
            snakemake(work, "--cores", "2", *TINY_CONFIG, TABLE4)
            done.touch()
    return work


@pytest.fixture(scope="session")
def editable_tiny_run(tiny_run, tmp_path_factory) -> Path:
    """This worker's copy of the tiny run, for tests that edit a file and restore it afterwards."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("editable") / "wf")
