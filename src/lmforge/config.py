"""Config schemas for every stage, YAML recipes and `key=value` overrides.

One `Config` holds a section per stage. A recipe is YAML whose keys mirror these dataclasses;
any key can be overridden from the command line (`model.n_layer=4 train.lr=1e-3`). Unknown keys
and wrong types are errors that name the key and suggest the closest valid one, because a typo
that silently falls back to a default wastes a whole training run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.errors import LmforgeError


class ConfigError(LmforgeError, ValueError):
    """A recipe or override that does not fit the schema; `key` is the dotted key at fault, if one is."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class TokenizerConfig:
    vocab_size: int = 32000  # tokens in the trained BPE vocabulary, special tokens included
    min_frequency: int = 2  # a pair must occur this often to become a merge
    # added verbatim and never split; <|endoftext|>, <|im_start|> and <|im_end|> are always there
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    from_file: str = ""  # adopt instead of training: a tokenizer.json (or its folder), sentencepiece .model, .tiktoken
    add_chat_tokens: bool = False  # adopting: add <|im_start|>, <|im_end|> (chat and SFT need them)
    tiktoken_encoding: Literal["", "r50k_base", "cl100k_base", "o200k_base"] = ""  # .tiktoken's encoding; "": by name
    sources: list[str] = field(default_factory=list)  # text to train on; empty: use data.sources
    max_train_bytes: int = 0  # 0: train on everything; else a deterministic sample of about this size
    held_out_fraction: float = 0.02  # documents kept out of training to report bytes per token


@dataclass
class FilterConfig:
    """Heuristic quality filters (data/clean.py), each off by default; thresholds from Gopher and C4."""

    lines: bool = False  # C4 line rules: terminal punctuation, min words, javascript/cookie; lorem ipsum docs
    min_line_words: int = 3  # lines: a kept line has at least this many words (a CJK character is a word)
    repetition: bool = False  # Gopher repetition: duplicate lines/paragraphs, top n-gram share
    max_dup_line_frac: float = 0.30  # share of lines that repeat an earlier line
    max_dup_line_char_frac: float = 0.20  # share of characters in repeated lines
    max_dup_para_frac: float = 0.30  # share of paragraphs that repeat an earlier one
    max_dup_para_char_frac: float = 0.20  # share of characters in repeated paragraphs
    max_top_ngram_frac: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])  # top 2-, 3-, 4-gram
    words: bool = False  # Gopher word statistics
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0  # over non-CJK words
    max_mean_word_len: float = 10.0
    max_symbol_ratio: float = 0.1  # (# + ellipses) per word
    max_bullet_lines: float = 0.9  # share of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # share of lines ending with an ellipsis
    min_chars: int = 0  # documents shorter than this (characters) are dropped; 0: off
    code: bool = False  # also apply the prose filters (lines, repetition, words, language) to code files
    language: list[str] = field(default_factory=list)  # keep only these languages (en, zh, ...), by language_model
    language_model: str = ""  # a local fastText language-ID model (lid.176.bin/.ftz, GlotLID's model.bin)
    min_language_score: float = 0.65  # the model's probability for the language it picks, below it: dropped


@dataclass
class MinHashConfig:
    """Near-duplicate detection (data/dedup.py): word n-gram MinHash, LSH bands, verified similarity."""

    ngram: int = 5  # words per shingle
    num_perm: int = 128  # hash functions in a signature
    bands: int = 16  # LSH bands (num_perm / bands rows each); more bands find lower similarities
    threshold: float = 0.8  # estimated Jaccard similarity at which a candidate pair is a duplicate
    seed: int = 1  # of the hash functions


@dataclass
class DataConfig:
    sources: list[str | dict] = field(default_factory=list)  # files, folders, globs; {path, name, weight}: a mixture
    text_field: str = "text"  # the field holding the text in .jsonl/.json/.csv/.parquet/.arrow, datasets folders
    filter: str = ""  # keep rows of columnar sources where e.g. lang=en, lang!=en, score>=0.5 (data/columns.py)
    val_fraction: float = 0.01  # fraction of documents held out for validation (by a hash of their text)
    workers: int = 0  # tokenizer processes; 0: all cores
    dedup: bool = True  # drop exact duplicate documents
    shard_tokens: int = 100_000_000  # tokens per shard file
    max_doc_bytes: int = 32768  # longer files/records become documents of at most this, cut at paragraphs; 0: off
    num_tasks: int = 1  # prepare on many machines: the corpus's files cut into this many tasks (data/tasks.py)
    task_index: int = 0  # which task this `prepare` is (0 .. num_tasks-1), e.g. $SLURM_ARRAY_TASK_ID
    merge: bool = False  # join the num_tasks tasks' output into RUN/data (`lmforge prepare --merge`)
    near_dedup: bool = False  # drop near-duplicate documents (MinHash + LSH, across all sources)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    pii: bool = False  # mask e-mail addresses (<EMAIL>) and IP addresses (<IP>)
    # drop training documents that hold a window of eval.ngram tokens of one of these tasks' examples
    decontaminate: list[str] = field(default_factory=list)  # eval tasks (family:path) to keep out of training
    # auto: tiktoken when it is proven to give tokenizers' ids, else tokenizers | tokenizers | tiktoken (or error)
    encoder: Literal["auto", "tokenizers", "tiktoken"] = "auto"


