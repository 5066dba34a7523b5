"""Where metrics go: metrics.jsonl always, TensorBoard / Weights & Biases / SwanLab when asked.

Only rank 0 writes. metrics.jsonl is appended line by line and flushed, so a crash loses at most
the line being written; after a resume, entries past the resumed step are dropped first (in
TensorBoard too) so the file reads as one clean run. Rows of log steps carry `total_steps` and
`eta_s`, so a reader of the file alone (`lmforge monitor`) can say how far the run is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.errors import LmforgeError


class MetricsSink:
    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0, tensorboard: bool = False,
                 wandb: bool = False, swanlab: bool = False, run_name: str = "", config: dict | None = None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = self.wandb = self.swanlab = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LmforgeError("train.tensorboard=true needs the tensorboard package: "
                                   "pip install 'lmforge[tensorboard]'") from None
            # purge_step drops events past the resumed step, as _truncate_after does for metrics.jsonl
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise LmforgeError("train.wandb=true needs `pip install wandb`") from None
            self.wandb = wb.init(project="lmforge", name=run_name or None, config=config, resume="allow")
        if swanlab:
            try:
                import swanlab as sl
            except ImportError:
                raise LmforgeError("train.swanlab=true needs `pip install swanlab`") from None
            self.swanlab = sl.init(project="lmforge", experiment_name=run_name or None, config=config)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.swanlab is not None:
            self.swanlab.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.swanlab is not None:
            self.swanlab.finish()
