"""The evaluation toolkit (albef/engine/evaluation.py): contiguous shards that a gather in rank
order puts back in row order, the one object gather, split -> files; identity in one process."""

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import pytest
from torch.utils.data import TensorDataset

from albef import dist
from albef.config import Config
from albef.engine.evaluation import eval_files, gather_lists, gather_objects, gather_rows, shard, shard_subset

pytestmark = pytest.mark.distributed  # 2 gloo ranks


def test_single_process_shards_everything_and_gathers_itself():
    assert shard(5) == slice(0, 5) and shard(0) == slice(0, 0)
    dataset = TensorDataset(torch.arange(4))
    assert list(shard_subset(dataset).indices) == [0, 1, 2, 3]
    assert gather_objects({"a": 1}) == [{"a": 1}]
    assert gather_lists(iter([3, 1])) == [3, 1]
    t = torch.arange(6).view(3, 2)
    assert gather_rows(t)[0] is t
    cfg = Config()
    cfg.eval.val_files, cfg.eval.test_files = ["v.json"], ["t1.json", "t2.json"]
    assert eval_files(cfg, "val") == ["v.json"] and eval_files(cfg, "test") == ["t1.json", "t2.json"]


def _worker(rank: int, world_size: int, init_file: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for num_rows in (0, 1, 3, 4, 7):
            block = shard(num_rows)
            mine = list(range(num_rows))[block]
            # contiguous blocks in rank order: gathering them gives every row once, in order
            assert gather_lists([(r, rank) for r in mine]) == [
                (r, owner) for owner in range(world_size) for r in range(num_rows)[_block(num_rows, owner, world_size)]]
            assert [r for r, _ in gather_lists([(r, rank) for r in mine])] == list(range(num_rows))
            rows, counts = gather_rows(torch.tensor(mine, dtype=torch.long).view(-1, 1))
            assert rows.view(-1).tolist() == list(range(num_rows)) and sum(counts) == num_rows
        assert gather_objects({"rank": rank}) == [{"rank": r} for r in range(world_size)]
    finally:
        dist.destroy_distributed()


def _block(num_rows: int, rank: int, world_size: int) -> slice:
    step = -(-num_rows // world_size)
    start = min(num_rows, rank * step)
    return slice(start, min(num_rows, start + step))


@pytest.mark.distributed
def test_two_ranks_contiguous_shards_gather_back_in_row_order(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "pg_init")), nprocs=2, join=True)
