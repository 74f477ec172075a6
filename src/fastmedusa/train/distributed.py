"""Data-parallel training over processes with PyTorch's FSDP2 (`fully_shard`), launched by torchrun or accelerate.

What runs where (N processes, one per GPU; gloo and the CPU for tests):
  every process   the same model code on its own rows of the global batch; parameters, gradients and
                  AdamW state live as 1/N shards (DTensors on dim 0), gathered one unit at a time
  units           one per decoder block (gathered for its forward, freed, gathered again in backward);
                  `medusa_heads` (its K vocab projections, K*V*H); the root: embeddings, final norm and
                  `lm_head`, which also holds a tied `embed_tokens.weight` (a tied weight is one Parameter,
                  so it must sit in one unit: the root is the one unit that holds both of its users)
  rank 0          exported heads (plain safetensors); checkpoints are written by all processes (DCP)

Why the head units look like this: `MedusaHeads.forward` calls the loss kernel with `base_lm_head.weight`
and its own projection weights, so both must be gathered while it runs. The heads unit is gathered by its
own pre-forward hook; the root (with lm_head) is gathered from the start of `MedusaModel.forward` until its
gradients are reduced after backward (FSDP's default for the root). The grouped form
`fully_shard([norm, lm_head, medusa_heads])` is avoided: `lm_head` never runs as a module here (only its
weight is read), and FSDP before 2.13 completes a group's post-forward only once every module ran.
The heads unit keeps its weights after forward (reshard_after_forward=False): the fused loss computes its
weight gradients during the forward, the backward reads no weight, so a re-gather would be wasted.

Memory per GPU beyond the shards: the root's (V*H [tied] or 2*V*H) + the heads' K*V*H in the param dtype
while the heads run and their backward; Llama-3-8B, K=3, bf16: 5 * 128256 * 4096 * 2 B = 5.3 GB.

Stage 1 (frozen backbone): the backbone runs under no_grad and its parameters have requires_grad False;
FSDP2 reduce-scatters only gradients that exist, so one reduce-scatter per step (the heads unit) is all
that crosses the wire besides all-gathers (tested by counting collectives).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

EXTRA_FILE = "extra_rank{rank}.json"  # per process: RNG states and data position differ between ranks
META_FILE = "dist_meta.json"
OPTIMIZER_FILE = "optimizer.json"  # the optimizer's hyper-parameters (its tensors are in the DCP files)


# -- process group ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. The defaults describe a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_main: bool = True

    @property
    def distributed(self) -> bool:
        """True under a launcher (a process group exists, even of size 1)."""
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group that torchrun / accelerate describe in RANK, WORLD_SIZE, LOCAL_RANK.

    nccl on CUDA (one GPU per process: cuda:LOCAL_RANK), gloo on the CPU. Without those variables
    (a plain `python -m fastmedusa train`) nothing is initialised and a single-process DistInfo returns.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        dev = torch.device(device) if device is not None else _default_device(0)
        return DistInfo(device=dev)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device) if device is not None else _default_device(local_rank)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev, rank == 0)


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def cleanup(wait: bool = True) -> None:
    """Leave the process group (at the end of training, on every process).

    wait=False after an error: the other processes may never reach the barrier (the launcher ends them)."""
    if dist.is_available() and dist.is_initialized():
        # all processes arrive before any tears down: a rank leaving early (with the TCP store of rank 0)
        # made gloo abort the others' shutdown ("terminate called without an active exception")
        if wait:
            dist.barrier()
        gc.collect()  # free sharded models (their device mesh holds the process group) before it goes
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not _initialized() or dist.get_rank() == 0


def barrier() -> None:
    if _initialized():
        dist.barrier()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# -- metrics ---------------------------------------------------------------------------------------------
def _reduce(value: torch.Tensor | float, op: dist.ReduceOp, mean: bool = False) -> torch.Tensor | float:
    if not _initialized():
        return value
    is_tensor = isinstance(value, torch.Tensor)
    t = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    device = t.device
    # nccl reduces only CUDA tensors, gloo only CPU ones
    t = t.to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu")
    if mean and not t.is_floating_point():
        t = t.double()
    dist.all_reduce(t, op=op)
    if mean:
        t = t / dist.get_world_size()
    return t.to(device) if is_tensor else t.item()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over processes (a float stays a float, a tensor a tensor on its device)."""
    return _reduce(value, dist.ReduceOp.SUM, mean=True)


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor | float:
    return _reduce(value, dist.ReduceOp.SUM)


