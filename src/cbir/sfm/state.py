"""The work folder of a resumable mining run: its settings stamp and the time spent per stage.

``STATE`` (``state.json``, format ``cbir-mine-state`` v1) is written when a run starts, before any
work: the settings document and the digest of the input list. A later run with the same folder
compares them: equal -> it continues (every stage's output that exists is kept); different ->
:class:`SettingsChanged` (one line naming the changed fields) unless ``restart``, which deletes the
folder's outputs first. ``times.json`` adds up the seconds each stage has run, over every run.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..fileio import FormatError, atomic_write_json, check_format, read_json
from .settings import changed_fields, settings_digest

__all__ = ["WorkDir", "SettingsChanged", "STATE", "TIMES"]

STATE = "state.json"
TIMES = "times.json"
STATE_FORMAT = "cbir-mine-state"
STATE_VERSION = 1


class SettingsChanged(ValueError):
    """The folder holds work done with other settings or other photos."""


class WorkDir:
    """A work folder whose contents belong to one (settings, inputs) pair.

    ``WorkDir(path, what, settings_doc, inputs_doc, restart=False)``: creates or checks the stamp
    (see the module docstring); ``what`` names the command in messages (e.g. ``cbir mine``).
    """

    def __init__(self, path: str | Path, what: str, settings: dict[str, Any], inputs: Any, *,
                 restart: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} is a file, not a {what} output folder")
        stamp = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "what": what, "settings": settings,
                 "inputs": settings_digest(inputs)}
        state = self.path / STATE
        if state.is_file() and not restart:
            old = read_json(state, what=f"{what} state")
            check_format(old, STATE_FORMAT, (STATE_VERSION,), state, f"{what} state")
            if not isinstance(old.get("settings"), dict):
                raise FormatError(f"{state}: no settings")
            diff = changed_fields(old["settings"], settings)
            if diff or old.get("inputs") != stamp["inputs"]:
                said = (f"settings {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}" if diff
                        else "photos (names, sizes or dates)")
                raise SettingsChanged(f"{self.path} holds a run with other {said}: use the same options to continue "
                                      f"it, another folder, or --restart to start over")
        elif self.path.exists() and any(self.path.iterdir()) and not state.is_file() and not restart:
            raise FileExistsError(f"{self.path} is not empty and holds no {what} run (give a new folder, or --restart "
                                  "to empty it)")
        if restart and self.path.exists():
            for child in self.path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        if not state.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(state, stamp)

    def times(self) -> dict[str, float]:
        """Seconds per stage, summed over every run in this folder."""
        path = self.path / TIMES
        if not path.is_file():
            return {}
        doc = read_json(path, what="stage times")
        return {str(k): float(v) for k, v in doc.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def add_time(self, stage: str, seconds: float) -> None:
        t = self.times()
        t[stage] = round(t.get(stage, 0.0) + float(seconds), 3)
        atomic_write_json(self.path / TIMES, t)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Adds the time the block took to ``stage`` (also when it fails or is interrupted)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(stage, time.perf_counter() - t0)
