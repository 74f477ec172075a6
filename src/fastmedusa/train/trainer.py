"""`Trainer`: one optimisation step (`train_step`), held-out evaluation, and the loop with logs and checkpoints.

The step is the unit the training benchmark times: build a `Trainer` from any `MedusaModel` and feed it
batches (`random_batch` makes synthetic ones), no data files needed. `fit()` adds what a real run needs
around it: logging, evaluation, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fastmedusa.files import input_path
from fastmedusa.model.medusa_model import decoder_hidden_states
from fastmedusa.progress import Progress
from fastmedusa.train import checkpoint as ckpt
from fastmedusa.train.backend import SingleProcess
from fastmedusa.train.config import TrainConfig
from fastmedusa.train.evaluate import EVAL_CACHE_BYTES, HiddenCache, evaluate
from fastmedusa.train.metrics import (
    JsonlLog,
    fmt_pct,
    peak_memory_bytes,
    peak_tflops,
    plot_curves,
    read_jsonl,
    synchronize,
    train_flops_per_token,
)
from fastmedusa.train.schedules import head_weights, heads_ramp, lr_factor

logger = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
LOG_FILE = "metrics.jsonl"
# Fields that must match for a checkpoint to continue the same run (steps and logging may change).
RESUME_FIELDS = (
    "model", "data", "stage", "num_heads", "num_layers", "shared_lm_head", "draft_vocab", "seq_len", "pack",
    "batch_size", "grad_accum", "max_conversations", "eval_size", "seed", "param_dtype", "lm_loss",
    # the optimiser's own settings come back from the checkpoint (a new value would be ignored, yet recorded),
    # and a run's heads are described by one loss
    "lr", "heads_lr_multiplier", "weight_decay", "loss",
)  # fmt: skip
ADDED_FIELDS = {  # what checkpoints written before a field existed ran with
    "lm_loss": "ce", "heads_lr_multiplier": 1.0, "weight_decay": 0.0, "loss": "ce",
}  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the step was not applied."""


class ResumeMismatchError(ValueError):
    """A checkpoint belongs to a run with other settings, another model shape or other inputs."""