def all_reduce_max(value: torch.Tensor | float) -> torch.Tensor | float:
    """Max over processes (peak memory, step time of the slowest rank)."""
    return _reduce(value, dist.ReduceOp.MAX)


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm; with FSDP2's sharded (DTensor) gradients the norm is all-reduced."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):
        total = total.full_tensor()  # partial squared norms of the shards, reduced over processes
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def shard_rows(
    batch: dict[str, torch.Tensor], rank: int | None = None, world_size: int | None = None
) -> dict:
    """This process's contiguous slice of the rows of a global batch (every tensor split on dim 0).

    Every process reads the same batches (same seed, same order) and keeps its rows: the data position
    is then one number for all processes and resumes at any world size. Each process's loss is the mean
    over its own tokens and FSDP averages the gradients, so the step equals a single-process step on the
    whole batch when the processes hold equal numbers of trained tokens (otherwise tokens weigh a little
    differently between processes, as in every data-parallel trainer that averages per-process means).
    """
    rank = (dist.get_rank() if _initialized() else 0) if rank is None else rank
    world_size = (dist.get_world_size() if _initialized() else 1) if world_size is None else world_size
    out = {}
    for key, value in batch.items():
        rows = value.shape[0]
        if rows % world_size:
            raise ValueError(
                f"a batch of {rows} rows does not split over {world_size} processes: make the global batch "
                f"(--batch-size x processes) a multiple of {world_size}"
            )
        per = rows // world_size
        out[key] = value[rank * per : (rank + 1) * per]
    return out


# -- wrapping --------------------------------------------------------------------------------------------
def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The base model's decoder layers (`model.base.model.layers` for Llama, Qwen, Mistral, SmolLM2)."""
    decoder = model.base.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(decoder).__name__} has no `layers` ModuleList of decoder blocks: FSDP2 wrapping knows "
            "Llama-style decoders (Llama, Qwen2, Mistral, SmolLM2); train this model on one process"
        )
    return layers