@dataclass
class MoEConfig:
    """Mixture of experts in place of the MLP (model/moe.py); experts=0 keeps the dense model."""

    experts: int = 0  # routed experts per MoE layer; 0: dense MLPs everywhere
    top_k: int = 2  # experts each token is sent to
    shared_experts: int = 0  # experts every token passes through as well (DeepSeek), one MLP of this many widths
    expert_dim: int = 0  # each expert's hidden width; 0: the dense ffn width / top_k, a multiple of 32
    first_dense_layers: int = 0  # layers below this keep the dense MLP (DeepSeek-V3: 3)
    # softmax: softmax then top-k (Qwen3-MoE) | sigmoid: sigmoid scores, top-k, normalised (DeepSeek-V3)
    router: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True  # softmax router: renormalise the top-k weights to sum to 1 (always for sigmoid)
    # aux_loss: Switch/Qwen load-balancing loss | aux_free: DeepSeek-V3 per-expert bias from the load | none
    balance: Literal["aux_loss", "aux_free", "none"] = "aux_loss"
    aux_coef: float = 0.001  # weight of the load-balancing loss (balance=aux_loss)
    bias_update_rate: float = 0.001  # aux_free: step of the per-expert bias after each optimizer step
    z_loss: float = 0.0  # weight of the router z-loss, mean logsumexp(router logits)^2; 0: off


@dataclass
class ModelConfig:
    preset: str = ""  # tiny | small | medium | large | xl | gpt2-* | mla-*; explicit keys override it
    # llama (RMSNorm, RoPE, SwiGLU) | gpt2 (LayerNorm, learned positions, GELU) | t5 (encoder-decoder, model/t5.py)
    arch: Literal["llama", "gpt2", "t5"] = "llama"
    vocab_size: int = 0  # 0: take it from the tokenizer, padded up to `pad_vocab_to`
    pad_vocab_to: int = 64  # multiples of 64 keep matmuls on fast kernels
    n_layer: int = 4  # transformer blocks
    n_embd: int = 256  # model width
    n_head: int = 4  # attention heads
    n_kv_head: int = 0  # 0: same as n_head; 1: multi-query attention
    head_dim: int = 0  # 0: n_embd // n_head; else each head's width (Qwen3 keeps 128 at every size)
    ffn_dim: int = 0  # 0: derived from n_embd (8/3 for SwiGLU, 4x otherwise), multiple of 64
    mlp: Literal["swiglu", "gelu", "relu2", "gated-gelu"] = "swiglu"  # the MLP's activation (gated-gelu: t5)
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # the normalisation layers
    norm_eps: float = 1e-6  # epsilon of every norm
    pos: Literal["rope", "learned", "relative"] = "rope"  # rotary, learned absolute, or T5's relative bias (t5)
    rope_theta: float = 10000.0  # RoPE base frequency
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
    bias: bool = False  # biases on every linear layer
    attn_qkv_bias: bool = False  # biases on q/k/v only (Qwen2); `bias` puts them on every linear
    tie_embeddings: bool = True  # the head shares the token embedding's weights
    max_seq_len: int = 1024  # the model's context length
    logit_softcap: float = 0.0  # 0: off; else tanh soft-capping of logits at this value
    zero_init_out: bool = False  # zero-init the output projections of attention and MLP
    init_std: float = 0.02  # standard deviation of the initial weights
    dropout: float = 0.0  # attention dropout while training
    # mha: multi-head / grouped-query attention | mla: DeepSeek-V2/V3 multi-head latent attention (model/mla.py)
    attention: Literal["mha", "mla"] = "mha"
    # MLA only (0: derived from d = n_embd / n_head, as noted):
    kv_lora_rank: int = 0  # width of the compressed key/value latent, the cached part (0: 4 d)
    q_lora_rank: int = 0  # width of the compressed query; 0: no query compression, a plain q_proj
    qk_rope_head_dim: int = 0  # per-head query/key width that carries RoPE, shared by all heads' keys (0: d / 2)
    qk_nope_head_dim: int = 0  # per-head query/key width without positions (0: d)
    v_head_dim: int = 0  # per-head value width (0: d)
    sliding_window: int = 0  # 0: full attention; else local layers see this many latest positions, their own included
    window_pattern: str = ""  # S (window) / B (block-sparse) / L (global) per layer, repeated (SSSL); "": all local
    # block-sparse layers (model/masks.py): blocks of sparse_block tokens; each query block sees itself, the
    # sparse_local blocks before it, the first sparse_global blocks, and (sparse_stride = s > 0) every s-th block
    sparse_block: int = 0  # 0: no block-sparse layers
    sparse_local: int = 2
    sparse_global: int = 1
    sparse_stride: int = 0
    # masked attention (windows, packed documents, block-sparse): auto = FlexAttention on CUDA, SDPA elsewhere;
    # flex = also for CPU forwards without gradients (PyTorch has no CPU backward for it); sdpa = never flex
    attn_impl: Literal["auto", "sdpa", "flex"] = "auto"
    moe: MoEConfig = field(default_factory=MoEConfig)
    # t5 only: the decoder's blocks (0: n_layer), the relative-position buckets and the distance where they end
    n_decoder_layer: int = 0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    decoder_start_id: int = -1  # t5: the decoder's first input id; -1: the tokenizer's <|endoftext|>


@dataclass
class SpanConfig:
    """T5's span corruption, the pretraining objective of model.arch=t5 (lmforge.data.spans)."""

    noise_density: float = 0.15  # fraction of each window's tokens that are masked out
    mean_span: float = 3.0  # mean length of a masked span
    sentinels: int = 100  # <extra_id_0> ... <extra_id_N-1>, added to the tokenizer when model.arch=t5


