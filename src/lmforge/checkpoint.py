"""Checkpoint folders: a Hugging Face model folder plus the state needed to resume bit-exactly.

    step_000100/
      config.json            transformers config (llama / qwen3) + the lmforge ModelConfig + token ids
      generation_config.json eos = <|endoftext|> and <|im_end|>, so transformers' generate stops a reply
      model.safetensors      HF-named weights (tied head omitted, as transformers does)
                             (a LoRA checkpoint has adapter_config.json + adapter_model.safetensors instead)
      tokenizer.json, tokenizer_config.json, chat_template.jinja
      lmforge.yaml           the resolved run config
      optimizer/             optimizer state: torch.distributed.checkpoint shards keyed by parameter name,
                             one per rank, so a run resumes on another number of processes or layout
                             (older checkpoints: optimizer.pt, still read)
      trainer_state.json     step, tokens, schedule, data position, metrics
      rng.pt                 torch / CUDA / python RNG states of every rank

The folder is built under a temporary name and renamed into place (lmforge.io.AtomicDir), so a
crash during a save leaves the previous checkpoint as the latest complete one; under several
processes every rank writes its optimizer shard into the same temporary folder first.

`resolve_checkpoint` is the one reading of what a user names as a checkpoint (a checkpoint
folder, a run folder, a stage folder, a stage name); every command goes through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import ModelConfig, section_from_dict
from lmforge.errors import LmforgeError
from lmforge.io import AtomicDir, atomic_write_json, clear_leftovers, read_json, remove_tree
from lmforge.model import moe
from lmforge.model.spec import build_model
from lmforge.model.t5 import t5_hf_config
from lmforge.model.transformer import head_dim as model_head_dim
from lmforge.model.window import hf_window_fields
from lmforge.tokenizer import Tokenizer
from lmforge.train.dist import barrier

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
STEP_RE = re.compile(r"^step_(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's files, written by lmforge.train.lora
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STAGES = ("pretrain", "sft", "dpo", "rm", "grpo", "seq2seq")  # the stages that write checkpoints into a run


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile / FSDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def hf_config(cfg: ModelConfig, tok: Tokenizer | None = None) -> dict:
    """The transformers config.json: llama, qwen2 when only q/k/v have biases, qwen3 with QK-norm, deepseek_v3
    for multi-head latent attention.

    Written into every checkpoint, so a checkpoint folder loads in transformers as it is; variants
    transformers cannot represent get only the `lmforge` section (export says which key is why).
    With the checkpoint's tokenizer it also carries the bos / eos / pad ids.
    """
    out: dict = {}
    if cfg.arch == "t5":
        out = t5_hf_config(cfg)
    elif cfg.arch == "llama" and cfg.attention == "mha" and cfg.mlp == "swiglu" and cfg.norm == "rmsnorm" \
            and cfg.pos == "rope" and not cfg.logit_softcap:
        from lmforge.model.transformer import ffn_dim

        head_dim = model_head_dim(cfg)
        out = {
            "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
            "model_type": "qwen3" if cfg.qk_norm else "llama",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd,
            "intermediate_size": ffn_dim(cfg),
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_scaling": None,
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
            "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "torch_dtype": "float32",
            "use_cache": True,
        }
        if cfg.attn_qkv_bias and not cfg.bias and not cfg.qk_norm:  # Qwen2: biases on q/k/v only
            out.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                       sliding_window=None, max_window_layers=cfg.n_layer,
                       layer_types=["full_attention"] * cfg.n_layer)
            out.pop("attention_bias")
            out.pop("mlp_bias")
        elif cfg.qk_norm:
            out.pop("mlp_bias")
        if cfg.sliding_window:  # local layers: Ministral, or Qwen2 / Qwen3 with layer types (model/window.py)
            fields = hf_window_fields(cfg, out["model_type"])
            if fields is None:
                out = {}
            else:
                out.update(fields)
                if out["model_type"] == "ministral":  # Llama without biases
                    out.pop("attention_bias")
                    out.pop("mlp_bias")
        if cfg.moe.experts:  # Qwen3-MoE where it can say what the model computes, else only the lmforge section
            out = {} if moe.hf_problems(cfg) else {**out, **moe.hf_fields(cfg, ffn_dim(cfg))}
            out.pop("mlp_bias", None)
    elif cfg.arch == "llama" and cfg.attention == "mla" and cfg.mlp == "swiglu" and cfg.norm == "rmsnorm" \
            and not cfg.logit_softcap:
        from lmforge.model.mla import deepseek_config
        from lmforge.model.transformer import ffn_dim

        out = deepseek_config(cfg, ffn_dim(cfg))
    if tok is not None:
        out.update(token_ids(tok))
    out["lmforge"] = dataclasses.asdict(cfg)
    return out


def token_ids(tok: Tokenizer) -> dict:
    """config.json's bos / eos / pad: the document end ends a sequence and pads a batch; BOS only if the
    tokenizer has one (lmforge's own tokenizers have none and add nothing before a text)."""
    return {"bos_token_id": getattr(tok, "bos_id", None), "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}


def generation_config(tok: Tokenizer | None) -> dict:
    """generation_config.json: a completion ends at <|endoftext|>, a chat reply at <|im_end|>.

    transformers' `generate` reads its stop ids from here, not from config.json; without it a chat
    reply runs on past <|im_end|> to max_new_tokens.
    """
    out: dict = {"_from_model_config": False}
    if tok is not None:
        eos = [tok.eot_id] + ([tok.im_end_id] if tok.im_end_id is not None else [])
        out.update(eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=tok.eot_id)
        if getattr(tok, "bos_id", None) is not None:
            out["bos_token_id"] = tok.bos_id
    return out


def write_model_config(folder: Path, cfg: ModelConfig, tokenizer_dir: str | Path | None) -> None:
    """config.json and generation_config.json of a checkpoint, with the ids of its own tokenizer."""
    has_tok = tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file()
    tok = Tokenizer.load(tokenizer_dir) if has_tok else None  # (copy_tokenizer names a missing one)
    atomic_write_json(folder / "config.json", hf_config(cfg, tok))
    atomic_write_json(folder / "generation_config.json", generation_config(tok))


def model_state(model: nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors model.safetensors holds (`state`: an already gathered state dict of the model)."""
    model = unwrap(model)
    sd = {k: v.detach().contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors refuses shared storage; transformers re-ties it
    return sd


def _fault_point(name: str, where: str) -> None:
    """SIGKILL this process if LMFORGE_FAULT is `name` or `name:where` (crash-safety tests kill a real process)."""
    if os.environ.get("LMFORGE_FAULT") in (name, f"{name}:{where}"):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(path: str | Path, model: nn.Module, *, tokenizer_dir: str | Path | None = None,
                    config_yaml: str | None = None, optimizer_state: dict | None = None,
                    trainer_state: dict | None = None, rng_state: dict | None = None,
                    extra: Callable[[Path], None] | None = None, state: dict | None = None,
                    shards: Callable[[Path], None] | None = None) -> Path:
    """Write a complete checkpoint folder atomically; returns its path.

    state: the model's whole state dict, when the caller gathered it (see `full_model_state`).
    shards(tmp), under several processes: each rank writes its part of the sharded state into the
    folder (the optimizer's, through torch.distributed.checkpoint). Then every rank calls this, the
    main rank writes everything else, and the folder takes its final name only once all have written:
    a kill at any moment leaves the previous checkpoint as it was.
    """
    path = Path(path)
    m = unwrap(model)
    main, tag = _is_main(), _shared_tag()
    target = AtomicDir(path, tag)
    with (target if main else contextlib.nullcontext(target.tmp)) as tmp, _disk_full_as_enospc(path.parent):
        barrier()  # the main rank has made the folder
        if not main:  # the others write their shards (dcp.save waits for the main rank's part in it)
            if shards is not None:
                shards(tmp)
            barrier()
            return path
        write_model_config(tmp, m.cfg, tokenizer_dir)
        save_weights = getattr(m, "save_weights", None)
        if save_weights is not None:  # a model with its own weight files: LoRA adapters, a reward head
            save_weights(tmp, state)
        else:
            save_file(model_state(m, state), tmp / "model.safetensors", metadata={"format": "pt"})
        if shards is not None:
            shards(tmp)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        if config_yaml is not None:
            (tmp / "lmforge.yaml").write_text(config_yaml, encoding="utf-8")
        if optimizer_state is not None:
            _torch_save(optimizer_state, tmp / "optimizer.pt")
        if rng_state is not None:
            _torch_save(rng_state, tmp / "rng.pt")
        if extra is not None:
            extra(tmp)
        _fault_point("mid-save", path.name)
        if trainer_state is not None:  # written last: its presence marks a resumable checkpoint
            atomic_write_json(tmp / "trainer_state.json", trainer_state)
        barrier()  # every rank's shards are written
    return path


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _shared_tag() -> str:
    """The main rank's pid, on every rank: the temporary folder's name, the same for all of them."""
    if not (dist.is_available() and dist.is_initialized()):
        return str(os.getpid())
    out = [None]
    if dist.get_rank() == 0:
        out = [str(os.getpid())]
    dist.broadcast_object_list(out, src=0)
    return out[0]


# --- sharded state (FSDP) ---------------------------------------------------------------------------

OPTIMIZER_SHARDS = "optimizer"  # the optimizer state as torch.distributed.checkpoint shards


def _sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def full_model_state(model: nn.Module, stages: dist.ProcessGroup | None = None) -> dict | None:
    """The model's whole state dict on the main rank (None on the others): gathered from every rank's
    shards under FSDP, or from every pipeline stage's part (`stages`: their group), each rank calling it;
    None when the module holds it all (save_checkpoint reads the module itself)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = unwrap(model)
    if stages is not None:  # each rank holds some layers, under their full names
        part = model.state_dict()
        if _sharded(model):  # FSDP2 on the stages: whole on every rank of this stage's data-parallel group
            part = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        parts: list = [None] * dist.get_world_size(stages)
        dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in part.items()}, group=stages)
        return {k: v for part in parts for k, v in part.items()} if _is_main() else None
    if not _sharded(model):
        return None
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if _is_main() else None


def _flat_options() -> StateDictOptions:
    """Optimizer state keyed per parameter (state.FQN.exp_avg, param_groups.FQN.lr), not per group index.

    Keyed by group index, the groups' parameter lists are one key each that every rank writes and
    torch.distributed.checkpoint saves once, from one rank: under pipeline parallel each rank holds other
    parameters, and the others read back a list naming none of theirs (their groups lose every key)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shard of the optimizer state, keyed by parameter name, so a run resumes on
    another number of processes or another layout (torch.distributed.checkpoint reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(unwrap(model), optimizer, options=_flat_options())
    with warnings.catch_warnings(), _dcp_errors():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"optimizer": osd}, checkpoint_id=str(folder), no_dist=not dist.is_initialized())


@contextlib.contextmanager
def _dcp_errors() -> Iterator[None]:
    """torch.distributed.checkpoint wraps a rank's failure (a full disk, say) in a CheckpointException, a
    BaseException: re-raise the failure itself, so the disk-full check (torch.save reports a full disk as a
    RuntimeError) and the callers' error handling see what happened."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, Exception):
                raise exc from None
        raise LmforgeError(f"saving or loading the sharded optimizer state failed: {e}") from None


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The optimizer state of a checkpoint, on this run's layout (an older checkpoint's optimizer.pt too)."""
    folder = Path(path) / OPTIMIZER_SHARDS
    if not folder.is_dir():
        state = torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True)
        # Written when an empty parameter group (LoRA's vectors) was still kept: this run leaves it out.
        state["param_groups"] = [g for g in state["param_groups"] if g["params"]]
        optimizer.load_state_dict(state)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    inner = unwrap(model)
    # The schedule scales each group's base rate (set_lr's initial_lr), which the state dict leaves out:
    # the groups as this run's config built them keep theirs.
    base = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    try:
        # Checkpoints written before the state was keyed per parameter keep their groups by index.
        by_index = "optimizer.param_groups.0.params" in dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        options = None if by_index else _flat_options()
        osd = get_optimizer_state_dict(inner, optimizer, options=options)
        with warnings.catch_warnings(), _dcp_errors():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"optimizer": osd}, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    except (Exception, LmforgeError) as e:  # a missing or damaged shard, or another model's state
        raise LmforgeError(f"{folder}: the optimizer state cannot be read ({e})") from None
    set_optimizer_state_dict(inner, optimizer, osd, options=options)
    for group, lr in zip(optimizer.param_groups, base):
        group["initial_lr"] = lr


def _torch_save(obj: object, path: Path) -> None:
    """torch.save through a Python file: then a full disk leaves its OSError on the RuntimeError torch
    raises (given a path, torch reports only "unexpected pos ..." and the cause is lost)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _is_disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a writer library's error is a full disk: an ENOSPC in its chain, the OS message in its
    text (safetensors: "No space left on device (os error 28)"), or no free space left at all."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free == 0
    except OSError:
        return False


@contextlib.contextmanager
def _disk_full_as_enospc(folder: Path) -> Iterator[None]:
    """Re-raise safetensors' and torch's disk-full errors as OSError(ENOSPC), which AtomicDir turns into
    the DiskFullError every artifact write gives (the temporary folder removed, the last checkpoint kept)."""
    try:
        yield
    except (SafetensorError, RuntimeError) as e:
        if _is_disk_full(e, folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from e
        raise


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").is_file():
        raise LmforgeError(f"no tokenizer.json in {src}; run `lmforge tokenizer` first")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LmforgeError(f"{path} is not a checkpoint: config.json is missing")
    data = read_json(cfg_file, "the checkpoint is damaged")
    if not isinstance(data, dict) or "lmforge" not in data:
        raise LmforgeError(f"{cfg_file} has no 'lmforge' section: a Hugging Face folder must be imported "
                           "first with `lmforge import hf PATH`")
    return section_from_dict(ModelConfig, data["lmforge"], cfg_file, "lmforge.")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> nn.Module:
    """Build the model a checkpoint describes and load its weights, checking every tensor."""
    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"checkpoint folder not found: {path}")
    cfg = read_model_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LmforgeError(f"{path} is incomplete: model.safetensors is missing")
    try:
        sd = load_file(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise LmforgeError(f"{weights} cannot be read ({e}); the checkpoint is damaged or truncated") from None
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise LmforgeError(f"{weights} does not match its config.json: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for k, v in model.state_dict().items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise LmforgeError(f"{weights}: tensor {k} has shape {tuple(sd[k].shape)}, config says {tuple(v.shape)}")
    model.load_state_dict(sd, strict=False, assign=False)
    if hasattr(model, "tie_weights"):  # a family that knows its own shared weights (t5)
        model.tie_weights()
    elif cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if cfg.pos == "rope":  # non-persistent buffers were left empty by to_empty()
        from lmforge.model.transformer import rope_cache

        cos, sin = rope_cache(model.rope_dim, cfg.max_seq_len, cfg.rope_theta)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def stage_checkpoints(run_dir: str | Path, stage: str) -> Path:
    """Where a stage keeps its step_N folders: RUN/checkpoints for pretraining, else RUN/<stage>/checkpoints."""
    return Path(run_dir) / "checkpoints" if stage == "pretrain" else Path(run_dir) / stage / "checkpoints"


def resolve_checkpoint(target: str | Path = "", run_dir: str | Path | None = None, key: str = "") -> Path:
    """The checkpoint folder a user means, read the same way by every command that takes one.

    - a checkpoint folder (config.json beside model.safetensors, or a LoRA adapter): that folder;
    - a folder of step_N checkpoints (RUN/checkpoints, RUN/sft/checkpoints): its latest complete one;
    - a run folder (RUN): its latest pretraining checkpoint; a stage folder (RUN/sft): that stage's latest;
    - a stage name (pretrain, sft, dpo, rm, grpo), when no folder of that name exists here: that
      stage's latest in `run_dir`; "" is the latest pretraining checkpoint of `run_dir`.
    `key` (e.g. "sft.init_from") starts every error, so the user knows which setting to fix.
    """
    name = str(target)
    where = f"{key}={name!r}: " if key else ""
    if name == "" or (name in STAGES and run_dir is not None and not Path(name).exists()):
        if run_dir is None:
            raise LmforgeError(f"{where}no checkpoint given: name a checkpoint folder, a run folder or a stage folder")
        stage = name or "pretrain"
        found = latest_checkpoint(stage_checkpoints(run_dir, stage))
        if found is None:
            raise LmforgeError(f"{where}no {stage} checkpoint in {stage_checkpoints(run_dir, stage)} yet"
                               f"{_stages_hint(Path(run_dir), stage)}: run `lmforge {stage} run_dir={run_dir}` "
                               "first, or give a checkpoint folder")
        return found
    p = Path(target)
    if not p.exists():
        raise LmforgeError(f"{where}{p} does not exist: give a checkpoint folder, a run folder, a stage folder "
                           f"(RUN/sft) or a stage name ({', '.join(STAGES)})")
    if not p.is_dir():
        raise LmforgeError(f"{where}{p} is a file; a checkpoint is a folder (config.json + model.safetensors)")
    if (p / "config.json").is_file():
        return p  # load_model / load_any say precisely what is wrong with an incomplete one
    for root in (p / "checkpoints", p):  # a run or stage folder, or a folder of step_N
        found = latest_checkpoint(root)
        if found is not None:
            return found
    if (p / "checkpoints").is_dir():
        raise LmforgeError(f"{where}{p / 'checkpoints'} holds no complete checkpoint yet{_stages_hint(p, '')} "
                           "(train first; the folders of an interrupted save do not count)")
    hint = _stages_hint(p, "")
    if hint:
        raise LmforgeError(f"{where}{p} has no pretraining checkpoint (no checkpoints/ folder){hint}: "
                           "give one of those")
    raise LmforgeError(f"{where}{p} is neither a checkpoint (no config.json) nor a run or stage folder "
                       "(no checkpoints/ with step_N folders)")


def _stages_hint(run: Path, skip: str) -> str:
    """", the stages with checkpoints in this run: RUN/sft, ..." when there are any besides `skip`."""
    found = [str(run / s) for s in STAGES[1:] if s != skip and latest_checkpoint(stage_checkpoints(run, s))]
    return f"; the run's stages with checkpoints: {', '.join(found)}" if found else ""


def list_checkpoints(root: str | Path, resumable: bool = False) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders of a crashed save skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        weights = (p / "model.safetensors").is_file() or (p / "adapter_model.safetensors").is_file()
        if m and p.is_dir() and weights and (p / "config.json").is_file():
            if not resumable or (p / "trainer_state.json").is_file():
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path, resumable: bool = False) -> Path | None:
    found = list_checkpoints(root, resumable)
    return found[-1] if found else None


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; also clear leftovers of interrupted saves and prunes.

    Each old checkpoint is renamed to a hidden name before it is deleted, so a kill mid-delete
    never leaves a half-deleted `step_N` that looks like a checkpoint (or is never pruned).
    """
    root = Path(root)
    if keep_last > 0:
        for p in list_checkpoints(root)[:-keep_last]:
            remove_tree(p, before_delete=lambda hidden, name=p.name: _delete_weights_then_fault(hidden, name))
    clear_leftovers(root, "step_*")


def _delete_weights_then_fault(hidden: Path, name: str) -> None:
    """Under LMFORGE_FAULT=mid-prune[:step_N], die with the folder half deleted (its weights gone)."""
    if os.environ.get("LMFORGE_FAULT") in ("mid-prune", f"mid-prune:{name}"):
        for weights in hidden.glob("*.safetensors"):
            weights.unlink()
        _fault_point("mid-prune", name)


def resume_target(resume: str, ckpt_dir: str | Path) -> Path | None:
    """The checkpoint `train.resume` names: auto -> this run's latest resumable one (or None), none -> None,
    else a path that must be a resumable checkpoint; anything else is an error saying what the path is."""
    ckpt_dir = Path(ckpt_dir)
    if resume == "auto":
        return latest_checkpoint(ckpt_dir, resumable=True)
    if resume in ("none", ""):
        return None
    path = Path(resume)
    key = f"train.resume={resume}"
    if not path.exists():
        near = [p.name for p in list_checkpoints(path.parent, resumable=True)] if path.parent.is_dir() else []
        hint = f"; checkpoints in {path.parent}: {', '.join(near[-5:])}" if near else ""
        raise LmforgeError(f"{key}: {path} does not exist{hint}")
    if not path.is_dir():
        raise LmforgeError(f"{key}: {path} is a file, not a checkpoint folder")
    if (path / "trainer_state.json").is_file() and ((path / OPTIMIZER_SHARDS).is_dir()
                                                    or (path / "optimizer.pt").is_file()):
        return path
    if (path / "config.json").is_file():
        raise LmforgeError(f"{key}: {path} is a weights-only checkpoint (no trainer_state.json / optimizer state), "
                           f"which a run cannot resume from; start a new run from its weights with "
                           f"train.init_from={path}")
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root, resumable=True)
        if found is not None:
            raise LmforgeError(f"{key}: {path} is a run or checkpoints folder, not a checkpoint; its latest "
                               f"resumable checkpoint is {found} (train.resume={found}, or run_dir={path} "
                               "with train.resume=auto)")
    raise LmforgeError(f"{key}: {path} is not a checkpoint folder (no config.json, trainer_state.json or "
                       "step_N folders in it)")


def superseded(ckpt_dir: str | Path, resume_from: Path | None) -> list[Path]:
    """This run's checkpoints that a run starting from `resume_from` (None: from scratch) would mix with.

    From scratch, or from another run's checkpoint: all of them. From one of its own: the later ones,
    which belong to the continuation being abandoned (auto-resume would otherwise pick them next time).
    """
    ckpt_dir = Path(ckpt_dir)
    found = [p for p in ckpt_dir.iterdir() if STEP_RE.match(p.name) and p.is_dir()] if ckpt_dir.is_dir() else []
    if resume_from is not None and resume_from.resolve().parent == ckpt_dir.resolve():
        step = int(STEP_RE.match(resume_from.name).group(1)) if STEP_RE.match(resume_from.name) else -1
        found = [p for p in found if int(STEP_RE.match(p.name).group(1)) > step]
    return sorted(found)


def load_training_state(path: str | Path) -> tuple[dict, dict]:
    """(trainer_state, rng_state) of a resumable checkpoint; its optimizer state loads with load_optimizer."""
    path = Path(path)
    missing = [name for name in ("trainer_state.json",) if not (path / name).is_file()]
    if not (path / "optimizer.pt").is_file() and not (path / OPTIMIZER_SHARDS).is_dir():
        missing.append(f"{OPTIMIZER_SHARDS}/")
    if missing:
        raise LmforgeError(f"{path} cannot be resumed from: {missing[0]} is missing (a weights-only checkpoint "
                           "can start a new run with train.init_from=...)")
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True) if (path / "rng.pt").is_file() else {}
    except (json.JSONDecodeError, RuntimeError, EOFError, OSError) as e:
        raise LmforgeError(f"{path}: training state cannot be read ({e}); the checkpoint is damaged") from None
    return state, rng
