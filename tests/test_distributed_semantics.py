"""Distributed semantics that hold at any world size, proven with real gloo processes on the CPU.

One spawn of 4 processes forms a 2-rank group, then a 4-rank group; each runs every distributed
probe and saves what each rank saw. The tests compare that with one process doing the same work
on the rank-ordered concatenation of the ranks' batches (world size 1).
"""

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from albef import dist
from albef.checkpoint import find_latest, load_checkpoint_file
from albef.data.datasets import load_annotations
from albef.data.sampler import ResumableDistributedSampler
from albef.dist import DistInfo
from albef.engine.trainer import Trainer, update_momentum
from albef.build import build_model
from albef.models import ALBEF
from albef.models import albef as albef_module
from albef.tasks.pretrain import PretrainTask, unwrap
from conftest import make_batch, make_model, pretrain_config, tiny_corpus, write_tiny_bert

pytestmark = pytest.mark.distributed

CPU = torch.device("cpu")
HANG_TIMEOUT = timedelta(minutes=5)  # a stuck collective fails the test instead of hanging it
WORLD_SIZES = (2, 4)  # in this order: the 4-rank run resumes the 2-rank run's checkpoint
GLOBAL_BATCH = 8
IMAGE_IDS = torch.tensor([0, 1, 2, 3, 0, 5, 1, 7])  # images 0 and 1 sit on two ranks at 2 and at 4 ranks
ITC_ONLY = {"itm": 0.0, "mlm": 0.0}  # nothing below depends on sampling
QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
QUEUE_STEPS = 4
NEGATIVE_DRAWS = 4

# Trainer runs: 13 images x 2 captions = 26 samples, 2 samples per rank and micro-batch. The first
# run (2 ranks) stops after 2 steps = 8 samples, a multiple of the 1- and 4-rank step sizes (2, 8).
NUM_IMAGES = 13
BATCH = 2
FIRST_RUN_STEPS = 2
NO_DROPOUT = ("model.text.config_overrides.hidden_dropout_prob=0.0",
              "model.text.config_overrides.attention_probs_dropout_prob=0.0")


# ----------------------------------------------------------------------------- shared helpers


def global_batch() -> tuple[torch.Tensor, ...]:
    """(images, input_ids, attention_mask, image ids) of the batch all ranks together hold."""
    return (*make_batch(GLOBAL_BATCH, seed=5), IMAGE_IDS)


