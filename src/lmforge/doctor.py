"""`lmforge doctor [recipe.yaml] [key=value ...]`: what this machine can train, and what to fix first.

Checks the environment a long run depends on — Python, torch, CUDA and the GPUs (memory, bf16),
NCCL, the C compiler the fused CPU kernels are built with, the CPU features that decide CPU speed
and bf16, the optional packages, free disk where the run writes — and whether the configured model
fits in memory at the configured batch, per GPU under the configured `parallel.*` layout
(`lmforge doctor model.preset=medium train.micro_batch=16`; under torchrun, over WORLD_SIZE).
Every line is OK, WARN or FAIL and says what to do; the exit code is 1 when something the
configuration needs has failed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lmforge.cli import CommandParser, config_from_args
from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.model.fit import HEADROOM, Layout, plan, training_memory
from lmforge.model.presets import PRESETS, preset_values
from lmforge.monitor import human_bytes

GiB = 2**30


def size(n: float) -> str:
    """Memory in GiB, or MiB below a tenth of one (a tiny model's 0.00 GiB says nothing)."""
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


@dataclass
class Check:
    status: str  # OK | WARN | FAIL
    name: str
    detail: str
    fix: str = ""  # what to do; printed under a WARN or FAIL


@dataclass
class GPU:
    name: str
    total: int  # bytes
    free: int
    capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)  # Ampere and newer multiply bf16 natively


# --- facts about the machine (small functions, so tests can stand in for other machines) -------------

def gpus() -> list[GPU]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:  # a GPU another process holds exclusively
            free, total = 0, props.total_memory
        out.append(GPU(props.name, total, free, (props.major, props.minor)))
    return out


def nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").is_file() or shutil.which("nvidia-smi") is not None


def cpu_info() -> tuple[str, set[str]]:
    """(model name, feature flags) from /proc/cpuinfo; elsewhere the platform's processor name only."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name, flags


def ram_bytes() -> tuple[int, int]:
    """(total, available) bytes of memory."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def package_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


# --- the checks -----------------------------------------------------------------------------------

def check_python() -> list[Check]:
    v = sys.version_info
    text = f"{platform.python_version()} ({sys.executable})"
    if v < (3, 10):
        return [Check("FAIL", "python", text, "lmforge needs Python 3.10 or newer")]
    return [Check("OK", "python", text)]


def check_torch(cfg: Config, found: list[GPU]) -> list[Check]:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else \
        f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else "CPU only"
    out = [Check("OK", "torch", f"{torch.__version__} ({build})")]
    wants_cuda = cfg.device.startswith("cuda")
    if found:
        for i, g in enumerate(found):
            bf16 = "bf16 yes" if g.bf16 else "bf16 no"
            line = (f"cuda:{i} {g.name}, {g.total / GiB:.1f} GiB ({g.free / GiB:.1f} free), "
                    f"compute {g.capability[0]}.{g.capability[1]}, {bf16}")
            if g.bf16:
                out.append(Check("OK", "gpu", line))
            else:
                out.append(Check("WARN", "gpu", line, "no bf16 on this GPU: train.precision=auto uses fp16 with "
                                 "loss scaling, which can overflow; lower train.lr if the loss turns NaN"))
        if gpu_index(cfg, found) is None:
            out.append(Check("FAIL", "gpu", f"device={cfg.device}, but only {len(found)} GPU(s)",
                             f"set device=cuda:0 .. cuda:{len(found) - 1}, or device=auto"))
        return out
    if torch.version.cuda is None and nvidia_driver_present():
        status = "FAIL" if wants_cuda else "WARN"
        out.append(Check(status, "gpu", "an NVIDIA driver is installed, but this torch is a CPU-only build",
                         "install a CUDA build of torch: pip install torch==2.13.0 --index-url "
                         "https://download.pytorch.org/whl/cu126 (pick the CUDA version your driver supports)"))
    elif wants_cuda:
        out.append(Check("FAIL", "gpu", f"device={cfg.device}, but torch sees no CUDA device",
                         "check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or set device=auto to train on the CPU"))
    else:
        out.append(Check("WARN", "gpu", "no CUDA GPU: training runs on the CPU",
                         "fine for quickstart and the tiny preset; from small (~125M) on, use a GPU"))
    return out


