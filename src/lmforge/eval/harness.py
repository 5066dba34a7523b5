"""`lmforge eval harness TASKS`: lm-evaluation-harness on an lmforge checkpoint, with no export step.

lm-eval asks a model three things; each is answered by the code lmforge's own benchmarks use, so the
adapter, `lmforge eval eval.tasks=[...]` and `lm_eval --model hf` on the exported folder agree example for
example (tests/test_harness.py):
- loglikelihood(context, continuation): `score.loglikelihoods` (lm-eval's pair encoding, shared prefixes,
  only the continuation through the head);
- loglikelihood_rolling(text): lm-eval's own rolling windows (`get_rolling_token_windows` with a
  one-token context, made disjoint), scored by `score.token_loglikelihoods`;
- generate_until(context, {until, max_gen_toks, temperature}): `score.greedy_replies`, cut at `until`.

Tasks are lm-eval's names (which download their datasets the first time) or local YAML files / folders
given with `eval.harness_include=DIR`. The model class is registered with lm-eval as "lmforge", so
`lm_eval.simple_evaluate(model="lmforge", model_args="checkpoint=RUN")` works once this module is imported.
lm-eval is an optional extra: `pip install "lmforge[eval]"`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_json, atomic_write_text

INSTALL = 'lm-evaluation-harness is not installed: pip install "lmforge[eval]" (or pip install lm-eval)'


def _lm_eval():
    try:
        import lm_eval.models  # noqa: F401 (lm-eval fills its registry lazily only while it is empty)
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise LmforgeError(INSTALL) from None
    return LM, register_model


def lm_class():
    """The lm-eval model class (built on first use, so lmforge imports without lm-eval installed)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    LM, register_model = _lm_eval()

    class LmforgeLM(LM):
        """An lmforge checkpoint as an lm-eval model (greedy generation, fp32 unless quantized)."""

        def __init__(self, checkpoint: str = "", run_dir: str = "", device: str = "cpu", batch_size: int | str = 16,
                     quantize: str = "", max_gen_toks: int = 256, model=None, tok=None, **_: object):
            super().__init__()
            if model is None:
                from lmforge.infer.loading import load_for_inference

                model, tok, _ckpt = load_for_inference(checkpoint or run_dir, device, "fp32", quantize or None,
                                                       run_dir=run_dir or checkpoint)
            self.model, self.tok = model.eval(), tok
            self.batch = int(batch_size) if str(batch_size).isdigit() else 16
            self.max_gen_toks = int(max_gen_toks)

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            from lmforge.eval.tasks.score import loglikelihoods

            return loglikelihoods(self.model, self.tok, [tuple(r.args) for r in requests], self.batch, "lm-eval")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            from lmforge.eval.tasks.score import prefix_id, token_loglikelihoods

            prefix = prefix_id(self.tok)
            max_len = self.model.cfg.max_seq_len
            items, owner = [], []
            for i, r in enumerate(requests):
                ids = self.tok.encode(r.args[0])
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, prefix, max_len, 1)):
                    items.append((tuple(ctx + cont), len(cont)))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (ll, _) in zip(owner, token_loglikelihoods(self.model, items, self.tok.eot_id, self.batch,
                                                               "lm-eval rolling")):
                totals[i] += ll
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from lmforge.eval.tasks.score import greedy_replies

            out: list[str] = []
            for r in requests:  # each request may carry its own stops and length
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = (until,) if isinstance(until, str) else tuple(until)
                n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                out += greedy_replies(self.model, self.tok, [context], n, 1, until, temperature)
            return out

    register_model("lmforge")(LmforgeLM)
    _CLASS = LmforgeLM
    return _CLASS


_CLASS = None


def run_harness(cfg, tasks: list[str]) -> dict:
    """lm-eval's simple_evaluate on the checkpoint cfg names; results JSON + the table beside the benchmarks."""
    _lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from lmforge.eval.lm import open_checkpoint, stage_label
    from lmforge.eval.suite import out_dir, refuse_encoder_decoder

    ec = cfg.eval
    model, tok, ckpt = open_checkpoint(cfg)
    refuse_encoder_decoder(model, ckpt, "lm-evaluation-harness")
    lm = lm_class()(model=model, tok=tok, batch_size=ec.batch_size, max_gen_toks=cfg.generate.max_new_tokens)
    include = ec.harness_include or None
    if include and not Path(include).exists():
        raise LmforgeError(f"eval.harness_include={include}: no such file or folder of lm-eval task YAML files")
    manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise LmforgeError(f"lm-eval does not know the task(s) {', '.join(unknown)}"
                           + ("" if include else "; local YAML tasks need eval.harness_include=DIR"))
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=ec.num_fewshot or None,
                                      task_manager=manager, limit=ec.harness_limit or None, log_samples=True,
                                      fewshot_random_seed=ec.fewshot_seed, apply_chat_template=ec.chat,
                                      bootstrap_iters=0)
    if results is None:
        raise LmforgeError("lm-eval returned no results")
    samples = results.pop("samples", {})
    keep = {k: results[k] for k in ("results", "versions", "n-shot", "n-samples", "higher_is_better") if k in results}
    keep["checkpoint"] = str(ckpt)
    keep["per_example"] = {task: [{k: v for k, v in s.items() if k in ("doc_id", "acc", "acc_norm", "exact_match")}
                                  for s in rows] for task, rows in samples.items()}
    out = out_dir(cfg, ckpt) / f"harness-{stage_label(ckpt, cfg.run_path)}-{ckpt.name}.json"
    atomic_write_json(out, json.loads(json.dumps(keep, default=str)))
    table = make_table(results)
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)
    log(f"lm-eval results -> {out} (+ .md)")
    return keep


def cmd_harness(argv: list[str]) -> int:
    from lmforge.cli import parse_config

    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        raise LmforgeError("usage: lmforge eval harness TASK[,TASK...] [eval.harness_include=DIR] [key=value ...]: "
                           "lm-evaluation-harness tasks (names, or local YAML with eval.harness_include) on a "
                           "checkpoint")
    tasks = [t.strip() for t in argv[0].split(",") if t.strip()]
    cfg = parse_config("eval", argv[1:], "lm-evaluation-harness tasks on an lmforge checkpoint, no export step.")
    run_harness(cfg, tasks)
    return 0
