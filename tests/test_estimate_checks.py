"""Collective checks of the estimation phase, on a one-process gloo group."""

import pytest
import torch
import torch.distributed as dist

from lorasb_ds.estimate import check_finite


@pytest.fixture
def one_rank_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_finite_gradients_pass(one_rank_group):
    check_finite({"a": torch.ones(2, 2)}, ["a", "b"], torch.device("cpu"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_names_the_module(one_rank_group, bad):
    g = torch.ones(2, 2)
    g[1, 0] = bad
    with pytest.raises(FloatingPointError, match="'layers.1.v_proj' holds NaN or inf"):
        check_finite({"layers.0.q_proj": torch.ones(2, 2), "layers.1.v_proj": g},
                     ["layers.0.q_proj", "layers.1.v_proj"], torch.device("cpu"))