def check_distributed(found: list[GPU]) -> list[Check]:
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return [Check("WARN", "distributed", "this torch has no torch.distributed",
                      "multi-process training (torchrun) needs a torch build with distributed support")]
    if found:
        if dist.is_nccl_available():
            version = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
            return [Check("OK", "nccl", f"NCCL {version} for multi-GPU training (torchrun)")]
        status = "FAIL" if len(found) > 1 else "WARN"
        return [Check(status, "nccl", "NCCL is not available: GPUs cannot train together",
                      "install the official CUDA build of torch, which ships NCCL")]
    gloo = dist.is_gloo_available()
    return [Check("OK" if gloo else "WARN", "distributed",
                  "gloo for multi-process CPU training" if gloo else "no gloo backend",
                  "" if gloo else "multi-process CPU training needs a torch build with gloo")]


def check_compiler(cfg: Config, found: list[GPU]) -> list[Check]:
    """The C compiler the fused CPU kernels are built with (model/cpu_kernels.py), built here for real."""
    from lmforge.model import cpu_kernels

    cpu_training = not found or cfg.device == "cpu"
    status = "WARN" if cpu_training else "OK"
    out = []
    if not cpu_kernels.enabled:
        out.append(Check(status, "cpu kernels", "disabled by LMFORGE_CPU_KERNELS=0",
                         "unset LMFORGE_CPU_KERNELS: the fused kernels make CPU training faster"))
    else:
        try:
            lib = cpu_kernels._build()  # the same build the first CPU training step runs (cached)
        except Exception as e:  # noqa: BLE001 -- whatever stops the build is the answer to report
            cc = os.environ.get("CC", "cc")
            out.append(Check(status, "cpu kernels", f"cannot be built: {e}",
                             f"install a C compiler with OpenMP (Debian/Ubuntu: apt-get install gcc; or set CC, "
                             f"now {cc!r}); without it CPU training uses slower PyTorch ops"))
        else:
            out.append(Check("OK", "cpu kernels", f"fused RMSNorm/RoPE/SwiGLU/cross-entropy kernels built "
                             f"({Path(lib._name).name})"))
    if cfg.train.compile:
        if cpu_training and not (shutil.which("g++") or shutil.which("c++")):
            out.append(Check("WARN", "compile", "train.compile=true on the CPU needs a C++ compiler; none on PATH",
                             "install g++, or leave train.compile=false (it then runs eagerly)"))
        elif not cpu_training and package_version("triton") is None:
            out.append(Check("WARN", "compile", "train.compile=true on a GPU needs triton; not installed",
                             "pip install triton (the CUDA builds of torch bring it)"))
    return out


def check_cpu(cfg: Config, found: list[GPU]) -> list[Check]:
    name, flags = cpu_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    total, available = ram_bytes()
    out = [Check("OK", "memory", f"{total / GiB:.1f} GiB RAM, {available / GiB:.1f} GiB available")]
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    if not x86:
        bf16 = "bf16" in flags or "svebf16" in flags
        out.append(Check("OK", "cpu", f"{name}, {cores} cores, {platform.machine()}; bf16 {'yes' if bf16 else 'no'}"))
        return out
    feats = {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags, "AVX512-BF16": "avx512_bf16" in flags,
             "AMX": "amx_bf16" in flags or "amx_tile" in flags}
    line = f"{name}, {cores} cores; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in feats.items())
    fast_bf16 = feats["AMX"] or feats["AVX512-BF16"]
    cpu_training = not found or cfg.device == "cpu"
    if not feats["AVX2"]:
        out.append(Check("WARN", "cpu", line, "no AVX2: matrix products run several times slower; train on a "
                         "newer CPU or a GPU"))
    elif cpu_training and cfg.train.precision == "bf16" and not fast_bf16:
        out.append(Check("WARN", "cpu", line, "train.precision=bf16 on a CPU without AMX/AVX512-BF16 is emulated "
                         "and slower than fp32: use train.precision=fp32 (or auto)"))
    else:
        note = "; bf16 runs natively" if fast_bf16 else "; bf16 would be emulated: fp32 is the fast choice"
        out.append(Check("OK", "cpu", line + (note if cpu_training else "")))
    return out


# (import name, what needs it, how to install, the config switches that make it required)
PACKAGES = (
    ("transformers", "loading exported folders in transformers, `lmforge import hf`", "pip install transformers"),
    ("peft", "LoRA (sft/dpo/grpo.lora.enabled=true)", "pip install 'lmforge[lora]'"),
    ("torchao", "QLoRA (lora.quantize=nf4)", "pip install 'lmforge[lora]'"),
    ("tensorboard", "train.tensorboard=true", "pip install 'lmforge[tensorboard]'"),
    ("wandb", "train.wandb=true", "pip install wandb"),
    ("swanlab", "train.swanlab=true", "pip install swanlab"),
    ("gguf", "`lmforge export gguf`", "pip install 'lmforge[gguf]'"),
    ("matplotlib", "`lmforge plot` and the quickstart's curves", "pip install matplotlib"),
)