def apply_fsdp(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    stage: int | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a `MedusaModel` in place with FSDP2 over all processes; returns it.

    Order (bottom-up, as `fully_shard` requires): activation checkpointing per decoder block, then each
    block, then `medusa_heads` (own unit unless the heads share the LM head), then the root (embeddings,
    final norm, lm_head). `param_dtype` None = bf16 on CUDA, the parameters' own dtype (fp32) on the CPU;
    gradients are reduced in `reduce_dtype`. `stage` (1 or 2) calls `model.set_stage` first; None keeps
    the stage already set. `reshard_after_forward` is for the decoder blocks (False trades memory for one
    all-gather less per block in backward). Build the optimizer after this call, on `model.parameters()`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not _initialized():
        raise RuntimeError(
            "apply_fsdp needs a process group: launch with `torchrun --nproc-per-node N -m fastmedusa train ...` "
            "(or accelerate launch) and call init_distributed() first"
        )
    if stage is not None:
        model.set_stage(stage)
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if param_dtype is None and device_type == "cuda":
        param_dtype = torch.bfloat16
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)

    blocks = decoder_blocks(model)
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    flag = (
        "is_activation_checkpointing"
        if hasattr(model.base, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    hf_checkpointing = bool(getattr(model.base, flag, False))
    if hf_checkpointing:
        # HF's own per-layer checkpointing is replaced by the wrapper below: its hooks would sit inside
        # the recomputed region, the wrapper keeps FSDP's gather/free outside it (torchtitan's order).
        model.base.gradient_checkpointing_disable()
    # Under a frozen backbone (stage 1) nothing is saved for backward: checkpointing would be a no-op.
    if (activation_checkpointing or hf_checkpointing) and not getattr(model, "backbone_frozen", False):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            checkpoint_wrapper,
        )

        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if not model.medusa_config.shared_lm_head:
        fully_shard(model.medusa_heads, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextlib.contextmanager
def gathered_heads(model: nn.Module) -> Iterator[nn.Module]:
    """Gather the root and heads units around calls that bypass `forward` (`medusa_heads.topk_correct`,
    `head_logits`) outside a training step, e.g. for evaluation metrics; a no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in (model, getattr(model, "medusa_heads", None)) if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


# -- checkpoints -----------------------------------------------------------------------------------------
def _state_options(full: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # ignore_frozen_params: stage 1 saves the heads only; the frozen backbone reloads from the base model
    return StateDictOptions(ignore_frozen_params=True, full_state_dict=full, cpu_offload=full, strict=strict)


def _drop_frozen(model: nn.Module, state: dict) -> dict:
    # ignore_frozen_params misses the second name of a tied frozen weight (lm_head.weight is
    # embed_tokens.weight): named_parameters() lists a shared Parameter once. Drop every name of it.
    frozen = {
        name.replace("_checkpoint_wrapped_module.", "")
        for name, p in model.named_parameters(remove_duplicate=False)
        if not p.requires_grad
    }
    return {k: v for k, v in state.items() if k not in frozen}


def trainable_state_dict(model: nn.Module, *, full: bool = False) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (FSDP and checkpoint-wrapper prefixes removed). full=False: this
    process's shards (DTensors under FSDP); full=True: collective, whole tensors on rank 0's CPU only."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return _drop_frozen(model, get_model_state_dict(model, options=_state_options(full)))


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's `.metadata` (a pickle) resolving only the classes DCP writes there, so a crafted file
    cannot name `os.system` or any other callable: an unknown global is an `UnpicklingError`."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")


def read_dcp_metadata(directory: Path):
    """DCP's `.metadata` of a checkpoint, read without running code. A truncated, corrupt or crafted file
    is one `UnpicklingError` naming it, raised here rather than inside DCP, which would log two tracebacks
    while falling back from the global to the per-rank metadata."""
    path = Path(directory) / ".metadata"
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{path} cannot be read: {err}") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as err:
            raise pickle.UnpicklingError(
                f"{path} cannot be read ({type(err).__name__}: {err}): the file is corrupt"
            ) from None
    if type(metadata).__name__ != "Metadata":
        raise pickle.UnpicklingError(f"{path} holds no DCP Metadata")
    return metadata


def _safe_reader(directory: Path, metadata):
    """A DCP FileSystemReader that hands DCP the `.metadata` already read without running code
    (`read_dcp_metadata`), instead of unpickling the file itself."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def _safe_planner():
    """DCP's default load planner, except that a non-tensor item is read weights-only (no pickle code)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return SafePlanner()


def _json_value(value, where: str):
    """Optimizer hyper-parameters as JSON (tuples become lists, restored by `_param_groups`)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v, where) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{where}: {type(value).__name__} is not a JSON value")


def _param_groups(groups: list[dict]) -> list[dict]:
    return [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]


def save_sharded(
    directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict
) -> None:
    """Collective: every process writes its shards of the trainable parameters and the optimizer's tensors
    (torch.distributed.checkpoint, loadable at any world size) and its own `extra` (JSON) into `directory`;
    the main process adds the optimizer's hyper-parameters (JSON) and the world size.

    `directory` must be the same path on every process (a shared filesystem across nodes) and exist.
    `fastmedusa.train.checkpoint.write_checkpoint` wraps this in the atomic temp-dir-and-rename protocol,
    which also tells every process when one of them failed here (so none waits for it).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from fastmedusa.train.checkpoint import write_json

    directory = Path(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    dcp.save(
        {"model": _drop_frozen(model, model_sd), "optim": {"state": optim_sd["state"]}},
        checkpoint_id=str(directory),
    )
    rank = dist.get_rank() if _initialized() else 0
    write_json(directory / EXTRA_FILE.format(rank=rank), extra)
    if rank == 0:
        groups = [
            {k: _json_value(v, f"param_groups.{k}") for k, v in g.items()} for g in optim_sd["param_groups"]
        ]
        write_json(directory / OPTIMIZER_FILE, {"param_groups": groups})
        world = dist.get_world_size() if _initialized() else 1
        write_json(directory / META_FILE, {"world_size": world})


def load_sharded(
    directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict:
    """Collective: restore what `save_sharded` wrote, at the same or another world size, wrapped with FSDP2
    or not; returns this process's `extra` (rank 0's when the world size changed: per-rank RNG states
    and data positions do not carry over between world sizes). Verify the manifest first
    (`fastmedusa.train.checkpoint.verify_manifest`): this reads the files it is given."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    from fastmedusa.train.checkpoint import read_json

    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(
            f"{directory} is not a sharded checkpoint (no .metadata): pass one written by save_sharded"
        )
    metadata = read_dcp_metadata(directory)  # a bad file fails here in one line, before DCP logs its fallbacks
    # strict=False: the frozen parameters are not in the checkpoint. Every trainable one is: DCP raises
    # when a key asked for is missing from the checkpoint (e.g. a stage-1 checkpoint resumed in stage 2).
    opts = _state_options(strict=False)
    load = dict(checkpoint_id=str(directory), storage_reader=_safe_reader(directory, metadata), planner=_safe_planner())
    if optimizer is None:
        state = {"model": _drop_frozen(model, get_model_state_dict(model, options=opts))}
        dcp.load(state, **load)
        set_model_state_dict(model, state["model"], options=opts)
    else:
        # get_state_dict creates the optimizer's state (a zero-lr step) so DCP has tensors to load into
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
        state = {"model": _drop_frozen(model, model_sd), "optim": {"state": optim_sd["state"]}}
        dcp.load(state, **load)
        groups = read_json(directory / OPTIMIZER_FILE)["param_groups"]
        optim_sd = {"state": state["optim"]["state"], "param_groups": _param_groups(groups)}
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd, options=opts
        )
    rank = dist.get_rank() if _initialized() else 0
    world = dist.get_world_size() if _initialized() else 1
    saved_world = read_json(directory / META_FILE)["world_size"]
    return read_json(directory / EXTRA_FILE.format(rank=rank if world == saved_world else 0))


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict,
    *,
    keep: int = 2,
) -> Path:
    """Collective: `output_dir/checkpoint-{step:07d}` through the one write path of
    `fastmedusa.train.checkpoint.write_checkpoint` (temp dir, manifest, fsync, rename by rank 0)."""
    from fastmedusa.train.checkpoint import write_checkpoint

    return write_checkpoint(
        Path(output_dir), step, lambda tmp: save_sharded(tmp, model, optimizer, extra),
        keep=keep, main=is_main_process(), barrier=barrier,
        any_failed=lambda failed: bool(all_reduce_max(float(failed))),
    )  # fmt: skip


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict:
    """Collective: verify the manifest of a directory written by `save_checkpoint`, restore it; returns `extra`."""
    from fastmedusa.train.checkpoint import verify_manifest

    verify_manifest(Path(path))
    return load_sharded(path, model, optimizer)


