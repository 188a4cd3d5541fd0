"""Revisited Oxford and Paris (Radenović et al., CVPR'18) and the revisitop 1M distractors.

Layouts found under ``root`` (the first that exists wins), for dataset NAME (roxford5k, rparis6k):
``root/gnd_NAME.pkl``, ``root/NAME/gnd_NAME.pkl``, ``root/datasets/NAME/gnd_NAME.pkl`` (the
revisitop layout); images in ``jpg/`` beside the .pkl, named ``<imlist entry>.jpg``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Iterator

from ..fileio import FormatError
from .base import RetrievalDataset

DATASETS = ("roxford5k", "rparis6k")


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickle only plain Python containers and numpy arrays: a data file cannot run code.

    ``find_class`` is the only way a pickle reaches a callable (``__reduce__`` payloads, classes to
    instantiate); it answers only numpy's array/scalar/dtype rebuilders, which construct data and
    call nothing else. Everything else (``os.system``, ``builtins.eval``, ...) is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a data file may hold only lists, "
                                     "dicts, strings, numbers and numpy arrays)")


def load_plain_pickle(path: str | Path, what: str = "pickle") -> Any:
    """The one loader of every ``.pkl`` a user gives cbir (ground truths, SfM-120k training dbs):
    plain containers, numbers, strings and numpy arrays only, so a crafted file cannot run code.
    A missing file raises FileNotFoundError, a refused or damaged one FormatError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return _PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, ImportError) as exc:
        raise FormatError(f"{path} is not a readable {what}: {exc}") from exc


def load_gnd(path: str | Path) -> dict[str, Any]:
    """Read and check a revisitop ground-truth .pkl (``imlist``, ``qimlist``, ``gnd`` with
    ``bbx``/``easy``/``hard``/``junk`` per query). Indices become plain int lists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    data = load_plain_pickle(path, "revisitop ground-truth pickle")
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise FormatError(f"{path}: expected a dict with imlist, qimlist and gnd (revisitop format)")
    imlist = [str(x) for x in data["imlist"]]
    qimlist = [str(x) for x in data["qimlist"]]
    if len(data["gnd"]) != len(qimlist):
        raise FormatError(f"{path}: {len(data['gnd'])} gnd entries for {len(qimlist)} queries")
    gnd = []
    ndb = len(imlist)
    for i, g in enumerate(data["gnd"]):
        if not isinstance(g, dict):
            raise FormatError(f"{path}: gnd entry {i} is not a dict")
        entry: dict[str, Any] = {}
        for key in ("easy", "hard", "junk"):
            idx = [int(v) for v in g.get(key, [])]
            if any(v < 0 or v >= ndb for v in idx):
                raise FormatError(f"{path}: query {i} has {key} indices outside the {ndb} database images")
            entry[key] = idx
        bbx = g.get("bbx")
        entry["bbx"] = None if bbx is None else tuple(float(v) for v in bbx)
        gnd.append(entry)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def find_gnd(name: str, root: str | Path) -> Path:
    """The ground-truth file of dataset ``name`` under ``root`` (see the module doc for layouts)."""
    root = Path(root)
    fname = f"gnd_{name}.pkl"
    candidates = [root / fname, root / name / fname, root / "datasets" / name / fname]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"{fname} not found under {root} (looked in {', '.join(str(c.parent) for c in candidates)}); "
        f"run `cbir download {name} --data-root {root}`"
    )


def from_gnd_file(gnd_path: str | Path, images: str | Path | None = None, name: str | None = None,
                  ext: str = ".jpg") -> RetrievalDataset:
    """A revisitop-format benchmark from its .pkl; images in ``images`` (default: ``jpg/`` beside it).
    Queries carry their ``bbx`` crop box."""
    gnd_path = Path(gnd_path)
    data = load_gnd(gnd_path)
    img_dir = Path(images) if images is not None else gnd_path.parent / "jpg"
    return RetrievalDataset(
        name=name or gnd_path.stem.removeprefix("gnd_"),
        protocol="revisitop",
        db_ids=data["imlist"],
        db_paths=[img_dir / f"{n}{ext}" for n in data["imlist"]],
        query_ids=data["qimlist"],
        query_paths=[img_dir / f"{n}{ext}" for n in data["qimlist"]],
        query_bboxes=[g["bbx"] for g in data["gnd"]],
        gnd=data["gnd"],
        info={"gnd_file": str(gnd_path), "images": str(img_dir)},
    )


def load_revisitop(name: str, root: str | Path) -> RetrievalDataset:
    """``roxford5k`` or ``rparis6k`` under ``root``."""
    if name not in DATASETS:
        raise ValueError(f"unknown revisitop dataset {name!r} (known: {', '.join(DATASETS)})")
    return from_gnd_file(find_gnd(name, root), name=name)


# --------------------------------------------------------------------------------------------
# revisitop 1M distractors: a list of ~1M relative paths, streamed, never held in memory
# --------------------------------------------------------------------------------------------

DISTRACTOR_LIST = "revisitop1m.txt"


def find_distractor_list(root: str | Path) -> Path:
    root = Path(root)
    for c in (root / DISTRACTOR_LIST, root / "revisitop1m" / DISTRACTOR_LIST,
              root / "datasets" / "revisitop1m" / DISTRACTOR_LIST):
        if c.is_file():
            return c
    raise FileNotFoundError(f"{DISTRACTOR_LIST} not found under {root}; run `cbir download revisitop1m`")


def iter_distractors(list_path: str | Path, images: str | Path | None = None) -> Iterator[tuple[str, Path]]:
    """Yield ``(id, path)`` for every line of the distractor list, one line at a time.

    ``id`` is the line (a path relative to the image folder, e.g. ``1/1/abc.jpg``) without its
    extension; ``path`` is under ``images`` (default ``jpg/`` beside the list). Blank lines skip.
    """
    list_path = Path(list_path)
    img_dir = Path(images) if images is not None else list_path.parent / "jpg"
    with open(list_path, "r", encoding="utf-8") as fh:
        for line in fh:
            rel = line.strip()
            if not rel:
                continue
            stem = rel[:-4] if rel.lower().endswith(".jpg") else rel
            yield stem, img_dir / (rel if rel.lower().endswith(".jpg") else rel + ".jpg")


def count_distractors(list_path: str | Path) -> int:
    """Number of non-blank lines, read in blocks (constant memory)."""
    n = 0
    with open(list_path, "r", encoding="utf-8") as fh:
        for line in fh:
            n += bool(line.strip())
    return n
