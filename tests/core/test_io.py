"""Atomic writes and content digests (pipeline.io)."""

import os
import subprocess
import sys

import pytest

from pipeline import io
from tests.support import ROOT


@pytest.mark.fault
def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    """SIGKILL inside atomic_path leaves the temporary (once 76 MB); the next write of the same path
    removes it, but never one of a live writer."""
    target = tmp_path / "out.bin"
    code = (
        "import os, signal, sys\n"
        "from pipeline.io import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env)
    assert proc.returncode == -9
    leftovers = list(tmp_path.glob(".out.bin.*.tmp"))
    assert len(leftovers) == 1 and not target.exists()
    with io.atomic_path(target) as tmp:
        live = list(tmp_path.glob(".out.bin.*.tmp"))
        assert live == [tmp]  # the dead writer's temporary is gone, ours is kept
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and not list(tmp_path.glob(".out.bin.*.tmp"))


def test_cached_sha256_rereads_changed_files_only(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"one")
    cache = tmp_path / "cache.json"
    (first,) = io.cached_sha256([a], cache)
    assert first == io.file_sha256(a) and cache.exists()
    os.utime(a, ns=(1, 1))  # same bytes, new mtime: re-read, same digest
    assert io.cached_sha256([a], cache) == [first]
    a.write_bytes(b"two")
    assert io.cached_sha256([a], cache) != [first]


def test_a_full_disk_names_the_artefact_being_written(tmp_path):
    """The writer's error names its temporary (or nothing); the raised one names the artefact."""
    import errno

    import pytest

    target = tmp_path / "results" / "bag.h5"
    with pytest.raises(OSError, match=f"no space left on the device while writing {target}") as err:
        with io.atomic_path(target) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert err.value.errno == errno.ENOSPC and not target.exists()
    assert not list(target.parent.glob(".*.tmp"))  # the temporary is gone
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through unchanged
        with io.atomic_path(target):
            raise ValueError("unrelated")


def test_a_really_full_filesystem_names_the_artefact(tmp_path):
    """On a 64 KiB tmpfs (root only): torch's and h5py's own errors become one naming the file."""
    import errno

    import h5py
    import numpy as np
    import pytest
    import torch

    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")

    def write_h5(path):
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=np.zeros(100_000))

    try:
        for name, write in [
            ("checkpoint.pth", lambda p: torch.save({"w": torch.zeros(100_000)}, p)),
            ("bag.h5", write_h5),
        ]:
            target = mount / name
            with pytest.raises(OSError, match=f"writing {target}") as err:
                with io.atomic_path(target) as tmp:
                    write(tmp)
            assert err.value.errno == errno.ENOSPC and not target.exists()
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_snakemakes_timestamp_in_a_finished_folder_is_not_content(tmp_path):
    """Snakemake writes .snakemake_timestamp into a directory() output after the job: the folder
    still verifies (the trained S-LDM folder is such an output)."""
    folder = tmp_path / "results" / "sldm" / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_bytes(b"weights")
    io.write_folder_digests(folder)
    (folder / io.SNAKEMAKE_TIMESTAMP).touch()
    assert io.verify_folder_digests(folder, external=False)
    (folder / "stray.txt").write_text("added later")
    import pytest

    with pytest.raises(io.IntegrityError, match="stray.txt: not listed"):
        io.verify_folder_digests(folder, external=False)
