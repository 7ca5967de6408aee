"""Gather helpers: identity in one process; rank order and local-only gradients with 2 gloo ranks."""

from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from albef import dist
from conftest import make_batch, make_model, write_tiny_bert
import pytest

pytestmark = pytest.mark.distributed


def test_single_process_helpers_are_identity():
    assert not dist.is_distributed()
    assert (dist.get_rank(), dist.get_world_size(), dist.is_main_process()) == (0, 1, True)
    t = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_concat(t) is t
    assert dist.all_gather_with_grad(t) is t
    assert dist.max_across_ranks(7, t.device) == 7
    info = dist.init_distributed()
    assert (info.rank, info.world_size) == (0, 1) and not dist.is_distributed()


def _worker(rank: int, world_size: int, init_file: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        assert dist.is_distributed() and dist.get_rank() == rank and dist.get_world_size() == world_size

        local = torch.full((2, 3), float(rank)) + torch.arange(2.0)[:, None] / 10
        gathered = dist.all_gather_concat(local)
        rows = [torch.full((2, 3), float(r)) + torch.arange(2.0)[:, None] / 10 for r in range(world_size)]
        expected = torch.cat(rows)
        assert torch.equal(gathered, expected), gathered

        x = local.clone().requires_grad_(True)
        y = dist.all_gather_with_grad(x)
        assert torch.equal(y.detach(), expected)
        weights = torch.arange(y.numel(), dtype=torch.float32).view_as(y)
        (y * weights).sum().backward()
        assert torch.equal(x.grad, weights[2 * rank: 2 * rank + 2]), x.grad

        assert dist.max_across_ranks(5 + rank, x.device) == 5 + world_size - 1

        # Ranks may hold different row counts (a batch that lost unreadable samples).
        uneven = torch.full((1 + rank, 3), float(rank), requires_grad=True)
        gathered, counts = dist.gather_rows(uneven.detach())
        assert counts == [1 + r for r in range(world_size)]
        assert torch.equal(gathered, torch.cat([torch.full((1 + r, 3), float(r)) for r in range(world_size)]))
        y = dist.all_gather_with_grad(uneven)
        y.sum().backward()
        assert torch.equal(uneven.grad, torch.ones(1 + rank, 3))

        try:
            dist.all_gather_concat(torch.zeros(2, 3 + rank))
        except RuntimeError as err:
            assert "same shape past dim 0" in str(err)
        else:
            raise AssertionError("mismatched trailing dimensions must raise")
    finally:
        dist.destroy_distributed()


def test_two_process_gather_order_and_local_gradient(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "pg_init")), nprocs=2, join=True)


def _model_worker(rank: int, world_size: int, init_file: str, tmp_dir: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = make_model(Path(tmp_dir), itc_gather_batch=True, itm_negatives="global")  # same seed: same weights
        images, ids, mask = make_batch(batch_size=3, seed=rank)
        if rank == 1:  # ranks see different caption lengths
            ids, mask = ids[:, :6], mask[:, :6]
        out = model(images, ids, mask, alpha=0.4, ids=torch.tensor([0, 1, 1]) + 10 * rank)
        assert all(torch.isfinite(out[k]) for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"))
        out["loss"].backward()
        model.enqueue(*out["queue_update"])
        assert int(model.queue_ptr) == 6
        assert model.idx_queue[0, :6].tolist() == [0, 1, 1, 10, 11, 11]
        image_feat_m = out["queue_update"][0]
        torch.testing.assert_close(model.image_queue[:, 3 * rank: 3 * rank + 3], image_feat_m.t())
    finally:
        dist.destroy_distributed()


def test_two_process_model_with_gathered_itc_and_global_negatives(tmp_path):
    write_tiny_bert(tmp_path / "bert")  # written once, before the ranks start
    mp.spawn(_model_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
