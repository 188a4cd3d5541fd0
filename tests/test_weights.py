"""cbir.weights: hash-named files are verified, the hub probe answers quickly offline, heads may differ."""

from __future__ import annotations

import hashlib
import socket

import pytest
import torch
from torch import nn

from cbir.weights import WeightsUnavailable, check_hash_in_name, hub_reachable, is_head, load_into


def test_check_hash_in_name(tmp_path):
    data = b"weights"
    digest = hashlib.sha256(data).hexdigest()
    good = tmp_path / f"net-{digest[:8]}.pth"
    good.write_bytes(data)
    check_hash_in_name(good)
    (tmp_path / "plain.pth").write_bytes(b"anything")
    check_hash_in_name(tmp_path / "plain.pth")  # no hash in the name: nothing to check
    bad = tmp_path / f"net-{'0' * 8 if digest[0] != '0' else '1' * 8}.pth"
    bad.write_bytes(data)
    with pytest.raises(WeightsUnavailable, match="does not start with"):
        check_hash_in_name(bad)


def test_hub_reachable_is_false_for_a_closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert hub_reachable(f"http://127.0.0.1:{port}", timeout=1.0) is False


def test_load_into_by_name_tolerates_another_head():
    net = nn.Sequential()
    net.add_module("body", nn.Linear(3, 4))
    net.add_module("fc", nn.Linear(4, 2))
    tensors = {"body.weight": torch.ones(4, 3), "body.bias": torch.zeros(4), "fc.weight": torch.ones(10, 4)}
    load_into(net, tensors, "file")
    assert torch.equal(net.body.weight, torch.ones(4, 3)) and net.fc.weight.shape == (2, 4)
    assert is_head("fc.weight") and is_head("classifier.1.bias") and not is_head("body.fc.weight")
    with pytest.raises(WeightsUnavailable, match="'body.weight' has shape"):
        load_into(net, {**tensors, "body.weight": torch.ones(5, 3)}, "file")