def random_batch(
    batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator | None = None
) -> Batch:
    """A synthetic batch (every token real and labelled), for benchmarks and tests without data files."""
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters: heads at lr (x heads_lr_multiplier in stage 2), backbone at lr.

    Weight decay applies to matrices only (not biases or norm gains). Fused on CUDA: one kernel for all.
    """
    heads_lr = config.lr * (config.heads_lr_multiplier if config.stage == 2 else 1.0)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = "heads" if name.startswith("medusa_heads.") else "backbone"
            groups.setdefault((part, p.ndim >= 2), []).append(p)
    param_groups = [
        {
            "params": params,
            "lr": heads_lr if part == "heads" else config.lr,
            "weight_decay": config.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]
    if not param_groups:
        raise ValueError(
            "no trainable parameter: with --shared-lm-head and --num-layers 0 stage 1 trains nothing"
        )
    return torch.optim.AdamW(param_groups, lr=config.lr, fused=device.type == "cuda")


class Trainer:
    """Trains a `MedusaModel` per a `TrainConfig`.

    train_batches: a `fastmedusa.data.ConversationBatches` (resumable) or any iterable of batches (cycled).
    eval_batches: held-out batches. total_steps: defaults to config.max_steps, or epochs x batches.
    backend: `SingleProcess` (default) or the FSDP2 backend of `fastmedusa.train.distributed`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_batches: Iterable[Batch] | None = None,
        eval_batches: Sequence[Batch] = (),
        *,
        backend: SingleProcess | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.config = config
        self.backend = backend or SingleProcess()
        # under torchrun each process owns cuda:LOCAL_RANK (the backend knows it); else --device decides
        self.device = getattr(self.backend, "device", None) or config.torch_device()
        self.amp_dtype = config.autocast_dtype(self.device)
        self.reference: nn.Module | None = None  # --lm-loss kl: a frozen copy of the original model
        self.model = self.backend.wrap_model(self._prepare(model))
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.total_steps = total_steps or self._resolve_total_steps(train_batches)
        warmup = config.warmup(self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, self.total_steps, warmup, config.lr_schedule, config.min_lr_ratio),
        )
        self.train_batches = train_batches
        self.eval_batches = list(eval_batches)
        # stage 1 on one process: held-out hidden states computed once (see fastmedusa.train.evaluate)
        frozen = config.stage == 1 and self.backend.world_size == 1 and not self.backend.shards_model
        self.eval_cache: HiddenCache | None = HiddenCache(EVAL_CACHE_BYTES) if frozen else None
        self.inputs: dict = {}  # fingerprints of the model and data files, saved with each checkpoint
        self.step = 0
        self.output_dir = Path(config.output_dir)
        self.log = JsonlLog(self.output_dir / LOG_FILE, enabled=self.backend.is_main_process())
        self.history: list[dict] = []
        self.saved_step: int | None = None

    # -- set-up ------------------------------------------------------------------------
    def _prepare(self, model: nn.Module) -> nn.Module:
        """Stage, device, parameter dtype, gradient checkpointing and compile, before wrapping."""
        model.set_stage(self.config.stage)
        dtype = self.config.parameter_dtype()
        model.to(device=self.device)
        if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
            model.to(dtype=dtype)  # only when needed: a cast also rounds buffers such as RoPE's inv_freq
        if self.config.lm_loss == "kl":
            self.reference = self._frozen_reference(model)
        if self.config.gradient_checkpointing:
            if self.config.stage == 1:
                logger.warning(
                    "--gradient-checkpointing does nothing in stage 1: the backbone runs without grad"
                )
            else:
                model.base.config.use_cache = False
                model.base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        if self.config.compile:
            model.base.get_decoder().compile()
        return model

    def _frozen_reference(self, model: nn.Module) -> nn.Module:
        """A frozen copy of the backbone as it is now (before any step or checkpoint load): the original model
        that --lm-loss kl keeps the training one close to. A resumed run rebuilds it from the --model weights."""
        if self.backend.world_size > 1 or self.backend.shards_model:
            raise ValueError(
                "--lm-loss kl keeps a frozen copy of the model, which is not sharded under FSDP yet: run it in "
                "one process, or use --lm-loss ce"
            )
        reference = copy.deepcopy(model.base).eval()
        reference.requires_grad_(False)
        return reference

    @torch.no_grad()
    def _lm_teacher(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden states, LM head weight) of the frozen reference on this batch, for --lm-loss kl."""
        if self.reference is None:
            return None
        hidden = decoder_hidden_states(self.reference, batch["input_ids"], batch.get("attention_mask"))
        return hidden, self.reference.get_output_embeddings().weight

    def _resolve_total_steps(self, train_batches: Iterable[Batch] | None) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        if train_batches is None or not hasattr(train_batches, "__len__"):
            raise ValueError("--epochs needs a sized training set: pass --max-steps instead")
        return max(1, math.ceil(self.config.epochs * len(train_batches) / self.config.grad_accum))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @property
    def head_weights(self) -> list[float]:
        """Weights of the heads' losses at the current step (coefficient x ramp x decay**k)."""
        cfg = self.config
        ramp = heads_ramp(cfg.heads_schedule, self.step, self.total_steps)
        return head_weights(cfg.num_heads, cfg.heads_coefficient, cfg.heads_decay, ramp)

    # -- one optimisation step ---------------------------------------------------------
    def train_step(self, batch: Batch | Sequence[Batch], with_metrics: bool = False) -> dict:
        """Forward + backward over `batch` (or a list of micro-batches, accumulated), clip, AdamW, lr step.

        Returns the step's mean loss, per-head losses, grad norm, lr and token counts; with `with_metrics`
        also per-head top-1/top-5 accuracy on the last micro-batch (no grad, chunked over the vocabulary).
        A NaN/inf loss raises `NonFiniteLossError` before the weights change.
        """
        batches = [batch] if isinstance(batch, dict) else list(batch)
        if not batches or not all(isinstance(b, dict) and "input_ids" in b and "labels" in b for b in batches):
            raise ValueError(
                "train_step takes a batch (a dict with 'input_ids' and 'labels' tensors, as `random_batch` or the "
                f"data loader gives) or a non-empty list of them, got {type(batch).__name__}"
                + (" of length 0" if not batches else "")
            )
        micro = [self.backend.shard_batch(b) for b in batches]
        self.model.train()
        weights = self.head_weights
        lm_weight = 1.0 if self.config.stage == 2 else 0.0
        loss_sum = torch.zeros((), device=self.device)
        head_sum = torch.zeros(self.config.num_heads, device=self.device)
        lm_sum = torch.zeros((), device=self.device)
        topk = None
        for i, mb in enumerate(micro):
            mb = self._to_device(mb)
            with self._autocast():
                out = self.model(
                    mb["input_ids"], mb.get("attention_mask"), mb["labels"],
                    head_weights=weights, lm_loss_weight=lm_weight, impl=self.config.impl, loss=self.config.loss,
                    lm_teacher=self._lm_teacher(mb), chunk_rows=self.config.loss_chunk_rows or None,
                )  # fmt: skip
                if with_metrics and i == len(micro) - 1:
                    topk = self.model.medusa_heads.topk_correct(out.hidden_states.detach(), mb["labels"])
            (out.loss / len(micro)).backward()
            loss_sum += out.loss.detach().float()
            head_sum += out.head_losses.detach().float()
            if out.lm_loss is not None:
                lm_sum += out.lm_loss.detach().float()
        n = len(micro)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = self.backend.clip_grad_norm_(params, max_norm)
        # mean over processes (each one's loss is over its own rows): the logged loss is the global batch's,
        # and every process sees the same values, so a NaN on one stops them all at the same step
        losses = self.backend.all_reduce(
            torch.cat([(loss_sum / n)[None], head_sum / n, (lm_sum / n)[None]]), "mean"
        )
        packed = torch.cat([losses, grad_norm.float().to(losses.device)[None]])
        values = packed.tolist()  # the step's one host sync: the NaN check needs the values anyway
        if not all(math.isfinite(v) for v in values):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"the loss became non-finite at step {self.step + 1} (loss {values[0]}, head losses "
                f"{values[1:-2]}, grad norm {values[-1]}); no update was applied"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {
            "loss": values[0],
            "head_loss": values[1 : 1 + self.config.num_heads],
            "lm_loss": values[-2] if self.config.stage == 2 else None,
            "grad_norm": values[-1],
            "lr": lr,
            "head_weights": weights,
            **_token_counts(micro),
        }
        if self.config.loss == "kl":
            metrics["head_kl"] = metrics["head_loss"]
        if topk is not None:
            hits, counts = (self.backend.all_reduce(t) for t in topk)
            rates = hits.float() / counts.clamp(min=1)[:, None].float()
            metrics["top1"], metrics["top5"] = rates[:, 0].tolist(), rates[:, -1].tolist()
        return metrics

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self) -> dict | None:
        """Per-head loss, KL to the base model and top-1/top-5 on the held-out batches (see
        `fastmedusa.train.evaluate`)."""
        return evaluate(
            self.model, self.eval_batches, num_heads=self.config.num_heads, impl=self.config.impl, loss=self.config.loss,
            backend=self.backend, device=self.device, autocast=self._autocast, cache=self.eval_cache,
        )  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Atomically write the state that `load_checkpoint` needs to continue exactly; keep the newest few."""
        extra = {
            "step": self.step,
            "total_steps": self.total_steps,
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_batches.state_dict() if hasattr(self.train_batches, "state_dict") else None,
            "rng": ckpt.rng_state(),
        }
        main = self.backend.is_main_process()

        def write(tmp: Path) -> None:  # every process writes its part; the main one adds the JSON
            self.backend.save_checkpoint(tmp, self.model, self.optimizer, extra)
            if main:
                self.config.save(tmp / ckpt.TRAIN_CONFIG)
                ckpt.write_json(tmp / ckpt.RUN_INFO, self._run_info())

        path = ckpt.write_checkpoint(
            self.output_dir, self.step, write, keep=self.config.keep_checkpoints, main=main,
            barrier=self.backend.barrier,
            any_failed=lambda failed: self.backend.first_error("failed" if failed else None) is not None,
        )  # fmt: skip
        self.saved_step = self.step
        return path

    def _run_info(self) -> dict:
        return {
            "step": self.step,
            "world_size": self.backend.world_size,
            "model_shape": model_shape(self.model),
            "inputs": self.inputs,
        }

    def check_checkpoint(self, path: Path) -> None:
        """Refuse a checkpoint of another run from its JSON files alone, before any tensor is read."""
        saved = ckpt.read_json(path / ckpt.TRAIN_CONFIG)
        info = ckpt.read_json(path / ckpt.RUN_INFO)
        check_resumable(
            saved, self.config, path, info.get("world_size", 1), self.backend.world_size, info.get("inputs"), self.inputs
        )
        mine = model_shape(self.model)
        changed = [f"{k}: saved {v!r}, now {mine.get(k)!r}" for k, v in info.get("model_shape", {}).items()
                   if mine.get(k) != v]  # fmt: skip
        if changed:
            raise ResumeMismatchError(
                f"{path} was written for another base model ({'; '.join(changed)}): resume with the same "
                "--model or pass another --output-dir"
            )

    def load_checkpoint(self, path: Path) -> None:
        """Continue from `path`: manifest verified, settings checked, then weights, optimizer, lr schedule,
        data position, RNG states, step."""
        path = Path(path)
        try:  # each process hashes its share of the files; all learn the first mismatch found
            ckpt.verify_manifest(path, self.backend.rank, self.backend.world_size)
            error = None
        except ckpt.CheckpointError as err:
            error = str(err)
        if error := self.backend.first_error(error):
            raise ckpt.CheckpointError(error)
        self.check_checkpoint(path)
        extra = self.backend.load_checkpoint(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        if extra["data"] is not None and hasattr(self.train_batches, "load_state_dict"):
            try:
                self.train_batches.load_state_dict(extra["data"])
            except ValueError as err:  # another data layout: a setting to fix, not a corrupt file
                raise ResumeMismatchError(f"{path}: {err}") from err
        ckpt.set_rng_state(extra["rng"])
        self.step = self.saved_step = int(extra["step"])

    def resume(self, report=logger.warning) -> Path:
        """Load the newest usable checkpoint in the output dir. One that is corrupt, truncated or fails to
        load is reported in one line (`report`) and the next older one is tried; settings that differ
        from the checkpoint's stop at once (`ResumeMismatchError`)."""
        from torch.distributed.checkpoint.api import CheckpointException

        found = [path for _, path in reversed(ckpt.list_checkpoints(self.output_dir))]
        for path in found:
            try:
                self.load_checkpoint(path)
                return path
            except ResumeMismatchError:
                raise
            except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
                report(f"cannot resume from {path}: {ckpt.describe(err)}")
        raise ckpt.CheckpointError(
            f"--resume: no usable checkpoint in {self.output_dir} ({len(found)} tried, see above): "
            "start a new run there with --overwrite, or pass another --output-dir"
        )

    # -- the loop ----------------------------------------------------------------------
    def _batch_stream(self) -> Iterator[Batch]:
        if self.train_batches is None:
            raise ValueError("Trainer.fit needs train_batches")
        if hasattr(self.train_batches, "forever"):
            return self.train_batches.forever()
        return itertools.cycle(list(self.train_batches))

    def fit(self) -> dict:
        """Train to `total_steps` with logs, evaluations and checkpoints; returns the summary.

        Evaluates before the first step (so the log shows where the heads start), every `eval_every`
        steps and at the end; writes `metrics.jsonl`, `curves.png` and the final checkpoint.
        """
        cfg = self.config
        main = self.backend.is_main_process()
        if main:  # a Trainer built in Python may name a directory that does not exist yet: made before any work
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if torn := self.log.truncate_after(self.step):
            logger.warning("%s: dropped %d torn line(s) left by an interrupted write", self.log.path, torn)
        if self.step == 0:
            self._log_eval()
        stream = self._batch_stream()
        flops_per_token = None
        peak = peak_tflops(self.device, cfg.peak_tflops)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = Progress(
            total=self.total_steps,
            initial=self.step,
            desc=f"stage {cfg.stage}",
            unit="step",
            enabled=cfg.progress and main,
        )
        window = {"time": time.perf_counter(), "tokens": 0, "padded": 0, "steps": 0}
        try:
            while self.step < self.total_steps:
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                due = (
                    cfg.log_every
                    and (self.step + 1) % cfg.log_every == 0
                    or self.step + 1 == self.total_steps
                )
                m = self.train_step(micro, with_metrics=bool(due))
                window["tokens"] += m["tokens"]
                window["padded"] += m["padded_tokens"]
                window["steps"] += 1
                bar.update(1)
                if due:
                    seq = micro[-1]["input_ids"].shape[1]
                    flops_per_token = train_flops_per_token(self.model, seq, cfg.stage)
                    self._log_train(m, window, flops_per_token, peak, bar)
                    window = {"time": time.perf_counter(), "tokens": 0, "padded": 0, "steps": 0}
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self._log_eval(bar)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
        except NonFiniteLossError as err:
            bar.close()
            kept = ckpt.latest_checkpoint(self.output_dir)
            where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"{err}; {where}. Lower --lr (now {cfg.lr}) or --max-grad-norm, or check the data"
            ) from err
        bar.close()
        final_eval = self._log_eval()
        if self.saved_step != self.step:
            self.save_checkpoint()
        if main and cfg.plot and self.log.path.is_file():
            plot_curves(read_jsonl(self.log.path), self.output_dir / "curves.png", cfg.num_heads)
        self.reference = None  # --lm-loss kl's frozen copy: not needed past training (the tree pass, export)
        return self._summary(final_eval)

    def _log_train(self, m: dict, window: dict, flops_per_token: float, peak: float | None, bar) -> None:
        synchronize(self.device)
        elapsed = max(time.perf_counter() - window["time"], 1e-9)
        reduce = self.backend.all_reduce
        counts = reduce(torch.tensor([window["tokens"], window["padded"]], dtype=torch.float64)).tolist()
        record = {
            "kind": "train",
            "step": self.step,
            **{k: v for k, v in m.items() if k not in ("tokens", "padded_tokens", "label_tokens")},
            "tokens_per_s": counts[0] / elapsed,
            "padded_tokens_per_s": counts[1] / elapsed,
            "peak_memory_gb": _gb(peak_memory_bytes(self.device)),
            "mfu": counts[1] / elapsed * flops_per_token / (peak * 1e12 * self.backend.world_size)
            if peak
            else None,
        }
        self.history.append(record)
        self.log.write(record)
        # per head, as evaluation prints them (the optimised loss is their weighted sum)
        parts = [f"loss per head {' '.join(f'{x:.3f}' for x in m['head_loss'])}"]
        if m.get("lm_loss") is not None:
            name = "LM KL to the original" if self.config.lm_loss == "kl" else "LM loss"
            parts.append(f"{name} {m['lm_loss']:.3f}")
        if m.get("top1"):
            parts.append(f"top-1 % {fmt_pct(m['top1'])}")
        bar.set_postfix(" | ".join(parts))

    def _log_eval(self, bar=None) -> dict | None:
        result = self.evaluate()
        if result is None:
            return None
        record = {"kind": "eval", "step": self.step, **result}
        self.history.append(record)
        self.log.write(record)
        if self.backend.is_main_process():
            line = (
                f"eval step {self.step}: top-1 % per head {fmt_pct(result['top1'])} | top-5 % "
                f"{fmt_pct(result['top5'])} | loss {' '.join(f'{x:.3f}' for x in result['head_loss'])} | KL to the "
                f"base model {' '.join(f'{x:.3f}' for x in result['head_kl'])}"
            )
            if (
                result.get("lm_loss") is not None
            ):  # stage 2: how far the backbone moved on the held-out answers
                line += f" | LM loss {result['lm_loss']:.3f}"
            (bar.write if bar is not None else tqdm.write)(line)
        return result

    def _summary(self, final_eval: dict | None) -> dict:
        """First and last held-out numbers per head (from this run's log, so resumed runs see the start)."""
        records = read_jsonl(self.log.path) if self.log.path.is_file() else self.history
        evals = [r for r in records if r["kind"] == "eval"]
        trains = [r for r in records if r["kind"] == "train"]
        summary = {"steps": self.step, "first_eval": evals[0] if evals else None, "final_eval": final_eval}
        if trains:
            summary["tokens_per_s"] = trains[-1]["tokens_per_s"]
            summary["peak_memory_gb"] = trains[-1]["peak_memory_gb"]
            summary["mfu"] = trains[-1]["mfu"]
        return summary


