"""The gist training loop, top to bottom.

1. Load the base model, add K gist tokens, wrap with LoRA (+ trainable gist rows only).
2. Every step takes `batch_size x grad_accum x processes` examples chosen by (seed, step) alone, so a
   resumed run sees exactly the batches a straight run would.
3. Loss: cross-entropy on answer tokens only, under the gist mask, logits kept for answer positions
   only; summed over the step's micro-batches and divided by the step's answer-token count, so
   batch 4 == batch 2 x accumulation 2. With compact or auto gist positions (`gist.positions`) each
   example is instead read chunk by chunk through compress's own `read_chunks`, with gradients
   (with `train.grad_chunks: answer`, only through the chunks that hold the answer: long documents).
   With `train.reader: full` the question reads the whole document instead (no gists: the trained ceiling);
   with `train.distill` the loss adds KL(teacher || student) on the answer tokens (gistctl.train.objectives).
4. AdamW (LoRA lr, gist-row lr), warmup + cosine, gradient clipping, bf16 autocast where bf16 is native.
5. Log to `metrics.jsonl`; evaluate from the compressed KV; checkpoint `step-%06d/`, `best/`, `final/`;
   with `stop_at_eval`, finish as soon as an evaluation reaches it (a curriculum phase that has learned);
   with `stop_at_step`, finish at that step of a schedule that spans `max_steps`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gistctl.config import GistctlConfig
from gistctl.data.schema import COPIED_TASKS
from gistctl.errors import ConfigError, GistctlError
from gistctl.gist.collate import IGNORE_INDEX, GistCollator, collate_encoded
from gistctl.gist.forward import batch_answer_logits, chunked_answer_logits, logits_loss_sum
from gistctl.gist.model import GistModel
from gistctl.train.lora import GIST_ROWS_KEY, wrap_with_lora
from gistctl.gist.tokens import add_gist_tokens
from gistctl.gist.positions import CHUNKED_LAYOUTS
from gistctl.models import bf16_is_native, load_model, peak_memory_bytes
from gistctl.train.checkpoint import latest_checkpoint, prune_step_checkpoints, rng_state, save_checkpoint, set_rng_state
from gistctl.train.state import load_training_state
from gistctl.train.evaluate import evaluate_from_blobs, evaluate_full_context
from gistctl.train.objectives import FULL, FullExample, Teacher, encode_full, full_answer_logits, kl_sum

KEEP_STEP_CHECKPOINTS = 2


class TrainingError(GistctlError):
    """Training could not go on (NaN loss, a failed overfit check)."""


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    last_loss: float
    losses: list[float] = field(default_factory=list)
    best_eval: float | None = None


def file_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_examples(path: str | Path) -> list[dict]:
    from gistctl.data.schema import read_jsonl

    return read_jsonl(path)


def example_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices `start .. start+count` of an endless stream of seeded per-epoch permutations of range(n)."""
    out, cache = [], {}
    for i in range(start, start + count):
        epoch = i // n
        if epoch not in cache:
            order = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            cache[epoch] = order
        out.append(cache[epoch][i % n])
    return out


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def answer_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over answer tokens, computing logits only for the answer positions."""
    return logits_loss_sum(batch_answer_logits(model, batch))


def micro_batch_counts(batch, pad_id: int) -> tuple[int, int]:
    """(answer tokens, tokens read) of a collated batch, or of a list of encoded examples (compact layout, or
    the full reader's `FullExample`s)."""
    if isinstance(batch, list):
        return (sum(e.answer if isinstance(e, FullExample) else e.layout.answer for e in batch),
                sum(len(e.input_ids) for e in batch))
    return int((batch["labels"] != IGNORE_INDEX).sum()), int((batch["input_ids"] != pad_id).sum())


def train(config: GistctlConfig, run_dir: str | Path, *, resume: bool = False, stop_after: int | None = None,
          overfit_steps: int | None = None, overfit_threshold: float = 0.1,
          on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a gist adapter into `run_dir`. `stop_after`: leave after that many steps of this sitting
    (checkpointing first) so the run can be resumed. `overfit_steps`: train on one batch and raise
    TrainingError unless the loss falls below `overfit_threshold`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = config.train
    if cfg.data is None:
        raise ConfigError("train.data is not set: pass --data train.jsonl (build one with `gistctl data`)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=(config.model.device == "cpu") or not torch.cuda.is_available())
    set_seed(cfg.seed)
    loaded = load_model(config.model.name, device=str(accelerator.device), dtype=config.model.dtype or "fp32",
                        load_in_4bit=config.model.load_in_4bit,
                        attn_implementation=config.model.attn_implementation)
    gist_ids = add_gist_tokens(loaded.model, loaded.tokenizer, config.gist.num_gist)
    if config.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        loaded.model = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
    model = wrap_with_lora(loaded.model, gist_ids, config.lora)
    if cfg.init_adapter:
        _load_adapter_weights(model, cfg.init_adapter, len(gist_ids))
    full_reader = cfg.reader == FULL
    teacher = None
    if cfg.distill:
        teacher = Teacher(cfg.teacher, model, loaded, model_name=config.model.name, device=str(accelerator.device),
                          dtype=config.model.dtype or "fp32")
    gist_params = [p for n, p in model.named_parameters() if p.requires_grad and GIST_ROWS_KEY in n]
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and GIST_ROWS_KEY not in n]
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr}, {"params": gist_params, "lr": cfg.gist_lr}],
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    examples = read_examples(cfg.data)
    eval_examples = read_examples(cfg.eval)[: cfg.eval_limit] if cfg.eval else []
    collator = GistCollator(loaded.tokenizer, gist_ids, cfg.max_length, config.gist.chunk_tokens,
                            spell_codes=cfg.spell_codes, chunking=config.gist.chunking,
                            answer_chunks_for=COPIED_TASKS if cfg.grad_chunks == "copied" else None)
    # compact / auto gist positions: each example is read chunk by chunk as compress reads it (no collated batch)
    chunked, pad_id = config.gist.positions in CHUNKED_LAYOUTS, loaded.tokenizer.pad_token_id
    answer_chunks_only = cfg.grad_chunks != "all"  # the config checked it goes with a chunked layout
    use_bf16 = cfg.bf16 and bf16_is_native(accelerator.device)  # emulated bf16 is slower than fp32
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * cfg.grad_accum * world
    data_meta = {"train": {"path": cfg.data, "sha256": file_fingerprint(cfg.data), "examples": len(examples)}}
    if cfg.eval:
        data_meta["eval"] = {"path": cfg.eval, "sha256": file_fingerprint(cfg.eval), "examples": len(eval_examples)}

    start_step, history, best = 0, [], None
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume: no complete step-NNNNNN/ checkpoint in {run_dir}")
        start_step, history, best = _restore(checkpoint, raw_model, optimizer, scheduler, data_meta)
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)

    def checkpoint_meta(step: int) -> dict:
        return {"step": step, "seed": cfg.seed, "data": data_meta, "metrics": history[-1] if history else None,
                "evals": [h for h in history if "eval" in h], "best_eval": best, "max_steps": cfg.max_steps}

    def save(name: str, step: int, with_state: bool) -> Path | None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        state = None
        if with_state:
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": rng_state(), "history": history, "best": best}
        path = save_checkpoint(run_dir / name, peft_model=raw_model, loaded=loaded, gist_ids=gist_ids,
                               chunk_tokens=config.gist.chunk_tokens, config=config.to_dict(),
                               meta=checkpoint_meta(step), training_state=state, positions=config.gist.positions,
                               chunking=config.gist.chunking, reader=cfg.reader)
        if name.startswith("step-"):
            prune_step_checkpoints(run_dir, KEEP_STEP_CHECKPOINTS)
        return path

    fixed_batch = None
    if overfit_steps:
        fixed_batch = [examples[i] for i in example_indices(len(examples), cfg.seed, 0, cfg.batch_size)]
    total_steps = overfit_steps or cfg.last_step
    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    losses: list[float] = []
    sitting_start, tokens_seen = time.perf_counter(), 0
    model.train()
    completed = start_step  # optimizer steps applied so far
    stopped_at = None  # the step whose evaluation reached cfg.stop_at_eval
    _sigterm_as_interrupt()
    try:
        for step in range(start_step, end_step):
            step_start = time.perf_counter()
            micro_batches, taught_inputs = [], []
            for micro in range(cfg.grad_accum):
                if fixed_batch is not None:
                    chosen = fixed_batch
                else:
                    first = step * per_step + (micro * world + rank) * cfg.batch_size
                    chosen = [examples[i] for i in example_indices(len(examples), cfg.seed, first, cfg.batch_size)]
                if full_reader:
                    micro_batches.append([encode_full(loaded.tokenizer, e, cfg.max_length, spell_codes=cfg.spell_codes)
                                          for e in chosen])
                else:
                    encoded = [collator.encode(e) for e in chosen]
                    micro_batches.append(encoded if chunked else collate_encoded(encoded, pad_id))
                    # what the teacher reads: the same documents, cut where the student's were
                    taught_inputs.append([encode_full(loaded.tokenizer, e, 1 << 30, spell_codes=cfg.spell_codes,
                                                      cut=x.truncated_tokens) for e, x in zip(chosen, encoded)]
                                         if teacher is not None else None)
            answer_tokens = sum(micro_batch_counts(b, pad_id)[0] for b in micro_batches)
            step_loss, step_ce, step_kl = 0.0, 0.0, 0.0
            for micro, batch in enumerate(micro_batches):
                sync = contextlib.nullcontext() if micro == len(micro_batches) - 1 else accelerator.no_sync(model)
                with sync:
                    with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        if full_reader:
                            pairs = full_answer_logits(model, batch)
                        elif chunked:
                            pairs = chunked_answer_logits(model, batch, gist_ids, config.gist.positions,
                                                          answer_chunks_only=answer_chunks_only)
                        else:
                            pairs = batch_answer_logits(model, batch)
                        ce_sum, _ = logits_loss_sum(pairs)
                        loss_sum = ce_sum
                        if teacher is not None:
                            taught = teacher.answer_logits(taught_inputs[micro])
                            kl = sum(kl_sum(t, s) for t, (s, _) in zip(taught, pairs))
                            loss_sum = ce_sum + cfg.distill * kl
                            step_kl += float(kl.detach()) / answer_tokens
                    loss = loss_sum / answer_tokens
                    accelerator.backward(loss)
                step_loss += float(loss.detach())
                step_ce += float(ce_sum.detach()) / answer_tokens
                tokens_seen += micro_batch_counts(batch, pad_id)[1]
            if not math.isfinite(step_loss):
                raise TrainingError(f"loss is {step_loss} at step {step + 1}; lower --lr or check the data")
            grad_norm = float(accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                          cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            optimizer.step()
            scheduler.step()
            completed = step + 1
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            done = step + 1
            elapsed = time.perf_counter() - sitting_start
            record = {"step": done, "loss": step_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                      "step_s": time.perf_counter() - step_start, "tokens_per_s": tokens_seen / elapsed,
                      "eta_s": elapsed / (done - start_step) * (end_step - done),
                      "peak_memory_bytes": peak_memory_bytes(accelerator.device), "bf16": use_bf16,
                      "truncated_examples": collator.examples_truncated}
            if teacher is not None:
                record["ce"], record["kl"] = step_ce, step_kl
            if grad_norm > 10:
                record["warning"] = f"grad norm {grad_norm:.1f} > 10"
            improved = False
            if eval_examples and not overfit_steps and (done % cfg.eval_every == 0 or done == cfg.last_step):
                if full_reader:
                    record["eval"] = evaluate_full_context(loaded, raw_model, eval_examples)
                else:
                    gm = GistModel(loaded, raw_model, gist_ids, config.gist.chunk_tokens,
                                   adapter_fingerprint="training", positions=config.gist.positions,
                                   chunking=config.gist.chunking)
                    record["eval"] = evaluate_from_blobs(gm, eval_examples)
                if best is None or record["eval"]["overall"] > best["overall"]:
                    best = {"step": done, "overall": record["eval"]["overall"], "per_task": record["eval"]["per_task"]}
                    improved = True
            reached = (cfg.stop_at_eval is not None and "eval" in record
                       and record["eval"]["overall"] >= cfg.stop_at_eval)
            if reached:
                record["stopped_early"] = f"eval {record['eval']['overall']:.3f} >= stop_at_eval {cfg.stop_at_eval}"
            history.append(record)
            if improved:
                save("best", done, with_state=False)
            if accelerator.is_main_process and (done % cfg.log_every == 0 or done == end_step):
                with open(run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if on_log and accelerator.is_main_process:
                on_log(record)
            if reached:
                stopped_at = done
                break
            if not overfit_steps and (done % cfg.save_every == 0 or done == end_step) and done < cfg.last_step:
                save(f"step-{done:06d}", done, with_state=True)
    except KeyboardInterrupt:
        if completed > start_step and not overfit_steps:
            save(f"step-{completed:06d}", completed, with_state=True)
        raise
    last = losses[-1] if losses else float("nan")
    if overfit_steps:
        if not losses or last > overfit_threshold:
            raise TrainingError(f"overfit check failed: loss {losses[0] if losses else float('nan'):.4f} -> "
                                f"{last:.4f} after {len(losses)} steps on one batch (threshold "
                                f"{overfit_threshold}); the model cannot learn this batch")
        final_dir = save("final", len(losses), with_state=False)  # the memorised batch, for inspection
        return TrainResult(run_dir, final_dir, len(losses), last, losses, None)
    final_dir = None
    if stopped_at is not None:
        final_dir = save("final", stopped_at, with_state=False)
        end_step = stopped_at
    elif end_step >= cfg.last_step:
        final_dir = save("final", cfg.last_step, with_state=False)
    return TrainResult(run_dir, final_dir, end_step, last, losses, best["overall"] if best else None)


def _sigterm_as_interrupt() -> None:
    """`kill` (SIGTERM) saves a checkpoint like Ctrl-C does: background runs are stopped that way."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)


def _load_adapter_weights(peft_model, adapter_dir: str | Path, num_gist: int) -> None:
    """Start from another run's adapter (same LoRA shapes): a curriculum's next phase, or a wider K.
    Modules this run adapts and the adapter did not (more `lora.target_modules`) keep PEFT's zero start.

    Same K: the weights as they are. A multiple of its K (a K sweep's warm start): each of its gist rows is
    repeated in place, gist j starting as its gist j // (K / its K), so the wider adapter starts from what
    the narrower one learned rather than from untrained gists."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from gistctl.gist.adapter import read_adapter_meta

    meta = read_adapter_meta(adapter_dir)
    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    if meta.num_gist != num_gist:
        if num_gist % meta.num_gist:
            raise ConfigError(f"train.init_adapter '{adapter_dir}' has K={meta.num_gist} gists, this run "
                              f"K={num_gist}: K must equal it or be a multiple of it")
        repeat = num_gist // meta.num_gist
        state = {key: value.repeat_interleave(repeat, dim=0) if key.endswith(GIST_ROWS_KEY) else value
                 for key, value in state.items()}
    result = set_peft_model_state_dict(peft_model, state)
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"train.init_adapter '{adapter_dir}' does not fit this LoRA config "
                          f"(unexpected {result.unexpected_keys[:3]})")


def _restore(checkpoint: Path, raw_model, optimizer, scheduler, data_meta: dict):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    meta = json.loads((checkpoint / "meta.json").read_text())
    if meta["data"]["train"]["sha256"] != data_meta["train"]["sha256"]:
        raise ConfigError(f"--resume: the training data changed since {checkpoint.name} "
                          f"({meta['data']['train']['path']}); resume with the same --data")
    set_peft_model_state_dict(raw_model, load_file(str(checkpoint / "adapter_model.safetensors")))
    state = load_training_state(checkpoint)  # safetensors + JSON: nothing is unpickled
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state["history"], state["best"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    from gistctl.runs import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in keep))
