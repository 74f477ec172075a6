"""FSDP2 data parallelism on the CPU: 2 gloo processes against one process on the same global batch.

Each multi-process test spawns 2 workers once and runs several scenarios in them (process start-up,
not the tiny model, is the cost). Workers write their results with torch.save (read back weights-only); the comparisons run here,
against a plain single-process model (no FSDP, no process group) trained on the whole global batch.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.train import distributed as D

WORLD = 2
GLOBAL_ROWS, SEQ, VOCAB = 4, 12, 96
DRAFT = 24  # draft-vocabulary variants: the heads score 24 of the 96 tokens
DRAFT_MAP = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(9))[:DRAFT]
CASES = [(1, True, False, False), (2, True, False, False), (2, False, False, False), (1, False, True, False),
         (1, False, False, True), (2, True, True, True)]  # (stage, tied, shared LM head, draft vocab)  # fmt: skip
LR, MAX_NORM = 2e-2, 0.5
TOL = {"rtol": 1e-4, "atol": 2e-5}


# -- shared by the workers and the single-process reference ----------------------------------------------
def tiny_model(
    stage: int, tied: bool = True, shared_lm_head: bool = False, draft: bool = False
) -> MedusaModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    base = LlamaForCausalLM(config)
    token_map = DRAFT_MAP if draft else None
    config = MedusaConfig(
        num_heads=2, num_layers=1, shared_lm_head=shared_lm_head, draft_vocab_size=DRAFT if draft else None
    )
    model = MedusaModel.from_base(base, config, token_map)
    with torch.no_grad():  # zero-initialised ResBlocks would make every head the same function at step 0
        for p in model.medusa_heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_stage(stage)
    return model


def global_batch(step: int, draft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ), generator=g)
    if draft:  # tokens of the draft vocabulary only: every rank scores as many positions as the others
        ids = DRAFT_MAP[ids % DRAFT]
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt, the same length in every row: equal token counts per rank
    return ids, labels


def local_rows(tensor: torch.Tensor) -> torch.Tensor:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per = GLOBAL_ROWS // world
    return tensor[rank * per : (rank + 1) * per]


def make_optimizer(model: MedusaModel) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)


def train_steps(model: MedusaModel, optimizer, steps: range) -> list[float]:
    """One optimiser step per global batch; returns the global mean loss of each step."""
    losses = []
    for step in steps:
        ids, labels = global_batch(step, draft=model.medusa_heads.token_map is not None)
        out = model(local_rows(ids), labels=local_rows(labels), impl="chunked")
        out.loss.backward()
        D.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(D.all_reduce_mean(out.loss.item()))
    return losses


def full_trainable_state(model: MedusaModel) -> dict[str, torch.Tensor]:
    """Every trainable parameter as a full CPU tensor (collective under FSDP; rank 0 gets the values)."""
    return {k: v.clone() for k, v in D.trainable_state_dict(model, full=True).items()}


# -- workers ---------------------------------------------------------------------------------------------
def _worker(rank: int, port: int, scenario: str, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.is_main, info.device.type) == (rank, WORLD, rank == 0, "cpu")
    try:
        results = SCENARIOS[scenario](Path(out_dir))
        if info.is_main:
            torch.save(results, Path(out_dir) / f"{scenario}.pt")
    finally:
        D.cleanup()


def _count_reduce_scatters() -> dict:
    """Wrap the reduce-scatter entry points FSDP2 calls (the name changed across torch versions)."""
    counter = {"n": 0}
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        if hasattr(dist, name):
            original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                counter["n"] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
    return counter


def _scenario_train(out_dir: Path) -> dict:
    results = {}
    counter = _count_reduce_scatters()
    for stage, tied, shared, draft in CASES:
        model = D.apply_fsdp(
            tiny_model(stage, tied, shared, draft), stage=stage, activation_checkpointing=stage == 2
        )
        seen = []
        rows = DRAFT if draft else VOCAB

        def check_gathered(module, args, kwargs, seen=seen, rows=rows, shared=shared):
            # FSDP's pre-forward hooks ran before this one: the weights the loss kernel reads must be whole
            # (a shared draft projection is a gather of the LM head's rows, a plain tensor)
            lm = module.base_lm_head.weight
            ok = type(lm) is torch.nn.Parameter and lm.shape == (VOCAB, 32)
            for w in module.projection_weights():
                ok &= (type(w) is torch.nn.Parameter or shared) and w.shape == (rows, 32)
            seen.append(ok)

        model.medusa_heads.register_forward_pre_hook(check_gathered, with_kwargs=True)
        optimizer = make_optimizer(model)
        before = counter["n"]
        losses = train_steps(model, optimizer, range(3))
        key = f"stage{stage}_tied{int(tied)}_shared{int(shared)}" + ("_draft1" if draft else "")
        results[key] = {
            "losses": losses,
            "state": full_trainable_state(model),
            "reduce_scatters_per_step": (counter["n"] - before) / 3,
            "gathered_in_heads_forward": all(seen) and len(seen) == 3,
        }
        exported = D.export_heads(model, out_dir / f"heads_{key}")
        results[key]["exported"] = None if exported is None else str(exported)
        if stage == 2:  # the trained backbone, gathered from its shards and written by rank 0
            backbone = D.export_backbone(model, out_dir / f"model_{key}")
            results[key]["backbone"] = None if backbone is None else str(backbone)
        # gathered_heads lets metrics bypass forward: top-k hits of the sharded model on a batch
        ids, labels = global_batch(7)
        with torch.no_grad(), D.gathered_heads(model):
            hidden = model.backbone_hidden_states(local_rows(ids))
            hits, counts = model.medusa_heads.topk_correct(hidden, local_rows(labels), ks=(1, 5))
        results[key]["topk_hits"] = D.all_reduce_sum(hits.double())
        results[key]["topk_counts"] = D.all_reduce_sum(counts)
    results["metrics"] = {
        "mean": D.all_reduce_mean(float(dist.get_rank())),
        "max": D.all_reduce_max(torch.tensor([dist.get_rank(), 5.0 - dist.get_rank()])),
    }
    return results


def _scenario_resume(out_dir: Path) -> dict:
    from fastmedusa.train.checkpoint import checkpoint_dir

    results = {}
    # saved at world size 2 (stage 2, activation checkpointing on), continued at 2
    model = D.apply_fsdp(tiny_model(2), stage=2, activation_checkpointing=True)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, range(2))
    extra = {"step": 2, "data_position": 8 + dist.get_rank(), "rng": [dist.get_rank(), 7]}
    saved = D.save_checkpoint(out_dir / "ckpt_w2", 2, model, optimizer, extra)
    results["saved"] = str(saved)
    results["continued_losses"] = train_steps(model, optimizer, range(2, 4))
    results["continued"] = full_trainable_state(model)
    # a checkpoint the parent saved at world size 1 (stage 1), resumed at 2
    model = D.apply_fsdp(tiny_model(1), stage=1)
    optimizer = make_optimizer(model)
    extra = D.load_checkpoint(checkpoint_dir(out_dir / "ckpt_w1", 2), model, optimizer)
    results["extra_from_w1"] = extra
    results["from_w1_losses"] = train_steps(model, optimizer, range(2, 4))
    results["from_w1"] = full_trainable_state(model)
    return results


SCENARIOS = {"train": _scenario_train, "resume": _scenario_resume}


def _spawn(scenario: str, out_dir: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, scenario, str(out_dir)), nprocs=WORLD, join=True)
    return torch.load(out_dir / f"{scenario}.pt", weights_only=True)


def _assert_state_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


def _single_process_run(stage: int, steps: range, **model_kwargs) -> tuple[list[float], MedusaModel]:
    model = tiny_model(stage, **model_kwargs)
    return train_steps(model, make_optimizer(model), steps), model


# -- tests -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_results(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("fsdp_train")
    return _spawn("train", out), out


@pytest.mark.parametrize("stage, tied, shared, draft", CASES)
def test_fsdp_matches_single_process(train_results, stage, tied, shared, draft):
    results, _ = train_results
    got = results[f"stage{stage}_tied{int(tied)}_shared{int(shared)}" + ("_draft1" if draft else "")]
    losses, model = _single_process_run(stage, range(3), tied=tied, shared_lm_head=shared, draft=draft)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), **TOL)
    expected = D.trainable_state_dict(model)  # both names of a tied weight, as the gathered state has
    initial = tiny_model(stage, tied=tied, shared_lm_head=shared, draft=draft).state_dict()
    moved = {k for k, v in expected.items() if not torch.equal(v, initial[k])}
    assert moved == set(expected) - {"medusa_heads.token_map"}  # every trainable tensor moved
    _assert_state_close(got["state"], expected)  # the token map (a buffer) included
    assert got["gathered_in_heads_forward"]
    ids, labels = global_batch(7)
    with torch.no_grad():
        hits, counts = model.medusa_heads.topk_correct(model.backbone_hidden_states(ids), labels, ks=(1, 5))
    torch.testing.assert_close(got["topk_hits"], hits.double())
    assert torch.equal(got["topk_counts"], counts)


def test_stage1_reduces_only_the_heads(train_results):
    """Frozen backbone: one reduce-scatter per step (the heads unit), none for the blocks or the root."""
    results, _ = train_results
    assert results["stage1_tied1_shared0"]["reduce_scatters_per_step"] == 1
    # shared LM head: the heads' ResBlocks sit in the root unit, the only unit with gradients
    assert results["stage1_tied0_shared1"]["reduce_scatters_per_step"] == 1
    # stage 2: 2 blocks + heads + root
    assert results["stage2_tied1_shared0"]["reduce_scatters_per_step"] == 4


def test_export_heads_loads_into_medusa_model(train_results):
    results, _ = train_results
    for key in ("stage1_tied1_shared0", "stage2_tied0_shared0", "stage1_tied0_shared0_draft1"):
        got = results[key]
        stage, tied = int(key[5]), key[10] == "1"
        fresh = tiny_model(stage, tied=tied, draft=key.endswith("draft1"))
        fresh.load_heads(got["exported"])
        for name, value in fresh.medusa_heads.state_dict().items():
            torch.testing.assert_close(value, got["state"][f"medusa_heads.{name}"], rtol=0, atol=0)


def test_export_backbone_writes_the_trained_full_weights(train_results):
    from transformers import AutoModelForCausalLM

    results, _ = train_results
    for key in ("stage2_tied1_shared0", "stage2_tied0_shared0"):
        got = results[key]
        saved = AutoModelForCausalLM.from_pretrained(got["backbone"])
        for name, value in saved.state_dict().items():
            torch.testing.assert_close(value, got["state"][f"base.{name}"], rtol=0, atol=0, msg=name)


def test_metric_reductions(train_results):
    results, _ = train_results
    assert results["metrics"]["mean"] == pytest.approx(0.5)
    assert torch.equal(results["metrics"]["max"], torch.tensor([1.0, 5.0]))


def test_resume_across_world_sizes(tmp_path):
    # world size 1 (no process group, no FSDP) writes a checkpoint the workers resume at world size 2
    ref_losses, ref_model = _single_process_run(1, range(4))
    model = tiny_model(1)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, range(2))
    D.save_checkpoint(tmp_path / "ckpt_w1", 2, model, optimizer, {"step": 2, "note": "from w1"})

    results = _spawn("resume", tmp_path)

    heads_ref = D.trainable_state_dict(ref_model)
    assert results["extra_from_w1"] == {"step": 2, "note": "from w1"}
    _assert_state_close(results["from_w1"], heads_ref)
    torch.testing.assert_close(torch.tensor(results["from_w1_losses"]), torch.tensor(ref_losses[2:]), **TOL)

    # saved at world size 2, resumed here at world size 1 == continued at 2 == uninterrupted single process
    stage2_losses, stage2_model = _single_process_run(2, range(4))
    full_ref = D.trainable_state_dict(stage2_model)
    _assert_state_close(results["continued"], full_ref)
    model = tiny_model(2)
    optimizer = make_optimizer(model)
    extra = D.load_checkpoint(results["saved"], model, optimizer)
    assert extra["step"] == 2 and extra["data_position"] == 8  # rank 0's extra when the world size changes
    losses = train_steps(model, optimizer, range(2, 4))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stage2_losses[2:]), **TOL)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(results["continued_losses"]), **TOL)
    _assert_state_close(D.trainable_state_dict(model), full_ref)
    assert not list(Path(results["saved"]).parent.glob(".tmp-*"))  # the temp dir was renamed


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert D.all_reduce_mean(3.0) == 3.0 and D.is_main_process()
    with pytest.raises(RuntimeError, match="torchrun"):
        D.apply_fsdp(tiny_model(1))


def test_shard_rows_splits_the_global_batch():
    ids, labels = global_batch(0)
    parts = [D.shard_rows({"input_ids": ids, "labels": labels}, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), ids)
    assert torch.equal(parts[1]["labels"], labels[2:])
    with pytest.raises(ValueError, match="multiple of 3"):
        D.shard_rows({"input_ids": ids}, 0, 3)


def test_backend_reads_accelerate_settings(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    backend = D.FSDPBackend.from_env()
    assert backend.param_dtype == torch.bfloat16
    assert backend.activation_checkpointing and not backend.reshard_after_forward
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        D.FSDPBackend.from_env()


def test_accelerate_example_config_is_fsdp2():
    import yaml

    path = Path(__file__).parents[2] / "examples" / "accelerate_fsdp2.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] == "FSDP"
    assert config["fsdp_config"]["fsdp_version"] == 2
    assert config["mixed_precision"] == "bf16"