@dataclass
class ParallelConfig:
    # Sizes multiply to the number of processes. dp_replicate alone is DDP; with dp_shard > 1, HSDP.
    dp_replicate: int = 1  # data-parallel replicas that each hold a whole copy (DDP)
    dp_shard: int = -1  # FSDP2 shards (ZeRO-3); -1: the processes the other sizes leave over
    tp: int = 1  # tensor parallel (+ sequence parallel on the norms)
    pp: int = 1  # pipeline stages
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "zbv", "dualpipev", "gpipe"] = "1f1b"  # pipeline schedule
    pp_microbatches: int = 0  # micro-batches per pipeline step; 0: train.micro_batch split into single sequences
    ep: int = 1  # expert parallel: MoE experts split over this many of the dp_shard ranks, tokens sent by all-to-all
    cp: int = 1  # context parallel (pretraining): each sequence split across this many processes, ring attention
    fsdp_cpu_offload: bool = False  # keep FSDP's parameters, gradients and optimizer state in CPU memory
    fsdp_reshard_after_forward: bool = True  # free gathered weights after forward (less memory, one more gather)
    mixed_precision: bool = True  # on CUDA under bf16: FSDP gathers bf16 parameters, reduces gradients in fp32


@dataclass
class TrainConfig:
    seq_len: int = 1024  # tokens per training sequence
    micro_batch: int = 8  # sequences per process per forward
    batch_tokens: int = 0  # global batch in tokens; 0: micro_batch * seq_len * world
    max_steps: int = 1000  # optimizer steps (unless max_minutes fixes them)
    max_minutes: float = 0.0  # >0: fix the step count from measured step time to fit this budget
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on matrices, AdamW on the rest
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 100  # linear warmup steps
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    muon_lr: float = 0.02  # Muon's learning rate for matrices
    muon_momentum: float = 0.95  # Muon's momentum
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0: off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where measured (CPU) or known (CUDA) fast
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    loss_chunk: int = 0  # tokens per chunk of the fused head + cross-entropy (0: 1024); never all fp32 logits
    eval_every: int = 200  # steps between validation passes; 0: only at the end
    eval_batches: int = 20  # micro-batches per validation pass
    sample_every: int = 0  # steps between samples; 0: only at the end
    sample_prompt: str = ""  # prompt of the samples; "": the start of a validation document
    save_every: int = 500  # steps between checkpoints (the last step is always saved)
    keep_last: int = 3  # checkpoints kept on disk; older ones are deleted
    log_every: int = 10  # steps between progress lines and metrics.jsonl rows
    resume: str = "auto"  # auto (latest checkpoint of this run) | none (start afresh) | path to a checkpoint
    init_from: str = ""  # checkpoint to start from (continued pretraining, fine-tuning)
    tensorboard: bool = False  # also log to RUN/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    swanlab: bool = False  # also log to SwanLab (needs `pip install swanlab`)
    progress: bool = True  # the live progress line
    detect_anomaly: bool = False  # torch.autograd anomaly detection (slow; finds the op that made a NaN)


@dataclass
class EvalConfig:
    checkpoint: str = ""  # "" : latest checkpoint of the run
    split: str = "val"  # prepared split to evaluate on
    files: list[str] = field(default_factory=list)  # raw text files instead of a prepared split
    max_batches: int = 0  # 0: the whole split
    batch_size: int = 8  # sequences per forward
    seq_len: int = 0  # 0: model's max_seq_len
    task: str = ""  # "": loss/perplexity; arith: exact-match accuracy on RUN/demo/test.jsonl; or a prompts .jsonl
    tasks: list[str] = field(default_factory=list)  # benchmarks, family:path[:shots=N][:limit=N] (lmforge.eval.tasks)
    num_fewshot: int = 0  # worked examples before each question (from the task's dev/train split, else the same file)
    fewshot_seed: int = 1234  # which examples are drawn
    chat: bool = False  # ask each question as a user turn of the checkpoint's chat template (SFT'd models)
    out: str = ""  # "": RUN/eval (or beside the checkpoint outside a run); else this folder
    samples: int = 1  # code tasks: completions per problem (1: greedy, pass@1; n: sampled, pass@k for k <= n)
    temperature: float = 0.8  # code tasks with samples > 1
    exec_timeout: float = 10.0  # code tasks: seconds each program may run
    train_tasks: list[str] = field(default_factory=list)  # benchmarks scored at each pretraining validation pass
    quantize: Literal["", "int8", "int4"] = ""  # evaluate the checkpoint quantized, as `generate --quantize` runs it
    ngram: int = 13  # contamination: an example's windows of this many tokens looked up in the training shards
    contamination_share: float = 0.0  # flag an example when more than this share of its windows occur (0: any)
    exclude_contaminated: bool = False  # score only the examples the contamination check does not flag
    harness_include: str = ""  # `eval harness`: a folder (or file) of local lm-eval task YAML files
    harness_limit: int = 0  # `eval harness`: the first N examples of each task; 0: all


@dataclass
class GenerateConfig:
    checkpoint: str = ""  # "": latest checkpoint of the run
    prompts: list[str] = field(default_factory=list)  # prompts when none is given with --prompt
    max_new_tokens: int = 128  # tokens to generate per prompt
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # sample among the k most likely tokens; 0: off
    top_p: float = 0.95  # nucleus sampling; 1: off
    repetition_penalty: float = 1.0  # >1 discourages repeating tokens; 1: off
    stop: list[str] = field(default_factory=list)  # strings that end a completion
    seed: int = 0  # sampling seed
    stream: bool = True  # print text as it is generated


