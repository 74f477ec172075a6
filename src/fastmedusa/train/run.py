"""A whole training run from a `TrainConfig`: data, model, `Trainer.fit`, exported heads."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fastmedusa.files import input_path, shared_name
from fastmedusa.model.export import BACKBONE_NAME
from fastmedusa.train import checkpoint as ckpt
from fastmedusa.train.backend import SingleProcess
from fastmedusa.train.config import TrainConfig, check_output_dir
from fastmedusa.train.distributed import FSDPBackend, barrier, cleanup, init_distributed, is_main_process
from fastmedusa.train.trainer import Trainer, summary_lines

logger = logging.getLogger(__name__)
EMBEDDED_MODEL_NAME = "embedded"  # what the heads' config records for the default model (portable alias)


def build_data(config: TrainConfig, tokenizer, world_size: int = 1) -> tuple[object, list[dict]]:
    """(resumable training batches, held-out batches): read, split by conversation, encode, batch.

    Every process builds the same global batches of batch_size x world_size rows (the Trainer keeps its
    slice), so the data position is one number that resumes at any world size."""
    from fastmedusa.data import ConversationBatches, encode_dataset, read_sharegpt, train_eval_split

    conversations, n_skipped = read_sharegpt(config.data, limit=config.max_conversations)
    say(conversations.stats.summary() if getattr(conversations, "stats", None) else f"{n_skipped} skipped")
    if config.eval_size:
        train_convs, eval_convs = train_eval_split(conversations, config.eval_size, seed=config.seed)
    else:
        train_convs, eval_convs = list(conversations), []
    progress = config.progress and is_main_process()
    train_enc = encode_dataset(tokenizer, train_convs, config.seq_len, progress=progress)
    say(f"train: {train_enc.stats.summary()}")
    # Fixed shapes only where they pay (packing fills rows; compile avoids recompiles); else pad to the batch's longest.
    fixed = config.seq_len if (config.pack or config.compile) else None
    pad_id = tokenizer.pad_token_id or 0
    # A last partial batch is dropped: it may not split over the processes, and the layout (part of the
    # data position) must not depend on the world size, so that a run resumes on another number of GPUs.
    train = ConversationBatches(
        train_enc, config.batch_size * world_size, seq_len=fixed, seed=config.seed, pack=config.pack,
        pad_id=pad_id, drop_last=True,
    )  # fmt: skip
    eval_batches: list[dict] = []
    if eval_convs:
        eval_enc = encode_dataset(tokenizer, eval_convs, config.seq_len, progress=progress)
        say(f"held out: {eval_enc.stats.summary()}")
        if eval_enc:
            loader = ConversationBatches(
                eval_enc,
                (config.eval_batch_size or config.batch_size) * world_size,
                seq_len=fixed,
                pad_id=pad_id,
                shuffle=False,
            )
            eval_batches = list(loader)
    return train, eval_batches


def build_model(config: TrainConfig, train_examples=None):
    """The base model (fp32 or bf16 params) with fresh heads initialised from its LM head.

    With --draft-vocab the token map is counted over the labelled positions of `train_examples`
    (encoded conversations) before training; its coverage of those labels is printed. A resumed run's map
    comes with its checkpoint (`resumed_draft_coverage`)."""
    from fastmedusa.model import MedusaConfig, MedusaModel, load_base_model

    init = read_init_heads(config)
    base = load_base_model(config.model, dtype=config.parameter_dtype())
    heads = MedusaConfig(
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        shared_lm_head=config.shared_lm_head,
        base_model_name_or_path=config.model or EMBEDDED_MODEL_NAME,
        draft_vocab_size=config.draft_vocab,
    )
    token_map = None
    if config.draft_vocab is not None and init is not None:
        token_map = init.token_map  # the starting heads' draft vocabulary, not a new count
    elif config.draft_vocab is not None and not config.resume:
        from fastmedusa.data.vocab import label_token_map

        if train_examples is None:
            raise ValueError("--draft-vocab needs the training conversations to count the draft vocabulary")
        vocab_size = base.get_output_embeddings().weight.shape[0]
        token_map, coverage = label_token_map(train_examples, vocab_size, config.draft_vocab)
        say(
            f"draft vocabulary: the {config.draft_vocab} most frequent of {vocab_size} tokens cover "
            f"{100 * coverage:.2f}% of the training labels"
        )
    model = MedusaModel.from_base(base, heads, token_map)
    if init is not None:
        model.load_heads(config.init_heads, checkpoint=init)
        model.heads_dir = None  # their tree.json describes the old heads, not the ones this run trains
        say(f"heads start from {config.init_heads}")
    return model


def resumed_draft_coverage(model, train_examples) -> str:
    """The coverage line of a resumed run's draft vocabulary: of the checkpoint's map, which the heads keep (a
    new count over data changed since the checkpoint, --allow-changed-data, is not the map they train with)."""
    from fastmedusa.data.vocab import label_coverage

    token_map, vocab_size = model.medusa_heads.token_map, model.medusa_heads.config.vocab_size
    coverage = label_coverage(train_examples or (), vocab_size, token_map)
    return (
        f"draft vocabulary of the checkpoint: its {token_map.numel()} of {vocab_size} tokens cover "
        f"{100 * coverage:.2f}% of the training labels"
    )


def read_init_heads(config: TrainConfig):
    """--init-heads: the heads checkpoint to start from, after checking it matches this run's heads settings."""
    if config.init_heads is None:
        return None
    from fastmedusa.model.export import read_heads

    try:
        init = read_heads(config.init_heads)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:  # name the flag: the path alone is vague
        raise type(err)(f"--init-heads: {err}") from None
    wanted = {"num_heads": config.num_heads, "num_layers": config.num_layers,
              "shared_lm_head": config.shared_lm_head, "draft_vocab": config.draft_vocab}  # fmt: skip
    for name, mine in wanted.items():
        theirs = getattr(init.config, "draft_vocab_size" if name == "draft_vocab" else name)
        if theirs != mine:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"--init-heads {config.init_heads}: those heads have {flag} {theirs}, this run {mine}: "
                f"pass {flag} {theirs}, or start from fresh heads"
            )
    return init