def required_packages(cfg: Config) -> dict[str, str]:
    """Packages this configuration cannot run without -> the key that needs them."""
    need: dict[str, str] = {}
    stages = {"sft": cfg.sft, "dpo": cfg.dpo, "grpo": cfg.grpo}
    for name, section in stages.items():
        if section.lora.enabled:
            need.setdefault("peft", f"{name}.lora.enabled=true")
        if section.lora.quantize == "nf4":
            need.setdefault("torchao", f"{name}.lora.quantize=nf4")
    for key in ("tensorboard", "wandb", "swanlab"):
        if getattr(cfg.train, key):
            need[key] = f"train.{key}=true"
        for stage in ("sft", "dpo", "rm", "grpo"):
            if getattr(getattr(cfg, stage).train, key):
                need.setdefault(key, f"{stage}.train.{key}=true")
    return need


def check_packages(cfg: Config) -> list[Check]:
    need = required_packages(cfg)
    out = []
    for name, purpose, install in PACKAGES:
        version = package_version(name)
        if version is not None:
            out.append(Check("OK", name, version))
        elif name in need:
            out.append(Check("FAIL", name, f"not installed, and {need[name]} needs it", install))
        else:
            out.append(Check("WARN", name, f"not installed (needed for {purpose})", install))
    return out


def model_params(cfg: Config) -> tuple[Config, int]:
    """(cfg with model.vocab_size filled in as training would, parameter count from a meta-device model)."""
    import torch

    from lmforge.model.transformer import Transformer, padded_vocab

    cfg = replace(cfg, model=replace(cfg.model))
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = padded_vocab(tokenizer_vocab(cfg), cfg.model.pad_vocab_to)
    with torch.device("meta"):
        n = Transformer(cfg.model).num_params()
    return cfg, n


def tokenizer_vocab(cfg: Config) -> int:
    """The run's tokenizer's size if it exists already, else the one `tokenizer.vocab_size` will train."""
    import json

    path = cfg.run_path / "tokenizer" / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return len(data["model"]["vocab"]) + len(data.get("added_tokens", []))
    except (OSError, ValueError, KeyError, TypeError):
        return cfg.tokenizer.vocab_size


def check_disk(cfg: Config, n_params: int) -> list[Check]:
    where = cfg.run_path.resolve()
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return [Check("FAIL", "disk", f"cannot write to {existing} (run_dir={cfg.run_dir})",
                      "choose a run_dir on a writable disk")]
    free = shutil.disk_usage(existing).free
    opt_bytes = 8 if cfg.train.optimizer == "adamw" else 4
    per_ckpt = n_params * (4 + opt_bytes)
    need = per_ckpt * (max(cfg.train.keep_last, 1) + 1)  # kept ones plus the one being written
    at = str(existing) if existing == where else f"{existing} (where {cfg.run_dir} will be created)"
    detail = (f"{human_bytes(free)} free at {at}; checkpoints need about {human_bytes(need)} "
              f"({max(cfg.train.keep_last, 1)} kept + 1 being written, {human_bytes(per_ckpt)} each)")
    if free < need:
        return [Check("FAIL", "disk", detail, "free some space, lower train.keep_last, or choose a run_dir on "
                      "a larger disk")]
    if free < 2 * need:
        return [Check("WARN", "disk", detail, "little room left for data shards and exports")]
    return [Check("OK", "disk", detail)]


def gpu_index(cfg: Config, found: list[GPU]) -> int | None:
    """The GPU `device` names (0 for auto/cuda); None if it names one that is not there."""
    if ":" not in cfg.device:
        return 0
    try:
        i = int(cfg.device.split(":", 1)[1])
    except ValueError:
        return None
    return i if 0 <= i < len(found) else None


def precision_for(cfg: Config, gpu: GPU | None) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if gpu is None:
        return "fp32"
    return "bf16" if gpu.bf16 else "fp16"


