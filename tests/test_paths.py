"""cbir.paths.cache_dir: every cache folder of cbir from one function (XDG_CACHE_HOME honoured,
one environment variable per kind), and every module that names a cache folder asks it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbir.paths import CACHE_KINDS, cache_dir, cache_root


@pytest.fixture()
def clean_env(monkeypatch):
    for var in ("XDG_CACHE_HOME", "CBIR_CACHE", "CBIR_CONVERTED_CACHE", "CBIR_MODELS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_defaults_under_home_cache(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "cbir"
    clean_env.setenv("XDG_CACHE_HOME", "")  # empty counts as unset (XDG base directory spec)
    assert cache_dir("models") == tmp_path / ".cache" / "cbir" / "models"


def test_xdg_and_variables(clean_env, tmp_path):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert {k: cache_dir(k) for k in CACHE_KINDS} == {
        "descriptors": tmp_path / "xdg" / "cbir" / "descriptors",
        "query-models": tmp_path / "xdg" / "cbir" / "descriptors" / "query-models",
        "converted": tmp_path / "xdg" / "cbir" / "converted",
        "models": tmp_path / "xdg" / "cbir" / "models",
    }
    clean_env.setenv("CBIR_CACHE", str(tmp_path / "c"))
    clean_env.setenv("CBIR_MODELS", str(tmp_path / "m"))
    assert cache_dir("descriptors") == tmp_path / "c"
    assert cache_dir("query-models") == tmp_path / "c" / "query-models"  # moves with its parent
    assert cache_dir("models") == tmp_path / "m"
    with pytest.raises(ValueError, match="unknown cache kind 'nope'"):
        cache_dir("nope")


def test_modules_ask_cache_dir(clean_env, tmp_path):
    from cbir.cache.digest import default_cache_dir
    from cbir.extraction.backends import converted_cache_dir
    from cbir.published import models_dir

    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == cache_dir("descriptors")
    assert converted_cache_dir() == cache_dir("converted")
    assert models_dir() == tmp_path / "cbir" / "models"  # used to ignore XDG_CACHE_HOME


def test_no_other_module_builds_a_cache_path():
    """Code (not docstrings) reading XDG_CACHE_HOME or joining ``Path.home()`` lives only in paths.py."""
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "cbir"
    pattern = re.compile(r"""environ[^\n]*["']XDG_CACHE_HOME|Path\.home\(\)|/ ["']\.cache["']""")
    assert pattern.search('base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"')
    offenders = [p.relative_to(src).as_posix() for p in src.rglob("*.py")
                 if p.name != "paths.py" and pattern.search(p.read_text())]
    assert offenders == []