def prepare_output_dir(config: TrainConfig) -> Path:
    """Check the output dir before anything loads: refuse an earlier run's files unless --resume or
    --overwrite, remove temporary directories of saves that never completed.

    Only the main process touches files; the others wait for it. Nothing is deleted here: --overwrite
    deletes the earlier run in `remove_earlier_run`, once the model and data have loaded."""
    if not is_main_process():
        barrier()
        return Path(config.output_dir).expanduser()
    try:
        return _prepare_output_dir(config)
    finally:
        barrier()


def _prepare_output_dir(config: TrainConfig) -> Path:
    if config.resume and not Path(config.output_dir).expanduser().exists():  # checked before it is created
        raise FileNotFoundError(
            f"--resume: --output-dir {config.output_dir} does not exist: pass the directory of the run to continue, "
            "or drop --resume to start a new run there"
        )
    out = check_output_dir(config.output_dir)
    model_dir = out / BACKBONE_NAME
    if config.stage == 2 and model_dir.exists() and not ckpt.is_trained_backbone(model_dir):
        raise FileExistsError(
            f"--output-dir {out}: stage 2 writes its trained backbone to {model_dir}, which holds something "
            "fastmedusa did not write (a model of yours?): pass another --output-dir"
        )
    if stale := ckpt.remove_stale_tmp(out):
        say(f"removed {stale} incomplete save(s) (.tmp-checkpoint-*, .model.*) in {out}")
    if config.resume:
        if ckpt.latest_checkpoint(out) is None:
            if unverifiable := ckpt.checkpoints_without_manifest(out):
                raise FileNotFoundError(
                    f"--resume: {unverifiable[-1]} has no {ckpt.MANIFEST} (an interrupted save, or a checkpoint "
                    "of a fastmedusa version that wrote none), so it cannot be verified and is not resumed: "
                    "pass --overwrite instead of --resume to start over there, or another --output-dir"
                )
            raise FileNotFoundError(
                f"--resume: no complete checkpoint in {out}: drop --resume to start a new run there"
            )
        return out
    if foreign := ckpt.foreign_run_files(out):
        names = ", ".join(p.name for p in foreign)
        raise FileExistsError(
            f"--output-dir {out} holds {names}, which no fastmedusa run wrote (a run writes there, and --overwrite "
            "deletes a run's files): pass another --output-dir, or move them"
        )
    earlier = ckpt.earlier_run_files(out)
    if config.overwrite:
        check_overwrite_keeps_inputs(config, earlier)
    if earlier and not config.overwrite:
        names = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        resumable = ckpt.latest_checkpoint(out) is not None
        raise FileExistsError(
            f"--output-dir {out} holds an earlier run ({names}): "
            + ("pass --resume to continue it, " if resumable else "none of its checkpoints can be resumed; ")
            + "pass --overwrite to delete it and start over, or another --output-dir"
        )
    return out