def check_fit(cfg: Config, n_params: int, found: list[GPU]) -> list[Check]:
    """Does the model train at this micro_batch x seq_len, per GPU under the configured layout?

    The layout is `parallel.*` over WORLD_SIZE processes (under torchrun), else over the processes
    the explicit sizes multiply to. If it does not fit, the nearest settings that do.
    """
    m, t = cfg.model, cfg.train
    if t.seq_len > m.max_seq_len:
        return [Check("FAIL", "fit", f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}",
                      f"set train.seq_len={m.max_seq_len} or lower, or raise model.max_seq_len")]
    try:
        layout = Layout.from_config(cfg.parallel, t.activation_checkpointing, int(os.environ.get("WORLD_SIZE", 0)))
    except LmforgeError as e:
        return [Check("FAIL", "fit", str(e), "make the parallel sizes multiply to the number of processes")]
    on_gpu = bool(found) and cfg.device != "cpu"
    gpu = found[gpu_index(cfg, found) or 0] if on_gpu else None  # a device that is not there: as cuda:0
    capacity = gpu.total if gpu else ram_bytes()[1]
    where = f"{gpu.name} ({capacity / GiB:.1f} GiB)" if gpu else f"available RAM ({capacity / GiB:.1f} GiB)"
    fit = Fit(cfg, precision_for(cfg, gpu), capacity, layout)
    mem = fit.need(m, t.micro_batch, t.activation_checkpointing, t.optimizer)
    shape = f"{m.n_layer} layers x {m.n_embd}"
    name = f"{m.preset} ({shape})" if m.preset else shape
    parts = ", ".join(f"{k} {size(v)}" for k, v in mem.items() if k not in ("total", "host") and v)
    per = f" per GPU under {layout.name} ({layout.world} processes)" if layout.world > 1 else ""
    host = f", and {size(mem['host'])} of host memory for the offloaded state" if mem["host"] else ""
    detail = (f"{name}, {n_params / 1e6:.1f}M parameters, at micro_batch {t.micro_batch} x seq_len {t.seq_len}, "
              f"{fit.precision}: needs about {size(mem['total'])}{per} ({parts}) of {where}{host}")
    if mem["total"] <= 0.75 * capacity:
        return [Check("OK", "fit", detail)]
    if mem["total"] <= fit.usable:
        return [Check("WARN", "fit", detail, "tight: other processes or longer sequences may run out of memory; "
                      "train.activation_checkpointing=true leaves headroom")]
    fixes = fit.suggestions(n_params)
    if not fixes:
        floor = fit.need(m, 1, True, t.optimizer)
        state = (floor["weights"] + floor["grads"] + floor["optimizer"]) / GiB
        fixes = [f"even micro_batch 1 with activation checkpointing needs {floor['total'] / GiB:.1f} GiB (weights, "
                 f"gradients and optimizer state alone {state:.1f} GiB): a machine with more memory, or a much "
                 "smaller model"]
    return [Check("FAIL", "fit", detail, "; or ".join(fixes))]