def summary_lines(summary: dict) -> list[str]:
    """One line per head: held-out top-1/top-5/loss before -> after training."""
    first, last = summary.get("first_eval"), summary.get("final_eval")
    if not first or not last:
        return [f"trained {summary['steps']} steps (no held-out set)"]
    lines = []
    for k in range(len(last["top1"])):
        lines.append(
            f"head {k + 1} (predicts t+{k + 2}): held-out top-1 {100 * first['top1'][k]:.1f}% -> "
            f"{100 * last['top1'][k]:.1f}%, top-5 {100 * first['top5'][k]:.1f}% -> {100 * last['top5'][k]:.1f}%, "
            f"loss {first['head_loss'][k]:.3f} -> {last['head_loss'][k]:.3f}"
        )
    if "outside_draft_frac" in last:
        lines.append(
            f"draft vocabulary: {100 * last['outside_draft_frac']:.2f}% of held-out labels fall outside it "
            "(not scored by the heads' loss, misses in top-k)"
        )
    return lines


def check_resumable(
    saved: dict,
    config: TrainConfig,
    path: Path,
    saved_world_size: int = 1,
    world_size: int = 1,
    saved_inputs: dict | None = None,
    inputs: dict | None = None,
) -> None:
    """A checkpoint continues only the run it came from: same model, data, shapes, seed and global batch.

    The global batch (--batch-size x processes) is what must match, so a run of 2 processes x 4 rows
    continues on 1 process with --batch-size 8 (the data position counts global batches). The model and data
    are compared by path unless they moved: a file whose fingerprint (`inputs`, this run's; `saved_inputs`, the
    checkpoint's) shows the same content may lie at another path, and with --allow-changed-data any local file
    (fingerprints on both sides: the caller notes a changed one). A hub id, or a checkpoint without
    fingerprints, is compared by path."""
    now = config.to_dict()
    known_files = known_inputs(saved_inputs, inputs)
    moved = set(known_files if config.allow_changed_data else same_inputs(saved_inputs, inputs))
    changed = [
        f"{k}: saved {resume_setting(saved, k)!r}, now {resume_setting(now, k)!r}"
        for k in RESUME_FIELDS
        if k != "batch_size" and k not in moved and resume_setting(saved, k) != resume_setting(now, k)
    ]
    saved_global, now_global = saved.get("batch_size", 0) * saved_world_size, config.batch_size * world_size
    if saved_global != now_global:
        changed.append(
            f"global batch (--batch-size x processes): saved {saved.get('batch_size')} x {saved_world_size}, "
            f"now {config.batch_size} x {world_size}"
        )
    if changed:
        moved_hint = " (a moved model or data file: --allow-changed-data)" if any(
            c.split(":")[0] in known_files for c in changed
        ) else ""
        raise ResumeMismatchError(
            f"{path} was written by a different run ({'; '.join(changed)}): resume with the same settings"
            f"{moved_hint} or pass another --output-dir"
        )