def _local_input(flag: str, value: str | None) -> Path | None:
    """The files an input flag reads, as a resolved local path (None for hub ids and the embedded default)."""
    if value is None or not Path(value).expanduser().exists():
        return None
    path = Path(value).expanduser().resolve()
    if flag == "--init-heads":
        from fastmedusa.model.export import find_heads_dir

        try:
            return find_heads_dir(path).resolve()  # a run's directory reads its heads/
        except (OSError, ValueError):
            return path
    return path


def check_overwrite_keeps_inputs(config: TrainConfig, earlier: list[Path]) -> None:
    """--overwrite deletes the earlier run's files; an input that lies among them would be read once, then
    deleted, and a killed run could never resume (its --model or --init-heads would be gone)."""
    for flag, value in (("--model", config.model), ("--init-heads", config.init_heads), ("--data", config.data)):
        path = _local_input(flag, value)
        if path is None:
            continue
        for old in earlier:
            old = old.resolve()
            if path == old or old in path.parents:
                raise ValueError(
                    f"{flag} {value} lies in {old.name}/ of the earlier run in --output-dir {config.output_dir}, "
                    "which --overwrite deletes: pass another --output-dir (or copy it out first)"
                )


def remove_earlier_run(config: TrainConfig) -> None:
    """--overwrite: delete the earlier run's checkpoints and log, now that the new run's inputs loaded."""
    if config.overwrite and is_main_process():
        if removed := ckpt.remove_checkpoints(Path(config.output_dir).expanduser()):
            say(
                f"--overwrite: removed {removed} file(s)/dir(s) of an earlier run (checkpoints, log, heads) in {config.output_dir}"
            )
    barrier()


def input_fingerprints(config: TrainConfig, data_path: Path | str) -> dict:
    """Fingerprints of the base model's weights and the data file (None for hub ids), saved with checkpoints."""
    from fastmedusa.model.loading import resolve_model_source

    source, extra = resolve_model_source(config.model)
    model_path = Path(source) / extra["gguf_file"] if "gguf_file" in extra else Path(source)
    return {
        "model": ckpt.fingerprint(model_path),
        "data": ckpt.fingerprint(data_path) if isinstance(data_path, Path) else None,
    }


def check_resume_inputs(config: TrainConfig, world_size: int, inputs: dict) -> None:
    """Fail fast, before the model and data load: the newest checkpoint's settings (JSON only) and the
    fingerprints of the model and data files must match this run's (--allow-changed-data accepts new files)."""
    from fastmedusa.train.trainer import ResumeMismatchError, check_resumable, known_inputs, same_inputs

    for _, path in reversed(ckpt.list_checkpoints(Path(config.output_dir).expanduser())):
        try:
            saved, info = ckpt.read_json(path / ckpt.TRAIN_CONFIG), ckpt.read_json(path / ckpt.RUN_INFO)
        except ckpt.CheckpointError:
            continue  # unreadable: Trainer.resume reports it and falls back to an older one
        saved_inputs = info.get("inputs") or {}
        check_resumable(saved, config, path, info.get("world_size", 1), world_size, saved_inputs, inputs)
        changed = set(known_inputs(saved_inputs, inputs)) - set(same_inputs(saved_inputs, inputs))
        for key, flag in (("model", "--model"), ("data", "--data")):
            if key not in changed:
                continue
            where = getattr(config, key) or "(the embedded default)"
            if not config.allow_changed_data:
                raise ResumeMismatchError(
                    f"{flag} {where}: the file changed since {path} was written (its size or the hash of its "
                    "first and last MB differ): resume with the original file, or pass --allow-changed-data"
                )
            say(f"{flag} {where} changed since {path} was written; continuing (--allow-changed-data)")
        return


