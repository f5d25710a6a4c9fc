"""Atomic writes and content digests (pipeline.io)."""

import os
import subprocess
import sys

from pipeline import io


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
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
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