def full_on_host(value: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """Collective for a DTensor (call it for the same tensors in the same order on every process): the whole
    tensor, detached, on the host; None where `keep` is False (the gather still runs there)."""
    from torch.distributed.tensor import DTensor

    full = value.full_tensor() if isinstance(value, DTensor) else value
    return full.detach().cpu() if keep else None


def export_heads(model: nn.Module, directory: str | os.PathLike) -> Path | None:
    """Collective: gather the full heads (and, for a shared projection, the LM head) and, on rank 0, write
    them with the one heads writer `MedusaModel.save_heads` uses. Returns the directory on rank 0, None
    elsewhere."""
    from fastmedusa.model.export import checkpoint_from_module_state, write_heads

    config = model.medusa_config
    state = {key: full_on_host(value) for key, value in model.medusa_heads.state_dict().items()}
    lm_head = full_on_host(model.medusa_heads.base_lm_head.weight) if config.shared_lm_head else None
    if not is_main_process():
        barrier()
        return None
    write_heads(directory, checkpoint_from_module_state(config, state, lm_head))
    barrier()
    return Path(directory)


def export_backbone(
    model: nn.Module, directory: str | os.PathLike, tokenizer=None, marker: dict | None = None
) -> Path | None:
    """Collective: gather the full backbone (stage 2) one tensor at a time, keeping the host copy on rank 0
    only, and write it there with `save_base_model`. A failure on rank 0 is raised on every rank (the others
    would otherwise wait for it). Returns the directory on rank 0, None elsewhere."""
    from fastmedusa.model.loading import save_base_model

    main = is_main_process()
    state = {}
    for key, value in model.base.state_dict().items():  # one tensor at a time, kept on rank 0 only
        full = full_on_host(value, keep=main)
        if full is not None:
            state[key] = full
    error = None
    if main:
        try:
            save_base_model(model.base, directory, tokenizer, state_dict=state, marker=marker)
        except Exception as err:  # noqa: BLE001 - re-raised on every process below
            error = f"{type(err).__name__}: {err}"
    errors = [error]
    dist.broadcast_object_list(errors, src=0)
    if errors[0] is not None:
        raise RuntimeError(f"writing the trained backbone to {directory} failed on rank 0: {errors[0]}")
    return Path(directory) if main else None


# -- the Trainer's backend -------------------------------------------------------------------------------
def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() in ("1", "true", "yes")


class FSDPBackend:
    """The FSDP2 implementation of the Trainer's seams (see `fastmedusa.train.backend.SingleProcess`).

    Under `accelerate launch --config_file examples/accelerate_fsdp2.yaml`, `from_env` reads that file's
    settings from the environment accelerate sets (mixed precision, activation checkpointing, reshard
    after forward); the wrapping itself is always `apply_fsdp`.
    """

    def __init__(
        self,
        info: DistInfo | None = None,
        *,
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype = torch.float32,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
    ) -> None:
        self.info = info or init_distributed()
        self.rank, self.world_size = self.info.rank, self.info.world_size
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward

    @classmethod
    def from_env(
        cls,
        info: DistInfo | None = None,
        *,
        param_dtype: torch.dtype | None = None,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
    ) -> FSDPBackend:
        """The arguments, overridden by accelerate's FSDP settings when `accelerate launch` set them."""
        if _env_flag("ACCELERATE_USE_FSDP"):
            version = os.environ.get("FSDP_VERSION", "1")
            if version != "2":
                raise ValueError(
                    f"accelerate config has fsdp_version {version}: fastmedusa shards with FSDP2, set "
                    "`fsdp_version: 2` (see examples/accelerate_fsdp2.yaml)"
                )
            if _env_flag("FSDP_OFFLOAD_PARAMS"):
                raise ValueError(
                    "fsdp_offload_params is not supported: set it to false in the accelerate config"
                )
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
        if precision in ("bf16", "fp16"):
            param_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        elif precision == "no":
            param_dtype = torch.float32
        if (flag := _env_flag("FSDP_ACTIVATION_CHECKPOINTING")) is not None:
            activation_checkpointing = flag
        if (flag := _env_flag("FSDP_RESHARD_AFTER_FORWARD")) is not None:
            reshard_after_forward = flag
        return cls(
            info,
            param_dtype=param_dtype,
            activation_checkpointing=activation_checkpointing,
            reshard_after_forward=reshard_after_forward,
        )

    shards_model = True  # the heads' weights are DTensor shards outside the model's forward

    @property
    def device(self) -> torch.device:
        """This process's device (cuda:LOCAL_RANK, or the CPU under gloo)."""
        return self.info.device

    def is_main_process(self) -> bool:
        return self.info.is_main

    def shard_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return shard_rows(batch, self.rank, self.world_size)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return apply_fsdp(
            model,
            param_dtype=self.param_dtype,
            reduce_dtype=self.reduce_dtype,
            activation_checkpointing=self.activation_checkpointing,
            reshard_after_forward=self.reshard_after_forward,
        )

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops = {"sum": all_reduce_sum, "max": all_reduce_max, "mean": all_reduce_mean}
        if op not in ops:
            raise ValueError(f"op={op!r} is not one of {tuple(ops)}")
        return ops[op](tensor)

    def barrier(self) -> None:
        barrier()

    def first_error(self, message: str | None) -> str | None:
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, message)
        return next((m for m in messages if m), None)

    def save_checkpoint(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict
    ) -> None:
        save_sharded(directory, model, optimizer, extra)

    def load_checkpoint(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return load_sharded(directory, model, optimizer)

    def clip_grad_norm_(self, parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(parameters, max_norm)

    def export_heads(self, model: nn.Module, directory: str | os.PathLike) -> Path | None:
        return export_heads(model, directory)

    def export_backbone(
        self, model: nn.Module, directory: str | os.PathLike, tokenizer=None, marker: dict | None = None
    ) -> Path | None:
        return export_backbone(model, directory, tokenizer, marker)