def train(config: TrainConfig, backend: SingleProcess | FSDPBackend | None = None) -> dict:
    """Run the whole job; returns the summary (held-out accuracy before/after, tokens/s, paths).

    Under torchrun / accelerate launch (or with --fsdp) every process runs this with an FSDP2 backend;
    the process group is left at the end, also after an error."""
    config.torch_device()  # a bad --device fails before anything loads
    config = with_paths_found_anywhere(config)
    owns_group = backend is None and not dist.is_initialized()
    ok = False
    try:
        if backend is None:
            backend = choose_backend(config)
        summary = _train(config, backend)
        ok = True
        return summary
    finally:
        if owns_group:
            cleanup(wait=ok)


def with_paths_found_anywhere(config: TrainConfig) -> TrainConfig:
    """`config` with a local --model and --data made absolute (a hub id, or a name of the embedded default, as
    it is): train_config.json, the checkpoints and the heads' config.json record them, and a resume, `eval` or
    a load from another directory must find them again."""
    return replace(config, **{k: input_path(k, getattr(config, k)) for k in ("model", "data")})


def choose_backend(config: TrainConfig) -> SingleProcess | FSDPBackend:
    """FSDP2 under a launcher (RANK/WORLD_SIZE set) or with --fsdp (a process group of one); else one process."""
    if config.fsdp and "RANK" not in os.environ:
        _single_process_group_env()
    device = config.torch_device() if config.device != "auto" else None
    info = init_distributed(device)
    if not info.distributed:
        return SingleProcess()
    return FSDPBackend.from_env(
        info,
        param_dtype=torch.bfloat16 if info.device.type == "cuda" else None,
        activation_checkpointing=config.gradient_checkpointing,
    )


def _single_process_group_env() -> None:
    """What torchrun would set for one process, so --fsdp alone gives a process group of size 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**defaults, "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def _train(config: TrainConfig, backend: SingleProcess | FSDPBackend) -> dict:
    from fastmedusa.data import resolve_data_path

    started = time.perf_counter()
    data_path = resolve_data_path(config.data)  # a missing --data file fails before the model loads
    created = not Path(config.output_dir).expanduser().exists()
    out = prepare_output_dir(config)
    try:
        return _run(config, backend, out, data_path, started)
    except Exception:
        if created and backend.is_main_process() and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty directory behind
        raise


def check_seq_len_fits(config: TrainConfig, model_config) -> None:
    """Rows longer than the model's positions would train at positions it never learned (packed rows count
    positions across their conversations): refused before training."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and config.seq_len > limit:
        raise ValueError(
            f"--seq-len {config.seq_len} exceeds the {limit} positions of {config.model or 'the embedded model'} "
            f"(max_position_embeddings): pass --seq-len {limit} or less"
        )


def check_token_ids_fit(config: TrainConfig, vocab_size: int, train_batches, eval_batches: list[dict]) -> None:
    """Every encoded token id indexes the model's embedding: a tokenizer with ids past the model's vocabulary
    (another model's, or added special tokens) is named before training, not met as an index error on a GPU."""
    encoded = getattr(train_batches, "encoded", None) or ()
    highest = max((max(example["input_ids"], default=-1) for example in encoded), default=-1)
    for batch in eval_batches:
        highest = max(highest, int(batch["input_ids"].max()))
    if highest >= vocab_size:
        raise ValueError(
            f"the tokenizer of {config.model or 'the embedded model'} gives token id {highest}, but the model's "
            f"vocabulary has {vocab_size} ids: use the model's own tokenizer (--model names a directory or hub id "
            "holding both)"
        )


def _load_checked_tokenizer(config: TrainConfig, backend: SingleProcess | FSDPBackend):
    """The tokenizer, refused without a chat template where tree.json is measured on chat prompts (before
    training, not after it)."""
    from fastmedusa.model import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    measures_tree = config.tree_prompts and config.eval_size and isinstance(backend, SingleProcess)
    if measures_tree and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {config.model or 'the embedded model'} has no chat template, which the tree.json "
            "measure needs (held-out prompts in chat form): pass --tree-prompts 0, or use a chat model"
        )
    if not getattr(tokenizer, "chat_template", None):
        warn(
            f"the tokenizer of {config.model or 'the embedded model'} has no chat template: conversations are "
            "written as 'User: ...' / 'Assistant: ...' lines, so the heads learn that format, not the one the "
            "model will be prompted with"
        )
    return tokenizer