@dataclass
class ServeConfig:
    """`lmforge serve`'s batch and its bounds (flags of the same names win)."""

    max_batch: int = 16  # sequences decoded together (continuous batching); 1: one request at a time
    max_waiting: int = 64  # requests queued for the batch beyond this get 429 with Retry-After
    max_cached_tokens: int = 0  # KV-cache positions the batch holds, padding included; 0: max(max_batch, 8) x context


# --- post-training (lmforge.train.sft / dpo / reward / grpo) ----------------------------------------

# Per-stage `train` overrides: every TrainConfig key, None meaning "as in the run's train section",
# so one recipe can give pretraining, SFT and GRPO their own learning rates and step counts.
StageTrain = dataclasses.make_dataclass(
    "StageTrain", [(f.name, typing.get_type_hints(TrainConfig)[f.name] | None, field(default=None))
                   for f in dataclasses.fields(TrainConfig)])


@dataclass
class LoRAConfig:
    enabled: bool = False  # train LoRA adapters on a frozen base instead of all weights
    r: int = 8  # adapter rank
    alpha: float = 16.0  # adapter scale (alpha / r)
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # linear layers to adapt
    quantize: Literal["", "nf4"] = ""  # "": full-precision base; nf4: QLoRA, the frozen base in 4-bit NormalFloat


@dataclass
class SFTConfig:
    data: list[str] = field(default_factory=list)  # .jsonl / .json files of chat examples
    val_data: list[str] = field(default_factory=list)  # empty: hold out val_fraction of data
    val_fraction: float = 0.0  # fraction of data held out when val_data is empty
    init_from: str = ""  # checkpoint, a stage name of this run (pretrain, sft, dpo...), "": latest pretrain
    packing: bool = True  # several examples per row (attention kept apart); false: one padded example per row
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: StageTrain = field(default_factory=StageTrain)


@dataclass
class DPOConfig:
    data: list[str] = field(default_factory=list)  # {"prompt"|"instruction", "chosen", "rejected"}
    val_data: list[str] = field(default_factory=list)  # empty: hold out val_fraction of data
    val_fraction: float = 0.0  # fraction of data held out when val_data is empty
    init_from: str = ""  # checkpoint, a stage name of this run, "": latest pretrain
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # the preference loss
    beta: float = 0.1  # strength of the implicit KL constraint to the reference
    sft_coef: float = 0.0  # weight of the chosen reply's per-token NLL added to the loss (RPO; TRL's rpo_alpha)
    # the reference policy: a frozen copy, log-probs precomputed once, or the base with adapters off;
    # auto: adapters under LoRA, else precomputed
    reference: Literal["auto", "copy", "precomputed", "adapters"] = "auto"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: StageTrain = field(default_factory=StageTrain)


@dataclass
class RMConfig:
    data: list[str] = field(default_factory=list)  # preference pairs, as for DPO
    val_data: list[str] = field(default_factory=list)  # empty: hold out val_fraction of data
    val_fraction: float = 0.1  # fraction of data held out when val_data is empty
    init_from: str = ""  # checkpoint, a stage name of this run, "": latest pretrain
    margin: float = 0.0  # default margin in -log sigmoid(r_c - r_r - margin); a "margin" field overrides it
    center_coef: float = 0.0  # weight of (r_c + r_r)^2, keeping rewards centred on 0
    # last: a linear head on the last token (transformers' LlamaForSequenceClassification reads it too);
    # likelihood: plus the reply's summed token log-probs under the model's own LM head (reads every reply token)
    score: Literal["last", "likelihood"] = "last"
    train: StageTrain = field(default_factory=StageTrain)


@dataclass
class GRPOConfig:
    data: list[str] = field(default_factory=list)  # {"prompt"|"messages", ...fields the rewards need}
    init_from: str = ""  # checkpoint, a stage name of this run, "": latest pretrain
    group_size: int = 8  # completions sampled per prompt (train.micro_batch = prompts per micro-batch)
    max_new_tokens: int = 64  # tokens per sampled completion
    temperature: float = 1.0  # rollout sampling temperature
    top_k: int = 0  # rollout top-k; 0: off
    top_p: float = 1.0  # rollout nucleus sampling; 1: off
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])  # built-in names, model, module:function
    reward_weights: list[float] = field(default_factory=list)  # empty: 1.0 each
    reward_model: str = ""  # checkpoint of `lmforge rm` (or a stage name) for the "model" reward
    # grpo (per-sequence mean) | dr_grpo (fixed length) | dapo (per token)
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    # group (divide by the group's std) | none | auto (none for dr_grpo)
    scale_rewards: Literal["auto", "group", "none"] = "auto"
    epsilon_low: float = 0.2  # lower clip of the probability ratio
    epsilon_high: float = 0.2  # upper clip of the probability ratio
    beta: float = 0.0  # KL weight (k3 estimator) to the initial policy; 0: no reference model kept
    mask_truncated: bool = False  # completions that hit max_new_tokens get no loss
    iterations: int = 1  # optimizer steps per batch of rollouts (>1 makes the ratio clipping bite)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: StageTrain = field(default_factory=StageTrain)


