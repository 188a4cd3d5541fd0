"""cbir.model_names: torch-free model names and the one description of every pooling."""

from __future__ import annotations

import subprocess
import sys

from cbir.model_names import POOLING_HELP, is_model_file, parse_pooling, pooling_option_help


def test_pooling_help_is_the_registry_in_words():
    from cbir.pooling import POOLINGS

    assert list(POOLING_HELP) == list(POOLINGS)  # same names, same order: one text per pooling
    text = pooling_option_help("mac")
    assert all(name in text for name in POOLINGS) and text.endswith("default: mac)")


def test_cli_help_reads_it_without_torch():
    code = ("import sys; from cbir.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-500:]


def test_parse_pooling_and_model_file(tmp_path):
    assert parse_pooling("gem:p=4") == ("gem", {"p": 4})
    assert not is_model_file("resnet50") and is_model_file("mine.pt")
    (tmp_path / "net").write_bytes(b"x")
    assert is_model_file(tmp_path / "net")  # an existing file, whatever its name
