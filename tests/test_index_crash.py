"""A process killed with SIGKILL while saving leaves a loadable index: the previous one or the new one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cbir.index import Index

DIM = 256
BATCH = 500

CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from cbir.index import Index
    sys.path.insert(0, {here!r})
    from test_index_crash import vectors_for
    idx = Index.load({root!r}, device="cpu")
    step = 0
    while True:
        n = len(idx)
        idx.add(vectors_for(np.arange(n, n + {batch})), [f"/img/{{i}}.jpg" for i in range(n, n + {batch})])
        if step % 3 == 2:
            idx.remove([n - 1])          # removals too, so saves are not only appends
        print("saving", len(idx), flush=True)
        idx.save({root!r})
        print("saved", len(idx), flush=True)
        step += 1
    """
)


def vectors_for(ids: np.ndarray) -> np.ndarray:
    """The descriptor of image id i, a fixed function of i: x_ij = sin(0.013 i (j+1)) + cos(j)."""
    i = np.asarray(ids, np.float64)[:, None]
    j = np.arange(DIM, dtype=np.float64)[None, :]
    return (np.sin(0.013 * i * (j + 1)) + np.cos(j)).astype(np.float32)


def check_consistent(root) -> int:
    """Load the index and check every row is the vector of its id and every id has its path."""
    idx = Index.load(root, device="cpu")
    ids, vecs = idx.vectors()
    np.testing.assert_array_equal(vecs, vectors_for(ids))
    for rec in idx.records():
        assert rec.path == f"/img/{rec.id}.jpg"
    assert idx.meta.count() == len(ids)
    return len(idx)


@pytest.mark.parametrize("delay_ms", [0, 3, 10, 25, 60])
def test_sigkill_while_saving_leaves_a_loadable_index(tmp_path, delay_ms):
    root = tmp_path / "ix"
    start = Index(DIM, "exact", settings={"model": "test"}, device="cpu")
    start.add(vectors_for(np.arange(10000)), [f"/img/{i}.jpg" for i in range(10000)])  # ~10 MB: saves take a while
    start.save(root)
    script = CHILD.format(here=os.path.dirname(__file__), root=str(root), batch=BATCH)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    counts = [10000]
    try:
        # let it complete one save, then kill it `delay_ms` after it starts the second one
        for wanted in ("saving", "saved", "saving"):
            line = child.stdout.readline()
            assert line.startswith(wanted), (line, child.stderr.read() if child.poll() is not None else "")
            counts.append(int(line.split()[1]))
        time.sleep(delay_ms / 1000)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    n = check_consistent(root)
    # the last complete save, or the one the kill interrupted (if its manifest switch was reached)
    assert n in (counts[2], counts[3]), (n, counts)
    # the next save cleans up whatever the killed one left behind
    Index.load(root, device="cpu").save(root)
    leftovers = sorted(p.name for p in root.iterdir())
    assert len(leftovers) == 2 and "manifest.json" in leftovers, leftovers
    assert check_consistent(root) == n