@dataclass
class Seq2SeqConfig:
    """Sequence-to-sequence fine-tuning of a t5 model on {"source","target"} (or {"input","output"}) JSONL."""

    data: list[str] = field(default_factory=list)  # .jsonl / .json files of {"source","target"} records
    val_data: list[str] = field(default_factory=list)  # empty: hold out val_fraction of data
    val_fraction: float = 0.0  # fraction of data held out when val_data is empty
    # checkpoint, a stage name of this run, "": latest pretrain; "scratch": a fresh model.* with the run's tokenizer
    init_from: str = ""
    source_len: int = 0  # source tokens kept per example (0: train.seq_len)
    target_len: int = 0  # target tokens kept per example, the end token included (0: train.seq_len)
    train: StageTrain = field(default_factory=StageTrain)


@dataclass
class DemoConfig:
    """The built-in arithmetic task (lmforge.data.demo); its seed is its own so runs share one test set."""

    seed: int = 0  # seed of the task's problems
    max_digits: int = 2  # operands up to this many digits
    n_train: int = 4000  # problems in each of the SFT, DPO and GRPO sets
    n_sft: int = 0  # SFT demonstrations kept of those (0: all n_train); the DPO and GRPO sets stay whole
    n_test: int = 500  # held-out test problems
    n_pretrain: int = 40000  # lines of arithmetic text for the demo's pretraining corpus