def _run(config: TrainConfig, backend: SingleProcess | FSDPBackend, out: Path, data_path, started: float) -> dict:
    """Load the tokenizer, data and model, then train, export the heads and measure their tree."""
    inputs = input_fingerprints(config, data_path)
    if config.resume:
        check_resume_inputs(config, backend.world_size, inputs)
    tokenizer = _load_checked_tokenizer(config, backend)
    train_batches, eval_batches = build_data(config, tokenizer, backend.world_size)
    model = build_model(config, getattr(train_batches, "encoded", None))
    check_seq_len_fits(config, model.base.config)
    check_token_ids_fit(config, model.base.get_input_embeddings().num_embeddings, train_batches, eval_batches)
    remove_earlier_run(config)
    trainer = Trainer(model, config, train_batches, eval_batches, backend=backend)
    trainer.inputs = inputs
    if config.resume:
        resumed = trainer.resume(report=warn)
        say(f"resumed from {resumed} at step {trainer.step}/{trainer.total_steps}")
        if config.draft_vocab is not None:
            say(resumed_draft_coverage(model, getattr(train_batches, "encoded", None)))
        if trainer.step >= trainer.total_steps:
            say(
                f"the run is already at step {trainer.step} of {trainer.total_steps}: nothing left to train "
                "(raise --max-steps or --epochs to continue it); its heads are written again"
            )
    if backend.is_main_process():
        config.save(out / "train_config.json")
    trainer.log.write(environment_record(trainer))
    processes = (
        f" x {backend.world_size} processes (FSDP2)" if getattr(backend, "shards_model", False) else ""
    )
    if (warning := stage2_lr_warning(config)) is not None:
        warn(warning)
    say(
        f"training {config.num_heads} heads, stage {config.stage}, {trainer.total_steps} "
        f"step{'s' * (trainer.total_steps != 1)} of {config.batch_size} rows x {config.grad_accum} accumulated"
        f"{processes}, <= {config.seq_len} tokens each, on {trainer.device}"
    )
    summary = trainer.fit()
    heads_dir = export_heads(trainer.model, tokenizer, config, trainer.backend, summary)
    if heads_dir is not None and config.tree_prompts and isinstance(trainer.backend, SingleProcess):
        write_heads_tree(trainer.model, tokenizer, config, heads_dir)
    summary.update(heads_dir=str(heads_dir), seconds=time.perf_counter() - started)
    for line in summary_lines(summary):
        say(line)
    speed = f" ({summary['tokens_per_s']:.0f} tokens/s)" if summary.get("tokens_per_s") else ""
    curves = Path(config.output_dir) / "curves.png"
    drawn = f"; curves in {curves}" if config.plot and curves.is_file() else ""
    backbone = (
        f", with the backbone trained beside them in {Path(config.output_dir) / BACKBONE_NAME}"
        if config.stage == 2
        else ""
    )
    say(f"done in {summary['seconds']:.0f} s{speed}; heads in {heads_dir}{backbone}{drawn}")
    return summary


def environment_record(trainer: Trainer) -> dict:
    """metrics.jsonl's provenance line for this (re)start: device, date, versions, processes."""
    from fastmedusa.environment import environment

    return {
        "kind": "environment",
        "step": trainer.step,
        "world_size": trainer.backend.world_size,
        "fsdp": bool(getattr(trainer.backend, "shards_model", False)),
        **environment(trainer.device),
    }


