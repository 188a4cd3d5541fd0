"""The training time estimate: the extrapolation by hand, and the advice it prints."""

from __future__ import annotations

import pytest

from cbir.training.config import load_config
from cbir.training.timing import estimate, format_seconds


def test_estimate_by_hand():
    # 3 epochs x (10 steps x 2 s + 50 photos mined x 0.1 s) + validations at epochs 2 (every 2): 1 x 7 s
    e = estimate(epochs=3, steps_per_epoch=10, step_s=2.0, mining_images=50, embed_s=0.1, validation_s=7.0, every=2)
    assert e.total_s == pytest.approx(3 * (20 + 5) + 7) and e.validations == 1
    assert (e.train_s, e.mining_s, e.all_validation_s) == pytest.approx((60.0, 15.0, 7.0))
    assert e.total_s == pytest.approx(e.train_s + e.mining_s + e.all_validation_s)
    none = estimate(epochs=4, steps_per_epoch=5, step_s=1.0, mining_images=0, embed_s=0.0, validation_s=9.0)
    assert none.total_s == 20.0 and none.validations == 0  # no validation configured: not counted
    with pytest.raises(ValueError):
        estimate(epochs=-1, steps_per_epoch=1, step_s=1.0, mining_images=1, embed_s=1.0)


def test_format_seconds():
    assert [format_seconds(s) for s in (12.4, 270, 5400, 9000)] == ["12 s", "4.5 min", "1.5 h", "2.5 h"]


def test_text_names_the_keys_that_shorten_it():
    cfg = load_config(None, ["validation.split=0.2", "optim.epochs=30", "mining.queries_per_epoch=2000"])
    e = estimate(epochs=30, steps_per_epoch=400, step_s=3.0, mining_images=2500, embed_s=0.05, validation_s=60.0,
                 every=1)
    head, tips = e.text(cfg).splitlines()
    assert head.startswith("estimated time: 11.5 h = 30 epochs × (400 steps × 3.00 s + mining 2500 photos")
    assert "30 validation passes × 60 s" in head and "training 87 %, mining 9 %, validation 4 %" in head  # 36000 + 3750 + 1800 s = 11.54 h
    for key in ("optim.epochs=30", "mining.queries_per_epoch=2000", "data.imsize=224", "mining.negatives=5",
                "validation.every=1"):
        assert key in tips, key