def rank_slice(batch: tuple[torch.Tensor, ...], rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous share, captions cut to the rank's longest (as the collate pads)."""
    per_rank = GLOBAL_BATCH // world_size
    images, input_ids, mask, ids = (t[rank * per_rank:(rank + 1) * per_rank] for t in batch)
    length = int(mask.sum(dim=1).max())
    return images, input_ids[:, :length], mask[:, :length], ids


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors of two gradient dicts."""
    flat_a, flat_b = (torch.cat([d[k].flatten() for k in sorted(b)]) for d in (a, b))
    return float((flat_a - flat_b).norm() / flat_b.norm())


def queue_state(model: ALBEF) -> dict[str, torch.Tensor]:
    return {k: getattr(model, k).clone() for k in QUEUE_KEYS}


def momentum_state(model: ALBEF) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.split(".")[0].endswith("_m")}


def queue_features(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `rank` enqueues at `step`: 1-3 rows (uneven across ranks), 3 each at the last step
    (12 rows at 4 ranks: more than the queue of 8 holds)."""
    rows = 3 if step == QUEUE_STEPS - 1 else 1 + (rank + 2 * step) % 3
    gen = torch.Generator().manual_seed(1000 * step + rank)
    image, text = torch.randn(2, rows, 16, generator=gen)
    return image, text, torch.randint(100, (rows,), generator=gen)


class RecordingTask(PretrainTask):
    """The pretraining task, remembering each micro-batch and the model state it was trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def forward_step(self, model, batch, alpha):
        albef = unwrap(model)
        self.seen.append({
            "batch": {k: batch[k].clone() for k in ("images", "input_ids", "attention_mask", "ids", "index")},
            "alpha": alpha, "queue": queue_state(albef), "vision_proj_m": albef.vision_proj_m.weight.clone(),
        })
        return super().forward_step(model, batch, alpha)


class PerturbedMomentumTask(RecordingTask):
    """A fresh model's momentum copy equals the model, which hides how often the EMA ran; this
    task moves the momentum weights off the online ones (same noise on every rank)."""

    def build_model(self, cfg):
        model = super().build_model(cfg)
        with torch.no_grad():
            for p in momentum_state(model):
                model.get_parameter(p).add_(0.02 * torch.randn_like(model.get_parameter(p)))
        return model


def record_step_grads(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """The (DDP-averaged, accumulated) gradients the optimizer steps with."""
    recorded, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        recorded.append(grads(trainer.model))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return recorded


# ----------------------------------------------------------------------------- probes (per rank)


def itc_probe(workdir: Path, rank: int, world_size: int) -> dict:
    """ITC loss (mean over ranks) and DDP-averaged gradients, with and without the gathered batch."""
    images, input_ids, mask, ids = rank_slice(global_batch(), rank, world_size)
    out = {}
    for name, gather in (("gathered", True), ("local", False)):
        model = make_model(workdir, ITC_ONLY, itc_gather_batch=gather)
        ddp = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)
        result = ddp(images, input_ids, mask, alpha=0.4, ids=ids)
        result["loss"].backward()
        loss = result["loss_itc"].detach().clone()
        torch_dist.all_reduce(loss)
        out[name] = {"loss": loss / world_size, "grads": grads(model)}
    return out


def queue_probe(workdir: Path, rank: int) -> list[dict[str, torch.Tensor]]:
    """Queue state after each of QUEUE_STEPS enqueues of this rank's own features."""
    model = make_model(workdir)
    states = []
    for step in range(QUEUE_STEPS):
        model.enqueue(*queue_features(rank, step))
        states.append(queue_state(model))
    return states


def negatives_probe(workdir: Path, rank: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """The hard negatives ITM draws with loss.itm_negatives=global, and the fusion inputs they give,
    with image ids (same id = positive) and without (only the sample itself is positive)."""
    model = make_model(workdir, {"itc": 0.0, "mlm": 0.0}, itm_negatives="global")
    sample_negatives = albef_module.sample_negatives
    draws, fused = [], []

    def recording_sample(sim, exclude):
        draws.append((*sample_negatives(sim, exclude), exclude))
        return draws[-1][:2]

    def recording_fuse(fusion, image_embeds):  # the ITM rows of the fusion pass (ITM is all of it here)
        states, masks, kv_index, _, _ = fusion.concat(len(image_embeds))
        kv_images = torch.cat([image_embeds, *fusion.extra_images])
        fused.append((kv_images[kv_index], states, masks))
        return ALBEF._fuse(model, fusion, image_embeds)

    images, input_ids, mask, ids = rank_slice(global_batch(), rank, world_size)
    model._fuse = recording_fuse
    albef_module.sample_negatives = recording_sample
    out = {}
    try:
        torch.manual_seed(100 + rank)
        for name, sample_ids in (("with_ids", ids), ("without_ids", None)):
            draws.clear()
            fused.clear()
            with torch.no_grad():
                for _ in range(NEGATIVE_DRAWS):
                    model(images, input_ids, mask, alpha=0.4, ids=sample_ids)
            image_draws, text_draws = draws[0::2], draws[1::2]  # _itm samples images, then texts
            out[name] = {
                "neg_images": torch.stack([d[0] for d in image_draws]),
                "valid_images": torch.stack([d[1] for d in image_draws]),
                "neg_texts": torch.stack([d[0] for d in text_draws]),
                "valid_texts": torch.stack([d[1] for d in text_draws]),
                "exclude": torch.stack([d[2] for d in draws]),
                **{key: torch.stack([f[i] for f in fused])
                   for i, key in enumerate(("fused_images", "fused_texts", "fused_masks"))},
            }
    finally:
        albef_module.sample_negatives = sample_negatives
    return out


def first_run(corpus: dict, workdir: Path, info: DistInfo) -> dict:
    """Pretrain FIRST_RUN_STEPS steps; the samples each rank trained on."""
    cfg = pretrain_config(corpus, workdir / "first_run", f"train.batch_size={BATCH}",
                          f"train.max_steps={FIRST_RUN_STEPS}", "train.log_every=100")
    task = RecordingTask()
    assert Trainer(cfg, task, info).fit() == 0
    return {"indices": torch.cat([s["batch"]["index"] for s in task.seen])}


def resumed_run(corpus: dict, workdir: Path, info: DistInfo) -> dict:
    """Resume the first run on `info.world_size` ranks and train to the end of the epoch."""
    cfg = pretrain_config(corpus, workdir / f"resumed_{info.world_size}", f"train.batch_size={BATCH}",
                          "train.max_steps=null", "train.log_every=100")
    checkpoint = load_checkpoint_file(find_latest(workdir / "first_run" / "checkpoints"))
    task = RecordingTask()
    trainer = Trainer(cfg, task, info, resume=str(workdir / "first_run"))
    loaded = trainer.model.state_dict()
    mismatched = [k for k, v in checkpoint["model"].items() if not torch.equal(loaded[k], v)]
    state_at_resume = vars(trainer.state).copy()
    assert trainer.fit() == 0
    return {
        "mismatched": mismatched, "state_at_resume": state_at_resume, "final_state": vars(trainer.state).copy(),
        "indices": torch.cat([s["batch"]["index"] for s in task.seen]), "queue": queue_state(trainer.model),
    }


def accumulation_probe(corpus: dict, workdir: Path, info: DistInfo) -> dict:
    """One optimizer step of 2 micro-batches of BATCH, and one step of 2 * BATCH (ITC only, lr 0,
    no dropout): batches, state seen by each micro-batch, gradients, momentum weights, queues."""
    out = {}
    for name, batch_size, accum in (("accum", BATCH, 2), ("full", 2 * BATCH, 1)):
        cfg = pretrain_config(
            corpus, workdir / name, f"train.batch_size={batch_size}", f"train.grad_accum={accum}",
            "train.max_steps=1", "loss.weights.itm=0.0", "loss.weights.mlm=0.0", *NO_DROPOUT,
            "optim.warmup_lr=0.0",  # step 0 runs at warmup_lr: online weights stay, the EMA still moves
        )
        task = PerturbedMomentumTask()
        trainer = Trainer(cfg, task, info)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        step_grads = record_step_grads(trainer)
        assert trainer.fit() == 0
        out[name] = {
            "before": before, "seen": task.seen, "grads": step_grads[0],
            "momentum": momentum_state(trainer.model), "queue": queue_state(trainer.model),
        }
    return out


def run_world(rank: int, world_size: int, workdir: Path, corpus: dict) -> None:
    """Every probe of one world size on this rank; the results go to world{R}_rank{r}.pt."""
    init_file = workdir / f"pg_init_{world_size}"
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                  timeout=HANG_TIMEOUT)
    try:
        info = DistInfo(rank, world_size, rank, CPU)
        results = {
            "itc": itc_probe(workdir, rank, world_size),
            "queue": queue_probe(workdir, rank),
            "negatives": negatives_probe(workdir, rank, world_size),
        }
        if world_size == 2:
            results["first_run"] = first_run(corpus, workdir, info)
            results["accumulation"] = accumulation_probe(corpus, workdir, info)
        else:
            results["resumed"] = resumed_run(corpus, workdir, info)
        torch.save(results, workdir / f"world{world_size}_rank{rank}.pt")
    finally:
        dist.destroy_distributed()


def _worker(process: int, workdir: str, corpus: dict) -> None:
    """One spawned process serves every world size it is part of, smallest first (the 4-rank
    group forms only once the 2-rank group is done, so it can resume that run's checkpoint)."""
    torch.set_num_threads(1)
    for world_size in WORLD_SIZES:
        if process < world_size:
            run_world(process, world_size, Path(workdir), corpus)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """Spawns max(WORLD_SIZES) processes once for the whole file; every rank's results by world size."""
    workdir = tmp_path_factory.mktemp("dist_semantics")
    write_tiny_bert(workdir / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    corpus = tiny_corpus(workdir / "corpus", num_train=NUM_IMAGES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(str(workdir), corpus), nprocs=max(WORLD_SIZES), join=True)
    results = {ws: [torch.load(workdir / f"world{ws}_rank{r}.pt", weights_only=True) for r in range(ws)]
               for ws in WORLD_SIZES}
    return SimpleNamespace(workdir=workdir, corpus=corpus, results=results)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gathered_itc_matches_one_process_on_the_whole_batch(runs, world_size):
    """loss.itc_gather_batch=true: R ranks with B samples each give the ITC loss (mean over ranks)
    and the DDP-averaged gradients of one process with the R*B batch; with the ALBEF default
    (local in-batch negatives) the loss differs, because each rank contrasts only its own batch."""
    model = make_model(runs.workdir, ITC_ONLY, itc_gather_batch=True)
    images, input_ids, mask, ids = global_batch()
    reference = model(images, input_ids, mask, alpha=0.4, ids=ids)
    reference["loss"].backward()
    reference_grads = grads(model)

    for rank_results in runs.results[world_size]:
        gathered, local = rank_results["itc"]["gathered"], rank_results["itc"]["local"]
        torch.testing.assert_close(gathered["loss"], reference["loss_itc"].detach(), rtol=1e-5, atol=1e-6)
        assert gathered["grads"].keys() == reference_grads.keys()
        torch.testing.assert_close(gathered["grads"], reference_grads, rtol=1e-4, atol=1e-6)
        # local negatives: off by ~1e-3 in the loss and ~5e-4 relative in the gradient, against
        # float noise of ~1e-6 and ~1e-7 when gathered
        assert (local["loss"] - reference["loss_itc"].detach()).abs() > 5e-4
        assert relative_difference(local["grads"], reference_grads) > 1e-4


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_queues_agree_on_every_rank_and_with_one_process(runs, world_size):
    """After uneven per-rank enqueues that wrap around (one larger than the queue at 4 ranks),
    every rank holds the queues one process holds after enqueuing the rank-ordered concatenations."""
    model = make_model(runs.workdir)
    queue_size = model.image_queue.shape[1]
    total = 0
    for step in range(QUEUE_STEPS):
        parts = [queue_features(rank, step) for rank in range(world_size)]
        model.enqueue(*(torch.cat(columns) for columns in zip(*parts)))
        total += sum(len(p[0]) for p in parts)
        for rank_results in runs.results[world_size]:
            for key, value in queue_state(model).items():
                assert torch.equal(rank_results["queue"][step][key], value), (step, key)
    assert total > queue_size  # the ring buffer wrapped around
    assert int(model.queue_ptr) == total % queue_size


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_global_hard_negatives_come_from_every_rank_and_are_never_positives(runs, world_size):
    """loss.itm_negatives=global: a rank's hard negatives are drawn from all ranks' samples (some
    from other ranks), are never a positive (with ids: never the anchor's image id, which repeats
    across ranks; without: never the sample itself, located by the rank's offset), and the drawn
    global index picks exactly that sample's image/text states and mask for the fusion encoder."""
    model = make_model(runs.workdir, {"itc": 0.0, "mlm": 0.0}, itm_negatives="global")
    images, input_ids, mask, ids = global_batch()
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
        text_embeds = model.text_tokens(input_ids, mask)[0]
    per_rank = GLOBAL_BATCH // world_size
    for rank, rank_results in enumerate(runs.results[world_size]):
        rows = torch.arange(rank * per_rank, (rank + 1) * per_rank)
        for mode, r in rank_results["negatives"].items():
            columns = torch.arange(GLOBAL_BATCH)  # the gathered candidates, in rank order
            positives = ids[rows, None] == ids[columns] if mode == "with_ids" else rows[:, None] == columns
            assert torch.equal(r["exclude"], positives.expand_as(r["exclude"])), f"rank {rank} ({mode})"
            for kind in ("images", "texts"):
                negatives = r[f"neg_{kind}"]
                assert r[f"valid_{kind}"].all()
                positive = ids[negatives] == ids[rows] if mode == "with_ids" else negatives == rows
                assert not positive.any(), f"rank {rank} ({mode}) drew a positive as a negative {kind[:-1]}"
                outside = (negatives < rows[0]) | (negatives > rows[-1])
                assert outside.any(), f"rank {rank} ({mode}): only local negative {kind}"
            for draw in range(NEGATIVE_DRAWS):
                neg_images, neg_texts = r["neg_images"][draw], r["neg_texts"][draw]
                fused_images, fused_texts, fused_masks = (
                    r[k][draw] for k in ("fused_images", "fused_texts", "fused_masks"))
                close = dict(rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(fused_images[:per_rank], image_embeds[rows], **close)
                torch.testing.assert_close(fused_images[per_rank:2 * per_rank], image_embeds[neg_images], **close)
                assert torch.equal(fused_masks[2 * per_rank:], mask[neg_texts])
                valid = mask[neg_texts].bool()  # states past a caption's end are padding
                torch.testing.assert_close(fused_texts[2 * per_rank:][valid], text_embeds[neg_texts][valid], **close)


def test_two_rank_checkpoint_resumes_on_one_and_four_ranks(runs):
    """A checkpoint of a 2-rank run resumes on 1 and on 4 ranks with the same weights, momentum
    weights, queues and step; the resumed ranks' queues stay identical; and the samples trained on
    before and after the resume cover the epoch's permutation exactly once, less a tail shorter
    than one resumed step."""
    checkpoint = load_checkpoint_file(find_latest(runs.workdir / "first_run" / "checkpoints"))
    train_state = checkpoint["train_state"]
    assert (train_state["epoch"], train_state["step"], train_state["consumed"]) == (0, FIRST_RUN_STEPS, 8)
    num_samples = len(load_annotations(runs.corpus["train"]))
    sampler = ResumableDistributedSampler(num_samples, seed=checkpoint["config"]["seed"])
    sampler.set_epoch(0)
    permutation = sampler.permutation().tolist()
    before = torch.cat([r["first_run"]["indices"] for r in runs.results[2]]).tolist()
    assert sorted(before) == sorted(permutation[:train_state["consumed"]])

    single = resumed_run(runs.corpus, runs.workdir, DistInfo(0, 1, 0, CPU))
    for world_size, ranks in ((1, [single]), (4, [r["resumed"] for r in runs.results[4]])):
        for rank_results in ranks:
            assert rank_results["mismatched"] == [], world_size
            assert rank_results["state_at_resume"] == train_state, world_size
            assert rank_results["final_state"]["epoch"] == 1 and rank_results["final_state"]["consumed"] == 0
            for key in QUEUE_KEYS:
                assert torch.equal(rank_results["queue"][key], ranks[0]["queue"][key]), (world_size, key)
        after = torch.cat([r["indices"] for r in ranks]).tolist()
        seen = before + after
        assert len(set(seen)) == len(seen), f"{world_size} ranks: a sample was trained on twice"
        assert sorted(seen) == sorted(permutation[:len(seen)]), world_size
        assert num_samples - len(seen) < world_size * BATCH, world_size
        steps = len(after) // (world_size * BATCH)
        assert ranks[0]["final_state"]["step"] == FIRST_RUN_STEPS + steps


def test_accumulation_matches_the_double_batch_where_it_is_mathematically_equal(runs, tmp_path):
    """grad_accum=2 at batch B against batch 2B (2 ranks, ITC only, lr 0 so the online weights stay):

    (a) EMA and enqueue happen once per optimizer step: both micro-batches see the pre-step queue
        and the momentum weights after the step's one EMA (ALBEF's timing: the EMA runs before the
        step's first forward), and after the step the momentum weights (one EMA from the perturbed
        start) and the queues equal those of the 2B step.
    (b) The accumulated gradient equals the mean over ranks and micro-batches of each micro-batch's
        own ITC gradient against the pre-step state. It does NOT equal the 2B gradient: an ALBEF
        ITC row is a softmax over its in-batch candidates plus the queue, so a micro-batch row has
        B - 1 in-batch negatives where a 2B row has 2B - 1. Only that per-micro-batch sum is
        invariant; the test checks the difference is real.
    """
    ranks = [r["accumulation"] for r in runs.results[2]]
    cfg = pretrain_config(runs.corpus, tmp_path, "loss.weights.itm=0.0", "loss.weights.mlm=0.0", *NO_DROPOUT)
    model = build_model(cfg)
    momentum = model.momentum

    for rank_results in ranks:
        accum, full = rank_results["accum"], rank_results["full"]
        assert len(accum["seen"]) == 2 and len(full["seen"]) == 1
        micro_indices = torch.cat([s["batch"]["index"] for s in accum["seen"]])
        assert torch.equal(micro_indices, full["seen"][0]["batch"]["index"])  # the same samples
        ema_proj = torch.lerp(accum["before"]["vision_proj_m.weight"], accum["before"]["vision_proj.weight"],
                              1 - momentum)
        for seen in accum["seen"]:
            torch.testing.assert_close(seen["vision_proj_m"], ema_proj, rtol=0, atol=1e-6)
            assert torch.equal(seen["vision_proj_m"], full["seen"][0]["vision_proj_m"])
            for key in QUEUE_KEYS:
                assert torch.equal(seen["queue"][key], accum["before"][key])

        for name, after in accum["momentum"].items():
            assert torch.equal(after, full["momentum"][name]), name
            online = accum["before"][name.replace("_m.", ".", 1)]
            once = torch.lerp(accum["before"][name], online, 1 - momentum)
            torch.testing.assert_close(after, once, rtol=0, atol=1e-6)
        assert not torch.equal(accum["momentum"]["vision_proj_m.weight"], accum["before"]["vision_proj_m.weight"])
        for key in ("idx_queue", "queue_ptr"):
            assert torch.equal(accum["queue"][key], full["queue"][key])
        for key in ("image_queue", "text_queue"):
            torch.testing.assert_close(accum["queue"][key], full["queue"][key], rtol=1e-4, atol=1e-5)
        assert int(accum["queue"]["queue_ptr"]) == 2 * 2 * BATCH

    references = {}
    for name in ("accum", "full"):
        model.load_state_dict(ranks[0][name]["before"])
        update_momentum(model)  # the step's one EMA, before its first forward (as the engine)
        model.zero_grad(set_to_none=True)
        micro_batches = [seen for r in ranks for seen in r[name]["seen"]]
        for seen in micro_batches:
            b = seen["batch"]
            out = model(b["images"], b["input_ids"], b["attention_mask"], alpha=seen["alpha"], ids=b["ids"])
            (out["loss"] / len(micro_batches)).backward()
        references[name] = grads(model)
        for rank_results in ranks:
            torch.testing.assert_close(rank_results[name]["grads"], references[name], rtol=1e-4, atol=1e-6)

    assert relative_difference(references["accum"], references["full"]) > 1e-3