@dataclass
class Fit:
    """Training memory of variations of one config on one layout, and the nearest variations that fit."""

    cfg: Config
    precision: str
    capacity: float  # bytes of one GPU (or of available RAM)
    layout: Layout = Layout()

    @property
    def usable(self) -> float:
        return HEADROOM * self.capacity  # the rest: CUDA context, NCCL buffers, fragmentation

    def need(self, model_cfg, batch: int, ac: bool, optimizer: str) -> dict:
        layout = replace(self.layout, activation_checkpointing=ac)
        return training_memory(model_cfg, batch, self.cfg.train.seq_len, self.precision, optimizer, layout,
                               self.cfg.train.loss_chunk)

    def fits(self, *args) -> bool:
        return self.need(*args)["total"] <= self.usable

    def largest_batch(self, model_cfg, ac: bool, optimizer: str) -> int:
        """The largest power-of-two fraction of micro_batch that fits; 0 if not even 1 does."""
        batch = self.cfg.train.micro_batch
        while batch >= 1 and not self.fits(model_cfg, batch, ac, optimizer):
            batch //= 2
        return batch

    def suggestions(self, n_params: int) -> list[str]:
        """Activation checkpointing; a smaller micro-batch (the global batch kept by accumulation); Muon's
        smaller optimizer state; on several GPUs the planner's layout; a smaller preset: the first of each
        that fits, as key=value to paste."""
        t, m = self.cfg.train, self.cfg.model
        gib = lambda *args: f"{self.need(*args)['total'] / GiB:.1f} GiB"  # noqa: E731
        out = []
        if not t.activation_checkpointing and self.fits(m, t.micro_batch, True, t.optimizer):
            out.append(f"train.activation_checkpointing=true ({gib(m, t.micro_batch, True, t.optimizer)}, "
                       "~30% more compute)")
        keep = f"train.batch_tokens={t.batch_tokens or t.micro_batch * t.seq_len * self.data_parallel}"
        for ac in dict.fromkeys((t.activation_checkpointing, True)):
            batch = self.largest_batch(m, ac, t.optimizer)
            if 0 < batch < t.micro_batch:
                flag = " train.activation_checkpointing=true" if ac and not t.activation_checkpointing else ""
                out.append(f"train.micro_batch={batch}{flag} {keep} ({gib(m, batch, ac, t.optimizer)}; "
                           "the same global batch by gradient accumulation)")
                break
        if t.optimizer == "adamw" and self.fits(m, t.micro_batch, t.activation_checkpointing, "muon"):
            out.append(f"train.optimizer=muon (one state buffer per matrix instead of two: "
                       f"{gib(m, t.micro_batch, t.activation_checkpointing, 'muon')})")
        out += self.layout_suggestion()
        return out + self.smaller_preset(n_params, keep)

    @property
    def data_parallel(self) -> int:
        return self.layout.dp_replicate * self.layout.dp_shard

    def layout_suggestion(self) -> list[str]:
        """On more than one process: the planner's layout for as many GPUs, unless it is this one (with or
        without the activation checkpointing suggested already)."""
        if self.layout.world == 1:
            return []
        t = self.cfg.train
        best = plan(self.cfg.model, self.layout.world, int(self.capacity), t.micro_batch, t.seq_len,
                    self.precision, t.optimizer, t.loss_chunk).best
        if best is None or best.layout.sizes == self.layout.sizes:
            return []
        return [f"{' '.join(best.layout.keys())} ({best.layout.name}: {best.memory['total'] / GiB:.1f} GiB per GPU)"]

    def smaller_preset(self, n_params: int, keep: str) -> list[str]:
        t, m = self.cfg.train, self.cfg.model
        smaller = sorted(((_preset_params(self.cfg, name), name) for name, values in PRESETS.items()
                          if values.get("arch", "llama") == m.arch
                          and values.get("attention", "mha") == m.attention), reverse=True)
        for n, name in smaller:
            if n >= n_params:
                continue
            pm = _preset_config(self.cfg, name)
            for ac in dict.fromkeys((t.activation_checkpointing, True)):
                batch = self.largest_batch(pm, ac, t.optimizer)
                if batch:
                    extra = "" if batch == t.micro_batch else f" train.micro_batch={batch} {keep}"
                    extra += " train.activation_checkpointing=true" if ac and not t.activation_checkpointing else ""
                    total = self.need(pm, batch, ac, t.optimizer)["total"] / GiB
                    return [f"model.preset={name}{extra} ({n / 1e6:.0f}M parameters, {total:.1f} GiB)"]
        return []


def _preset_config(cfg: Config, name: str):
    return replace(cfg.model, preset=name, **preset_values(name))


def _preset_params(cfg: Config, name: str) -> int:
    import torch

    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(_preset_config(cfg, name)).num_params()


def run_checks(cfg: Config) -> list[Check]:
    found = gpus()
    checks = check_python() + check_torch(cfg, found) + check_distributed(found) + check_cpu(cfg, found)
    checks += check_compiler(cfg, found) + check_packages(cfg)
    sized, n_params = model_params(cfg)
    return checks + check_disk(sized, n_params) + check_fit(sized, n_params, found)


def report(checks: list[Check], console: Console) -> int:
    style = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}
    width = max(len(c.name) for c in checks)
    for c in checks:
        console.print(f"[{style[c.status]}]{c.status:<4}[/]  {c.name:<{width}}  {escape(c.detail)}")
        if c.fix and c.status != "OK":
            console.print(f"      {'':<{width}}  [dim]->[/] {escape(c.fix)}")
    fails = sum(c.status == "FAIL" for c in checks)
    warns = sum(c.status == "WARN" for c in checks)
    if fails:
        console.print(f"[bold red]{fails} failed[/], {warns} warning(s): fix the FAIL lines before a long run")
    else:
        console.print(f"[green]ready[/]: nothing failed, {warns} warning(s)")
    return 1 if fails else 0


def cmd_doctor(argv: list[str]) -> int:
    p = CommandParser("doctor", "Check this machine before a long run: Python, torch, CUDA, GPUs, NCCL, the C "
                      "compiler, CPU features, optional packages, free disk, and whether the configured model "
                      "fits (e.g. `lmforge doctor model.preset=medium train.micro_batch=16`). Exit code 1 if "
                      "something the configuration needs fails.")
    p.add_argument("items", nargs="*", metavar="[recipe.yaml] key=value",
                   help="the recipe and overrides of the run to check (run_dir=RUN checks that run's saved config)")
    cfg = config_from_args(p.parse_args(argv).items)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]lmforge doctor[/] · run_dir {escape(cfg.run_dir)}")
    return report(run_checks(cfg), console)