def export_heads(
    model, tokenizer, config: TrainConfig, backend: SingleProcess | None = None, summary: dict | None = None
) -> Path | None:
    """`output_dir/heads`: the heads (FasterDecoding/Medusa layout), the tokenizer to decode with, and in
    config.json what a model card needs (data, steps, held-out accuracy per head). Stage 2 also writes the
    trained backbone to `output_dir/model` (save_pretrained), which loading the heads then picks up.

    Collective under a distributed backend; returns the directory on the main process, None elsewhere."""
    from fastmedusa.model.export import BACKBONE_DIR, update_heads_config

    backend = backend or SingleProcess()
    backbone = None
    if config.stage == 2:  # the heads read this backbone's hidden states: they are only right beside it
        # first, so that heads which point at it never exist without it
        marker = {"written_by": "fastmedusa train --stage 2", "heads": "../heads", "base_model": config.model}
        backbone = backend.export_backbone(
            model, (Path(config.output_dir) / BACKBONE_NAME).resolve(), tokenizer, marker
        )
    heads_dir = backend.export_heads(model, Path(config.output_dir) / "heads")
    if heads_dir is None:
        return None
    tokenizer.save_pretrained(heads_dir)
    final = (summary or {}).get("final_eval") or {}
    training = {
        "stage": config.stage,
        "steps": (summary or {}).get("steps", config.max_steps),
        "data": shared_name(config.data) if config.data else "embedded ShareGPT",  # train_config.json keeps the path
        "seq_len": config.seq_len,
        "loss": config.loss,
        **({"backbone": BACKBONE_DIR} if backbone is not None else {}),
        "final_eval": {k: final[k] for k in ("top1", "top5", "head_loss") if k in final} or None,
    }
    base = {"base_model_name_or_path": str(backbone)} if backbone is not None else {}  # what TGI loads
    update_heads_config(
        heads_dir, tokenizer_name_or_path=config.model or EMBEDDED_MODEL_NAME, training=training, **base
    )
    return heads_dir


def write_heads_tree(model, tokenizer, config: TrainConfig, heads_dir: Path) -> None:
    """heads_dir/tree.json from the first turns of the held-out conversations (see decode.accuracy)."""
    from fastmedusa.data import read_sharegpt, train_eval_split
    from fastmedusa.decode.accuracy import first_user_prompts, measure_heads_tree, read_tree_json
    from fastmedusa.decode.cli import eos_token_ids

    if not config.eval_size:
        return say("no held-out conversations (--eval-size 0): no tree.json measured")
    conversations, _ = read_sharegpt(config.data, limit=config.max_conversations)
    _, held_out = train_eval_split(conversations, config.eval_size, seed=config.seed)
    prompts = first_user_prompts(tokenizer, held_out, max_prompt_tokens=config.seq_len)[: config.tree_prompts]
    if not prompts:
        return say(f"no held-out first turn fits {config.seq_len} tokens: no tree.json measured")
    was_training = model.training
    model.eval()
    try:  # the heads are saved already: a model the decode engine does not run must not fail the run
        eos = eos_token_ids(tokenizer, model.base)
        info = read_tree_json(measure_heads_tree(model, prompts, heads_dir, eos_token_id=eos))
    except ValueError as err:
        return say(f"no tree.json measured: {err}")
    finally:
        model.train(was_training)
    say(f"tree.json: {info['tree_nodes']} nodes, expected {info['expected_tokens_per_step']:.2f} tokens/step")


STAGE2_BACKBONE_LR_WARN = 1e-3  # a backbone lr at or above this is a stage-1 heads' lr, not a fine-tuning one


def stage2_lr_warning(config: TrainConfig) -> str | None:
    """In stage 2 `--lr` is the backbone's learning rate (the heads get lr x --heads-lr-multiplier). A heads'
    rate there rewrites the model; say so before hours of training, not after."""
    if config.stage != 2 or config.lr < STAGE2_BACKBONE_LR_WARN:
        return None
    return (
        f"warning: stage 2 trains the backbone at --lr {config.lr:g}, a rate for heads alone; fine-tuning a "
        "model wants much less. The self-distillation recipe uses --lr 2e-4 --heads-lr-multiplier 5 "
        "(heads at 1e-3)"
    )


def say(line: str) -> None:
    """A progress line that does not break a tqdm bar; printed by the main process only."""
    if is_main_process():
        tqdm.write(line)


def warn(line: str) -> None:
    """A line about something wrong that the run works around, on stderr beside the `error:` line that may
    follow it (a redirected stdout does not hide why a resume fell back or failed)."""
    if is_main_process():
        tqdm.write(line if line.startswith("warning: ") else f"warning: {line}", file=sys.stderr)