INPUT_FIELDS = ("model", "data")  # resume settings that name files


def known_inputs(saved: dict | None, now: dict | None) -> list[str]:
    """Of INPUT_FIELDS, those whose file fingerprints are known on both sides (saved with a checkpoint, and
    this run's): local files, which a resume can compare by content; a hub id has none."""
    saved, now = saved or {}, now or {}
    return [k for k in INPUT_FIELDS if saved.get(k) and now.get(k)]


def same_inputs(saved: dict | None, now: dict | None) -> list[str]:
    """Of `known_inputs`, those of the same content: the same file, wherever it now lies and however named."""
    return [k for k in known_inputs(saved, now) if ckpt.same_content(saved[k], now[k])]


def resume_setting(settings: dict, key: str) -> object:
    """A setting as a resume compares it: a local --model or --data path made absolute (from the directory
    resumed in), however it was recorded (`train` records them absolute; an earlier version, or a Trainer built
    on a config of its own, as typed)."""
    value = settings.get(key, ADDED_FIELDS.get(key))
    return input_path(key, value) if key in INPUT_FIELDS else value


def _token_counts(micro: Sequence[Batch]) -> dict[str, int]:
    """Real (attention-mask) tokens, padded tokens and labelled tokens; counted on the CPU (no sync)."""
    real = sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro
    )
    return {
        "tokens": real,
        "padded_tokens": sum(b["input_ids"].numel() for b in micro),
        "label_tokens": sum(int((b["labels"] != -100).sum()) for b in micro),
    }


def _gb(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def model_shape(model: nn.Module) -> dict[str, int | None]:
    """The base model's sizes a checkpoint's tensors depend on (compared before they are read)."""
    cfg = model.config
    return {k: getattr(cfg, k, None) for k in ("hidden_size", "vocab_size", "num_hidden_layers")}
