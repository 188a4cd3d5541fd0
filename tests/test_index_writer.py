"""One writer per index: the file lock, newest-generation loading, no lost update, ids never reused."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cbir.index import (Index, IndexLockedError, StaleIndexError, latest_generation, open_for_write, writer_lock)


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from cbir.index import open_for_write
    path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(abs(hash(tag)) % 1000)
    for i in range(n):
        with open_for_write(path, timeout=120) as idx:
            v = rng.standard_normal((1, 8)).astype(np.float32)
            idx.add(v / np.linalg.norm(v), [f"{tag}/{i}.jpg"])
            time.sleep(0.01)   # widen the read-modify-write window
""")


def test_two_writer_processes_interleaving_keep_every_add(tmp_path):
    path = tmp_path / "x.index"
    with open_for_write(path, dim=8) as idx:
        idx.add(unit_rows(2, 8, 0), ["seed/0.jpg", "seed/1.jpg"])
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env_path = str(Path(__file__).resolve().parents[1] / "src")
    import os
    env = dict(os.environ, PYTHONPATH=env_path)
    n = 8
    procs = [subprocess.Popen([sys.executable, str(script), str(path), tag, str(n)], env=env) for tag in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    idx = Index.load(path)
    paths = {r.path for r in idx.records()}
    assert paths == {"seed/0.jpg", "seed/1.jpg"} | {f"{t}/{i}.jpg" for t in "ab" for i in range(n)}
    ids = [r.id for r in idx.records()]
    assert len(ids) == len(set(ids)) == 2 + 2 * n
    assert sorted(ids) == list(range(2 + 2 * n))  # one counter: every id given once
    assert latest_generation(path) == 1 + 2 * n == idx.generation


def test_writer_that_loaded_an_old_generation_reloads_and_keeps_both(tmp_path):
    path = tmp_path / "x.index"
    with open_for_write(path, dim=8) as idx:
        idx.add(unit_rows(1, 8, 0), ["a.jpg"])
    service = Index.load(path)  # e.g. the service's copy, generation g
    g = service.generation
    with open_for_write(path) as other:  # another writer (the CLI) saves g+1
        other.add(unit_rows(1, 8, 1), ["b.jpg"])
    assert latest_generation(path) == g + 1 and service.generation == g
    with open_for_write(path, index=service) as idx:  # reloads before it writes
        assert idx is service and idx.generation == g + 1
        new = idx.add(unit_rows(1, 8, 2), ["c.jpg"])
    again = Index.load(path)
    assert {r.path for r in again.records()} == {"a.jpg", "b.jpg", "c.jpg"}
    assert int(new[0]) == 2 and again.generation == g + 2


def test_saving_a_stale_copy_is_refused_not_lost(tmp_path):
    path = tmp_path / "x.index"
    with open_for_write(path, dim=8) as idx:
        idx.add(unit_rows(1, 8, 0), ["a.jpg"])
    stale = Index.load(path)
    with open_for_write(path) as other:
        other.add(unit_rows(1, 8, 1), ["b.jpg"])
    stale.add(unit_rows(1, 8, 2), ["c.jpg"])
    with pytest.raises(StaleIndexError):
        stale.save(path)
    assert {r.path for r in Index.load(path).records()} == {"a.jpg", "b.jpg"}


def test_ids_are_never_reused_after_removal(tmp_path):
    path = tmp_path / "x.index"
    with open_for_write(path, dim=8) as idx:
        ids = idx.add(unit_rows(3, 8, 0), ["a", "b", "c"])
    with open_for_write(path) as idx:
        idx.remove([int(ids[2])])  # the highest id goes
    with open_for_write(path) as idx:
        new = idx.add(unit_rows(1, 8, 1), ["d"])
    assert int(new[0]) == 3


def test_reader_reload_if_stale(tmp_path):
    path = tmp_path / "x.index"
    with open_for_write(path, dim=8) as idx:
        idx.add(unit_rows(2, 8, 0), ["a", "b"])
    reader = Index.load(path)
    assert reader.reload_if_stale() is False
    with open_for_write(path) as idx:
        idx.add(unit_rows(1, 8, 1), ["c"])
    assert reader.reload_if_stale() is True
    assert len(reader) == 3 and reader.generation == latest_generation(path)
    assert reader.reload_if_stale() is False


def test_failed_block_saves_nothing_and_releases_the_lock(tmp_path):
    path = tmp_path / "x.index"
    with open_for_write(path, dim=8) as idx:
        idx.add(unit_rows(1, 8, 0), ["a"])
    with pytest.raises(RuntimeError):
        with open_for_write(path) as idx:
            idx.add(unit_rows(1, 8, 1), ["b"])
            raise RuntimeError("boom")
    assert latest_generation(path) == 1 and len(Index.load(path)) == 1
    with open_for_write(path, timeout=1) as idx:  # not left locked
        pass


def test_second_writer_waits_then_times_out_with_a_clear_error(tmp_path):
    path = tmp_path / "x.index"
    with open_for_write(path, dim=8):
        pass
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with writer_lock(path).acquire():
            held.set()
            release.wait(10)

    # filelock locks are per-thread re-entrant objects; a fresh FileLock in another thread still excludes.
    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    try:
        start = time.monotonic()
        with pytest.raises(IndexLockedError, match="another writer"):
            with open_for_write(path, timeout=0.3):
                pass
        assert time.monotonic() - start >= 0.3
    finally:
        release.set()
        t.join()


def test_missing_index_without_create_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        with open_for_write(tmp_path / "none.index"):
            pass
    with pytest.raises(FileNotFoundError):
        latest_generation(tmp_path / "none.index")
