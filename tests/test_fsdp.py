"""FSDP2 against DDP on 2 CPU ranks (gloo, real processes), and .dcp checkpoints: atomic
directories found by find_latest, pruned by keep_last, reloaded at another world size.

The 2-rank part runs this file as a torchrun script: the same tiny pretraining run once with
train.strategy=ddp and once with fsdp (2 steps of 2 accumulated micro-batches, clipping on),
then reloads the FSDP checkpoint on 2 ranks and the DDP checkpoint into a sharded model.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from albef.checkpoint import (DCP_TRAINER_STATE, find_latest, load_checkpoint_file, publish_checkpoint_dir,
                              resolve_resume, CheckpointError, tmp_checkpoint_dir)
from albef.config import ConfigError, load_config
from albef.dist import DistInfo
from albef.engine.trainer import Trainer
from albef.tasks.pretrain import PretrainTask
from conftest import run_torchrun

pytestmark = pytest.mark.distributed

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
STEPS = 2


def tiny_config(corpus: dict, out: Path, strategy: str, *extra: str):
    return load_config(str(CONFIG), [
        f"output_dir={out}", f"data.train_files=[{corpus['train']}]", f"data.image_root={corpus['image_root']}",
        f"model.text.bert={corpus['bert']}", f"train.strategy={strategy}", "train.batch_size=2",
        "train.grad_accum=2", "train.clip_grad=0.05", f"train.max_steps={STEPS}", f"train.ckpt_every={STEPS}",
        "train.keep_last=1", "optim.lr=1e-3", "optim.warmup_lr=1e-3", "model.vision.depth=1",
        "model.text.fusion_layer=1", "model.text.config_overrides.num_hidden_layers=2", *extra,
    ])


def full_model_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every rank's model gathered into full CPU tensors (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not trainer.sharded:
        return {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def worker(corpus_json: str, root: str) -> None:
    """torchrun entry: DDP run, FSDP run, then reload both checkpoints into sharded models."""
    from albef.dist import destroy_distributed, init_distributed

    corpus, root = json.loads(corpus_json), Path(root)
    dist = init_distributed()
    for strategy in ("ddp", "fsdp"):
        Trainer(tiny_config(corpus, root / strategy, strategy), PretrainTask(), dist).fit()
    resumed = {
        "fsdp_reloaded": Trainer(tiny_config(corpus, root / "fsdp", "fsdp"), PretrainTask(), dist, resume="auto"),
        "ddp_into_fsdp": Trainer(tiny_config(corpus, root / "x", "fsdp"), PretrainTask(), dist,
                                 resume=str(root / "ddp" / "checkpoints")),
    }
    for name, trainer in resumed.items():
        assert trainer.sharded and trainer.state.step == STEPS
        state = full_model_state(trainer)
        if dist.rank == 0:
            torch.save(state, root / f"{name}.pt")
    destroy_distributed()


def run_two_ranks(corpus: dict, root: Path) -> None:
    run_torchrun([__file__, json.dumps(corpus), str(root)])


def logged(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "event" not in r]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    from albef.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("fsdp")
    corpus = generate_corpus(str(root / "corpus"), num_train=8, num_test=2, image_size=32)
    run_two_ranks(corpus, root)
    return corpus, root


def test_fsdp_matches_ddp_losses_and_weights(two_rank_runs):
    _, root = two_rank_runs
    ddp, fsdp = logged(root / "ddp"), logged(root / "fsdp")
    assert [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, fsdp):
        for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)

    ddp_state = load_checkpoint_file(root / "ddp" / "checkpoints" / f"step_{STEPS:08d}.pt")["model"]
    fsdp_state = torch.load(root / "fsdp_reloaded.pt", weights_only=True)
    for key in ("visual_encoder.blocks.0.attn.qkv.weight", "text_encoder.bert.encoder.layer.1.output.dense.weight"):
        momentum_key = key.replace("_encoder.", "_encoder_m.", 1)  # equal at init: the runs did learn
        assert not torch.allclose(ddp_state[key], ddp_state[momentum_key], atol=1e-4)
    assert int(ddp_state["queue_ptr"]) == STEPS * 2 * 2 * 2  # steps x micro-batches x batch x ranks
    assert_same_weights(ddp_state, fsdp_state, atol=1e-5)  # online, momentum, temp, queues


def test_ddp_checkpoint_loads_into_sharded_model(two_rank_runs):
    _, root = two_rank_runs
    ddp_state = load_checkpoint_file(root / "ddp" / "checkpoints" / f"step_{STEPS:08d}.pt")["model"]
    assert_same_weights(ddp_state, torch.load(root / "ddp_into_fsdp.pt", weights_only=True), atol=0)


def test_fsdp_checkpoint_is_an_atomic_dcp_directory(two_rank_runs):
    _, root = two_rank_runs
    ckpt_dir = root / "fsdp" / "checkpoints"
    latest = ckpt_dir / f"step_{STEPS:08d}.dcp"
    assert find_latest(ckpt_dir) == latest
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", latest.name]  # keep_last=1, no temp dirs
    state = load_checkpoint_file(latest / DCP_TRAINER_STATE)
    assert state["train_state"]["step"] == STEPS and len(state["rng"]) == 2
    assert state["config"]["train"]["strategy"] == "fsdp"


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_rank_fsdp_checkpoint_reloads_on_one_rank(two_rank_runs, strategy):
    corpus, root = two_rank_runs
    cfg = tiny_config(corpus, root / f"one_{strategy}", strategy)
    trainer = Trainer(cfg, PretrainTask(), CPU, resume=str(root / "fsdp" / "checkpoints"))
    assert trainer.state.step == STEPS
    reloaded_on_two = torch.load(root / "fsdp_reloaded.pt", weights_only=True)
    assert_same_weights(full_model_state(trainer), reloaded_on_two, atol=0)  # weights, _m copies, queues
    assert trainer.optimizer.state_dict()["state"]  # AdamW moments restored too


def test_fp16_with_fsdp_is_a_config_error(tmp_path):
    cfg = load_config(str(CONFIG), [f"output_dir={tmp_path}", "train.strategy=fsdp", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.precision"):
        Trainer(cfg, PretrainTask(), CPU)


def fake_dcp(ckpt_dir: Path, step: int, complete: bool = True) -> Path:
    """A .dcp directory as the engine writes it, holding one small tensor."""
    import torch.distributed.checkpoint as dcp

    tmp = tmp_checkpoint_dir(ckpt_dir, step)
    dcp.save({"w": torch.zeros(2)}, checkpoint_id=tmp)
    if not complete:
        (tmp / ".metadata").unlink()
    return publish_checkpoint_dir(tmp, {"train_state": {"step": step}}, ckpt_dir, step, keep_last=2)


def test_find_latest_and_pruning_handle_dcp_directories(tmp_path):
    paths = [fake_dcp(tmp_path, step) for step in (1, 2, 3)]
    assert not paths[0].exists() and paths[1].is_dir()  # keep_last=2 removed a whole directory
    assert find_latest(tmp_path) == paths[2]
    (paths[2] / ".metadata").unlink()  # an interrupted shard write is never picked
    with pytest.warns(UserWarning, match="step_00000003.dcp"):
        assert find_latest(tmp_path) == paths[1]
    with pytest.raises(CheckpointError, match="incomplete .dcp"):
        resolve_resume(str(paths[2]), tmp_path)
    assert resolve_resume(str(paths[1]), tmp_path) == paths[1]
    stale = tmp_path / ".step_00000009.dcp.nohost.1.tmp"
    stale.mkdir()
    assert find_latest(tmp_path) == paths[1]  # temp directories are no candidates


def test_same_step_checkpoint_is_replaced_whole(tmp_path):
    first = fake_dcp(tmp_path, 4)
    (first / "stale_shard").write_bytes(b"x")
    second = fake_dcp(tmp_path, 4)
    assert second == first and not (second / "stale_shard").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


if __name__ == "__main__":
    worker(*sys.argv[1:])
