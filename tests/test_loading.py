"""Model loading: ``from_pretrained`` from a local directory, partitioned while it loads under ZeRO-3."""

import json
import os

import pytest
import torch

from conftest import torchrun
from lorasb_ds.config import ConfigError, ModelConfig
from lorasb_ds.modeling import check_model_source, load_model, tiny_llama, tiny_tokenizer

WORKER = os.path.join(os.path.dirname(__file__), "workers", "load_worker.py")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_saved")
    model = tiny_llama()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, model


def test_tiny_default_is_deterministic():
    a, b = tiny_llama(), tiny_llama()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path"):
        check_model_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    check_model_source(ModelConfig(name_or_path="some-org/some-model"))  # a hub name is left to the hub


def test_load_without_zero3_gives_the_saved_weights(saved_model):
    path, ref = saved_model
    model = load_model(ModelConfig(name_or_path=str(path)), {"zero_optimization": {"stage": 2}}, torch.float32)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_zero3_load_is_partitioned_on_every_rank(saved_model, tmp_path):
    path, ref = saved_model
    torchrun(2, WORKER, str(path), str(tmp_path))
    reports = [json.load(open(tmp_path / f"load{k}.json")) for k in range(2)]
    full = sum(p.numel() for p in ref.parameters())
    expected = {n: float(p.detach().double().sum()) for n, p in ref.named_parameters()}
    for r in reports:
        assert r["all_partitioned"], r["rank"]
        assert r["full_elements"] == full
        assert r["local_elements"] <= full // 2 + 2 * len(expected)  # a half share (+ padding)
        assert r["checksum"] == pytest.approx(expected, rel=1e-9)