@dataclass
class Config:
    run_dir: str = "runs/default"  # the run directory every stage reads and writes
    seed: int = 1337  # seeds weights, data order and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    stages: list[str] = field(default_factory=list)  # for `lmforge run`
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    span: SpanConfig = field(default_factory=SpanConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(name: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`, converting where it is unambiguous."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        last: Exception | None = None
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{key}: bad value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            shown = ", ".join(repr(a) if a == "" else str(a) for a in allowed)
            hint = _suggest(str(value), [str(a) for a in allowed])
            raise ConfigError(f"{key}: {value!r} is not one of {shown}{hint}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # "a,b" on the command line
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Merge a nested mapping into dataclass `obj`, checking every key and type."""
    hints = typing.get_type_hints(type(obj))
    fields = _fields(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown key '{key}'{_suggest(name, list(fields), prefix)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            _apply(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, tp, key))


def set_key(cfg: Any, dotted: str, raw: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 1e-3, true, [a, b] work)."""
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        fields = _fields(type(obj))
        key = ".".join(parts[: i + 1])
        if part not in fields:
            pre = ".".join(parts[:i]) + "." if i else ""
            raise ConfigError(f"unknown key '{key}'{_suggest(part, list(fields), pre)}")
        if i < len(parts) - 1:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"'{key}' is not a section")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    tp = typing.get_type_hints(type(obj))[parts[-1]]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"'{dotted}' is a section; set one of its keys, e.g. {dotted}.<key>=...")
    if tp is str and not isinstance(value, str):
        value = raw  # keep "0123" or "1e3" as typed when a string is wanted
    setattr(obj, parts[-1], _coerce(value, tp, dotted))


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Build a Config from defaults, an optional YAML recipe, then `key=value` overrides."""
    data: dict = {}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    pairs = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        k, v = item.split("=", 1)
        pairs.append((k.strip(), v.strip()))

    def build(start: Config) -> Config:
        if recipe:
            try:
                _apply(start, data)
            except ConfigError as e:
                raise ConfigError(f"{recipe}: {e}") from None
        for k, v in pairs:
            set_key(start, k, v)
        return start

    # Two passes: the first finds the model preset/arch the user asked for, the second applies
    # that preset's values first so that every explicit key (recipe or command line) wins over it.
    first = build(copy.deepcopy(base) if base is not None else Config())
    cfg = copy.deepcopy(base) if base is not None else Config()
    from lmforge.model.presets import ARCH_DEFAULTS, preset_values

    implied = preset_values(first.model.preset) if first.model.preset else {}
    arch = implied.get("arch", first.model.arch)
    if arch in ARCH_DEFAULTS:
        implied = {**ARCH_DEFAULTS[arch], **implied}
    for k, v in implied.items():
        setattr(cfg.model, k, v)
    cfg = build(cfg)
    try:
        validate(cfg)
    except ConfigError as e:  # a value the recipe set (and the command line did not): name the file
        if recipe and e.key and e.key not in dict(pairs) and _has_key(data, e.key):
            raise ConfigError(f"{recipe}: {e}", e.key) from None
        raise
    return cfg


def _has_key(data: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


# --- range and cross-field checks ----------------------------------------------------------------
# Each rule is (test, what the value must be). They run when the config loads, so a bad value stops
# in the first second with the key named, not after the data and model are loaded, and never
# trains: a negative max_steps used to exit 0 with no checkpoint, n_embd=0 crashed in the loss.
_POS = (lambda v: v > 0, "positive")
_NONNEG = (lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
_UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
_PROB = (lambda v: 0 < v <= 1, "in (0, 1]")

RULES: dict[type, dict[str, tuple]] = {
    TokenizerConfig: {"min_frequency": _NONNEG, "max_train_bytes": _NONNEG},
    DataConfig: {"val_fraction": _FRACTION, "workers": _NONNEG, "shard_tokens": _POS},
    ModelConfig: {"vocab_size": _NONNEG, "pad_vocab_to": _NONNEG, "n_layer": _POS, "n_embd": _POS, "n_head": _POS,
                  "n_kv_head": _NONNEG, "head_dim": _NONNEG, "ffn_dim": _NONNEG, "norm_eps": _POS,
                  "rope_theta": _POS, "max_seq_len": _POS, "logit_softcap": _NONNEG, "init_std": _POS,
                  "dropout": _FRACTION, "kv_lora_rank": _NONNEG, "q_lora_rank": _NONNEG,
                  "qk_rope_head_dim": _NONNEG, "qk_nope_head_dim": _NONNEG, "v_head_dim": _NONNEG,
                  "n_decoder_layer": _NONNEG, "relative_buckets": (lambda v: v >= 4, ">= 4"),
                  "relative_max_distance": _POS, "decoder_start_id": (lambda v: v >= -1, ">= -1")},
    TrainConfig: {"seq_len": _POS, "micro_batch": _POS, "batch_tokens": _NONNEG,
                  "max_minutes": _NONNEG, "lr": _POS, "min_lr_ratio": _UNIT, "warmup_steps": _NONNEG,
                  "decay_fraction": _UNIT, "weight_decay": _NONNEG, "beta1": _FRACTION, "beta2": _FRACTION,
                  "eps": _POS, "muon_lr": _POS, "muon_momentum": _FRACTION, "grad_clip": _NONNEG,
                  "loss_chunk": _NONNEG, "eval_every": _NONNEG, "eval_batches": _AT_LEAST_1,
                  "sample_every": _NONNEG, "save_every": _NONNEG, "keep_last": _NONNEG, "log_every": _AT_LEAST_1},
    ParallelConfig: {"dp_replicate": _AT_LEAST_1, "dp_shard": (lambda v: v == -1 or v >= 1, "-1 or at least 1"),
                     "tp": _AT_LEAST_1, "pp": _AT_LEAST_1, "pp_microbatches": _NONNEG, "cp": _AT_LEAST_1},
    EvalConfig: {"max_batches": _NONNEG, "batch_size": _POS, "seq_len": _NONNEG},
    GenerateConfig: {"max_new_tokens": _NONNEG, "temperature": _NONNEG, "top_k": _NONNEG, "top_p": _PROB,
                     "repetition_penalty": _POS},
    MoEConfig: {"experts": _NONNEG, "top_k": _AT_LEAST_1, "shared_experts": _NONNEG, "expert_dim": _NONNEG,
                "first_dense_layers": _NONNEG, "aux_coef": _NONNEG, "bias_update_rate": _NONNEG, "z_loss": _NONNEG},
    LoRAConfig: {"r": _POS, "alpha": _POS, "dropout": _FRACTION},
    SFTConfig: {"val_fraction": _FRACTION},
    DPOConfig: {"val_fraction": _FRACTION, "beta": _POS, "sft_coef": _NONNEG},
    RMConfig: {"val_fraction": _FRACTION, "center_coef": _NONNEG},
    # group_size >= 2: advantages compare a prompt's completions; temperature 0 would make them all equal
    GRPOConfig: {"group_size": (lambda v: v >= 2, ">= 2 (advantages compare a prompt's completions)"),
                 "max_new_tokens": _POS, "temperature": (lambda v: v > 0, "positive (rollouts are sampled)"),
                 "top_k": _NONNEG, "top_p": _PROB, "epsilon_low": _NONNEG, "epsilon_high": _NONNEG,
                 "beta": _NONNEG, "iterations": _AT_LEAST_1},
    SpanConfig: {"noise_density": (lambda v: 0 < v < 1, "in (0, 1)"), "mean_span": (lambda v: v >= 1, ">= 1"),
                 "sentinels": _AT_LEAST_1},
    Seq2SeqConfig: {"val_fraction": _FRACTION, "source_len": _NONNEG, "target_len": _NONNEG},
    DemoConfig: {"max_digits": _AT_LEAST_1, "n_train": _NONNEG, "n_sft": _NONNEG, "n_test": _NONNEG,
                 "n_pretrain": _NONNEG},
}
POST_STAGES = ("sft", "dpo", "rm", "grpo", "seq2seq")


def _check_ranges(obj: Any, key: Callable[[str], str]) -> None:
    """Apply RULES to one section; key(field) is the dotted name the user wrote."""
    for name, (ok, want) in RULES.get(type(obj), {}).items():
        value = getattr(obj, name)
        if not ok(value):
            raise ConfigError(f"{key(name)} must be {want}, got {value!r}", key(name))


def check_model(m: ModelConfig, prefix: str = "model.") -> None:
    """The model section's ranges and the shape rules the attention needs."""
    _check_ranges(m, lambda k: prefix + k)
    if m.arch == "t5":
        _check_t5(m, prefix)
        return
    for key, value in (("pos", "relative"), ("mlp", "gated-gelu")):
        if getattr(m, key) == value:
            raise ConfigError(f"{prefix}{key}={value} is T5's; it needs {prefix}arch=t5", prefix + key)
    if m.attention == "mla":
        _check_mla(m, prefix)
        return
    mla_keys = [k for k in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
                if getattr(m, k)]
    if mla_keys:
        raise ConfigError(f"{prefix}{mla_keys[0]}={getattr(m, mla_keys[0])} is a multi-head latent attention "
                          f"setting; it needs {prefix}attention=mla", prefix + mla_keys[0])
    if not m.head_dim and m.n_embd % m.n_head:
        raise ConfigError(f"{prefix}n_embd={m.n_embd} is not divisible by {prefix}n_head={m.n_head}: each head gets "
                          f"n_embd / n_head dimensions (or set {prefix}head_dim)", prefix + "n_embd")
    n_kv = m.n_kv_head or m.n_head
    if m.n_head % n_kv:
        raise ConfigError(f"{prefix}n_head={m.n_head} is not divisible by {prefix}n_kv_head={n_kv}: each key/value "
                          f"head serves the same number of query heads (set {prefix}n_kv_head to a divisor of "
                          "n_head, or 0 for one per query head)", prefix + "n_kv_head")
    width = m.head_dim or m.n_embd // m.n_head
    if m.pos == "rope" and width % 2:
        where = f"{prefix}head_dim={m.head_dim}" if m.head_dim else \
            f"{prefix}n_embd / {prefix}n_head = {m.n_embd} / {m.n_head} = {width}"
        raise ConfigError(f"the head width must be even for RoPE, which rotates pairs of dimensions: {where}",
                          prefix + ("head_dim" if m.head_dim else "n_embd"))
    _check_window(m, prefix)
    _check_moe(m, prefix)


def _check_t5(m: ModelConfig, prefix: str) -> None:
    """What the encoder-decoder (model/t5.py) is built of; every other block choice is refused by name."""
    want = {"pos": "relative", "mlp": "gated-gelu", "norm": "rmsnorm", "attention": "mha"}
    for key, value in want.items():
        if getattr(m, key) != value:
            raise ConfigError(f"{prefix}{key}={getattr(m, key)} with {prefix}arch=t5: T5 v1.1 has {key}={value}",
                              prefix + key)
    for key in ("qk_norm", "bias", "attn_qkv_bias", "logit_softcap", "sliding_window", "sparse_block",
                "zero_init_out"):
        if getattr(m, key):
            raise ConfigError(f"{prefix}{key}={getattr(m, key)} with {prefix}arch=t5: not part of T5; unset it",
                              prefix + key)
    if (m.n_kv_head or m.n_head) != m.n_head:
        raise ConfigError(f"{prefix}n_kv_head={m.n_kv_head} with {prefix}arch=t5: T5 has one key/value head per "
                          "query head; set 0", prefix + "n_kv_head")
    if m.moe.experts:
        raise ConfigError(f"{prefix}moe.experts={m.moe.experts} with {prefix}arch=t5: T5's MLPs are dense; set 0",
                          prefix + "moe.experts")
    if not m.head_dim and m.n_embd % m.n_head:
        raise ConfigError(f"{prefix}n_embd={m.n_embd} is not divisible by {prefix}n_head={m.n_head} (or set "
                          f"{prefix}head_dim)", prefix + "n_embd")


def _check_window(m: ModelConfig, prefix: str) -> None:
    """sliding_window, the block-sparse keys and window_pattern (model/window.py, model/masks.py): each local
    kind needs its layers, and each letter its setting."""
    w, pattern, block = m.sliding_window, m.window_pattern, m.sparse_block
    for key in ("sliding_window", "sparse_block", "sparse_local", "sparse_global", "sparse_stride"):
        if getattr(m, key) < 0:
            raise ConfigError(f"{prefix}{key} must be >= 0, got {getattr(m, key)}", prefix + key)
    if set(pattern) - {"S", "B", "L"}:
        raise ConfigError(f"{prefix}window_pattern={pattern!r} may hold only S (sliding window), B (block-sparse) "
                          "and L (global) letters, e.g. SSSL", prefix + "window_pattern")
    if "S" in pattern and not w:
        raise ConfigError(f"{prefix}window_pattern={pattern} needs {prefix}sliding_window > 0, the S layers' "
                          "window", prefix + "window_pattern")
    if "B" in pattern and not block:
        raise ConfigError(f"{prefix}window_pattern={pattern} needs {prefix}sparse_block > 0, the B layers' block "
                          "size in tokens", prefix + "window_pattern")
    if w and block and not pattern:
        raise ConfigError(f"{prefix}sliding_window and {prefix}sparse_block are both set: say which layers take "
                          f"which in {prefix}window_pattern (S, B, L letters)", prefix + "window_pattern")
    kinds = ((pattern or ("S" if w else "B")) * m.n_layer)[:m.n_layer]
    if w and "S" not in kinds:
        raise ConfigError(f"{prefix}window_pattern={pattern} gives none of the {m.n_layer} layers a window (no S); "
                          f"set {prefix}sliding_window=0 for full attention", prefix + "window_pattern")
    if block and "B" not in kinds:
        raise ConfigError(f"{prefix}window_pattern={pattern} makes none of the {m.n_layer} layers block-sparse "
                          f"(no B); set {prefix}sparse_block=0", prefix + "window_pattern")


def _check_mla(m: ModelConfig, prefix: str) -> None:
    """What multi-head latent attention needs; the derived widths are model/mla.py's mla_dims."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{prefix}{key}={getattr(m, key)} with {prefix}attention=mla: {why}", prefix + key)

    derived = [k for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim") if not getattr(m, k)]
    if derived and m.n_embd % m.n_head:
        raise ConfigError(f"{prefix}n_embd={m.n_embd} is not divisible by {prefix}n_head={m.n_head}, so "
                          f"{prefix}{derived[0]}=0 cannot be derived from the head width; set it", prefix + derived[0])
    rope = m.qk_rope_head_dim or (m.n_embd // m.n_head) // 2
    if rope % 2 or rope == 0:
        key = "qk_rope_head_dim"
        what = f"{prefix}{key}={m.qk_rope_head_dim}" if m.qk_rope_head_dim else \
            f"{prefix}{key}=0 derives n_embd / n_head / 2 = {rope}"
        raise ConfigError(f"{what}: the RoPE width must be even and positive (RoPE rotates pairs of dimensions)",
                          prefix + key)
    if m.pos != "rope":
        raise bad("pos", "MLA carries positions in its RoPE part (model.qk_rope_head_dim); use model.pos=rope")
    if (m.n_kv_head or m.n_head) != m.n_head:
        raise bad("n_kv_head", "every head reads the one shared latent, there are no key/value heads; set 0")
    if m.head_dim:
        raise bad("head_dim", "MLA's widths are model.qk_nope_head_dim, qk_rope_head_dim and v_head_dim; set 0")
    for key in ("qk_norm", "bias", "attn_qkv_bias"):
        if getattr(m, key):
            raise bad(key, "not part of DeepSeek's MLA (its latents have their own RMSNorms, and no biases)")
    for key in ("sliding_window", "sparse_block"):
        if getattr(m, key):
            raise bad(key, "local windows and block-sparse layers are built for multi-head attention only; set 0")


def _check_moe(m: ModelConfig, prefix: str) -> None:
    e, key = m.moe, lambda k: f"{prefix}moe.{k}"
    _check_ranges(e, key)
    if not e.experts:
        return
    if e.top_k > e.experts:
        raise ConfigError(f"{key('top_k')}={e.top_k} is more than {key('experts')}={e.experts}", key("top_k"))
    if e.first_dense_layers >= m.n_layer:
        raise ConfigError(f"{key('first_dense_layers')}={e.first_dense_layers} leaves no MoE layer of the "
                          f"{m.n_layer} ({prefix}n_layer); set it below n_layer, or {key('experts')}=0 for a dense "
                          "model", key("first_dense_layers"))
    if m.mlp != "swiglu":
        raise ConfigError(f"{prefix}mlp={m.mlp} with {key('experts')}={e.experts}: experts are SwiGLU MLPs",
                          prefix + "mlp")
    if m.bias:
        raise ConfigError(f"{prefix}bias=true with {key('experts')}={e.experts}: experts have no biases",
                          prefix + "bias")
    if e.router == "sigmoid" and not e.norm_topk_prob:
        raise ConfigError(f"{key('norm_topk_prob')}=false with {key('router')}=sigmoid: sigmoid scores are always "
                          "normalised over the chosen experts (DeepSeek-V3)", key("norm_topk_prob"))


def _check_train(t: TrainConfig, key: Callable[[str], str]) -> None:
    _check_ranges(t, key)
    if t.max_steps < 0 or (t.max_steps == 0 and t.max_minutes <= 0):
        raise ConfigError(f"{key('max_steps')} must be positive (0 only with {key('max_minutes')}, a time budget), "
                          f"got {t.max_steps}", key("max_steps"))
    per_micro = t.micro_batch * t.seq_len
    if t.batch_tokens % per_micro:
        raise ConfigError(f"{key('batch_tokens')}={t.batch_tokens} is not a multiple of {key('micro_batch')} * "
                          f"{key('seq_len')} = {per_micro}: a step is a whole number of micro-batches",
                          key("batch_tokens"))


def stage_train(cfg: Config, name: str) -> TrainConfig:
    """The `train` section a post-training stage runs with: `train`, with its `<name>.train` keys applied."""
    out = copy.deepcopy(cfg.train)
    for f in dataclasses.fields(StageTrain):
        value = getattr(getattr(cfg, name).train, f.name)
        if value is not None:
            setattr(out, f.name, value)
    return out


def validate(cfg: Config) -> None:
    """Ranges and cross-field checks that types alone cannot express (RULES, shapes, batch sizes)."""
    for section in ("tokenizer", "data", "parallel", "eval", "generate", "demo", "span", *POST_STAGES):
        _check_ranges(getattr(cfg, section), lambda k, s=section: f"{s}.{k}")
    check_model(cfg.model)
    _check_train(cfg.train, lambda k: f"train.{k}")
    for stage in POST_STAGES:
        sc = getattr(cfg, stage)
        if hasattr(sc, "lora"):
            _check_ranges(sc.lora, lambda k, s=stage: f"{s}.lora.{k}")
        own = sc.train
        if any(getattr(own, f.name) is not None for f in dataclasses.fields(own)):
            _check_train(stage_train(cfg, stage),
                         lambda k, s=stage, own=own: f"{s}.train.{k}" if getattr(own, k) is not None else f"train.{k}")
    g = cfg.grpo
    if g.reward_weights and len(g.reward_weights) != len(g.rewards):
        raise ConfigError(f"grpo.reward_weights has {len(g.reward_weights)} values for {len(g.rewards)} grpo.rewards",
                          "grpo.reward_weights")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    from lmforge.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def section_from_dict(cls: type, data: dict, file: str | Path | None = None, prefix: str = "") -> Any:
    """Rebuild one section (e.g. ModelConfig from a checkpoint), ignoring keys a newer version dropped.

    Errors name `file` and the key as `prefix` + name (e.g. "ckpt/config.json: lmforge.n_layer: ..."), so a
    hand-edited or damaged file is pointed at; a ModelConfig also gets the shape checks a recipe gets.
    """
    where = f"{file}: " if file else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'the section'} must be a mapping of keys, "
                          f"got {type(data).__name__}")
    obj = cls()
    known = {k: v for k, v in data.items() if k in _fields(cls)}
    try:
        _apply(obj, known, prefix)
        if cls is ModelConfig:
            check_model(obj, prefix)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}", e.key) from None
    return obj


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: the comment at the end of its definition, else the comment lines above it.

    Read from the source of the dataclass, so `--help` shows what the schema says and cannot drift from it.
    """
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # a generated class (StageTrain) or no source shipped
        return {}
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    lines = src.splitlines()
    docs: dict[str, str] = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        if trailing or above:
            docs[node.target.id] = trailing[-1] if trailing else " ".join(above)
    return docs
