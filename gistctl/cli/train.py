"""`gistctl train`: train a gist adapter (LoRA + gist rows under the gist mask)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from gistctl.cli.common import console, err_console, user_errors
from gistctl.config import load_config
from gistctl.errors import ConfigError
from gistctl.models import check_device_request
from gistctl.runs import RunDir


@user_errors
def train(
    config: Path = typer.Option(None, help="YAML config (configs/gist_25.yaml, configs/default.yaml, ...)."),
    num_gist: int = typer.Option(None, "--num-gist", "--gist", help="K: gist tokens per chunk."),
    data: Path = typer.Option(None, help="Training JSONL (from `gistctl data`)."),
    eval_data: Path = typer.Option(None, "--eval", help="Evaluation JSONL, answered from the compressed KV."),
    max_steps: int = typer.Option(None, help="Optimizer steps in total."),
    lr: float = typer.Option(None, help="LoRA learning rate."),
    gist_lr: float = typer.Option(None, help="Gist embedding rows' learning rate."),
    batch_size: int = typer.Option(None, help="Examples per micro-batch (per process)."),
    grad_accum: int = typer.Option(None, help="Micro-batches per optimizer step."),
    max_length: int = typer.Option(None, help="Longest example in tokens (only the context is truncated)."),
    chunk_tokens: int = typer.Option(None, help="Longest chunk per K gists."),
    positions: str = typer.Option(None, help="Gist position layout: sequential (one masked forward per batch), "
                                  "compact (each example read chunk by chunk, as compress reads it) or auto "
                                  "(chunk by chunk, each example in the layout compress chooses for its length)."),
    chunking: str = typer.Option(None, help="How a context longer than one chunk is split: fixed (full chunks, then "
                                 "the rest) or even (equal chunks)."),
    seed: int = typer.Option(None, help="Seed for data order and initialisation."),
    init_adapter: Path = typer.Option(None, help="Start from this adapter (a curriculum's earlier phase)."),
    reader: str = typer.Option(None, help="gist (the question reads the gists: what compress makes) or full (it "
                               "reads the whole document: the trained ceiling, for ask --method full --adapter)."),
    distill: float = typer.Option(None, help="Weight of KL(teacher || student) on answer tokens beside the "
                                  "cross-entropy (gist reader; 0 = off)."),
    teacher: str = typer.Option(None, help="Distillation teacher: base (adapter off) or a --reader full adapter."),
    model: str = typer.Option(None, help="HF model id or local directory; default: embedded SmolLM2-135M-Instruct."),
    device: str = typer.Option(None, help="cpu or cuda; default: cuda if available."),
    load_in_4bit: bool = typer.Option(None, "--load-in-4bit", help="QLoRA: 4-bit base model (CUDA + bitsandbytes)."),
    run_dir: Path = typer.Option(None, help="Run directory; default: runs/train-<time>-<id>/."),
    resume: bool = typer.Option(False, help="Continue the run in --run-dir from its latest checkpoint."),
    stop_after: int = typer.Option(None, help="Stop (with a checkpoint) after this many steps of this sitting."),
    overfit_check: int = typer.Option(None, help="Train N steps on one batch; fail unless the loss falls below "
                                                 "--overfit-threshold."),
    overfit_threshold: float = typer.Option(0.1, help="Loss the overfit check must reach."),
) -> None:
    """Train a gist adapter; checkpoints go to the run directory (step-NNNNNN/, best/, final/)."""
    from gistctl.train.curriculum import train_curriculum
    from gistctl.train.loop import train as run_training

    overrides = {"gist.num_gist": num_gist, "gist.chunk_tokens": chunk_tokens, "gist.positions": positions,
                 "gist.chunking": chunking, "train.data": data, "train.eval": eval_data, "train.max_steps": max_steps,
                 "train.lr": lr, "train.gist_lr": gist_lr, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
                 "train.max_length": max_length, "train.seed": seed, "train.init_adapter": init_adapter, "train.reader": reader,
                 "train.distill": distill, "train.teacher": teacher,
                 "model.name": model, "model.device": device, "model.load_in_4bit": load_in_4bit}
    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()}
    if resume:
        if run_dir is None or not (run_dir / "config.yaml").is_file():
            raise ConfigError("--resume needs --run-dir pointing at an earlier training run")
        settings = load_config(config or run_dir / "config.yaml", overrides)
        path = run_dir
    else:
        settings = load_config(config, overrides)
        # what can be refused now is refused before the run folder exists
        check_device_request(settings.model.device, settings.model.load_in_4bit)
        if settings.phases and overfit_check:
            raise ConfigError("--overfit-check trains one plain run; drop the config's phases")
        path = RunDir.create("train", settings.to_dict(), seed=settings.train.seed, run_dir=run_dir,
                             argv=sys.argv).path
    err_console.print(f"run directory: {path}")
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task("train", total=overfit_check or settings.total_steps(), status="loading")

        def on_log(record: dict) -> None:
            status = (f"loss {record['loss']:.4f}  gnorm {record['grad_norm']:.2f}  lr {record['lr']:.2e}  "
                      f"{record['tokens_per_s']:.0f} tok/s  {record['step_s']:.1f} s/step  "
                      f"peak {record['peak_memory_bytes'] / 2**30:.2f} GiB")
            if "phase" in record:
                status = f"{record['phase']} {record['phase_step']}  {status}"
            progress.update(task, completed=record["step"], status=status)
            if "eval" in record:
                progress.console.print(f"step {record['step']}: eval {record['eval']['overall']:.3f} "
                                       f"{record['eval']['per_task']}")
            if "warning" in record:
                progress.console.print(f"[yellow]warning:[/] step {record['step']}: {record['warning']}")

        try:
            if settings.phases:
                if overfit_check:
                    raise ConfigError("--overfit-check trains one plain run; drop the config's phases")
                result = train_curriculum(settings, path, stop_after=stop_after, on_log=on_log)
            else:
                result = run_training(settings, path, resume=resume, stop_after=stop_after,
                                      overfit_steps=overfit_check, overfit_threshold=overfit_threshold,
                                      on_log=on_log)
        except KeyboardInterrupt:
            err_console.print(f"interrupted; the last complete checkpoint is in {path}; continue with: "
                              f"gistctl train --run-dir {path} --resume", highlight=False)
            raise typer.Exit(130)
    if overfit_check:
        console.print(f"overfit check passed: loss {result.losses[0]:.4f} -> {result.last_loss:.4f} "
                      f"in {result.steps} steps")
    elif result.final_dir:
        console.print(f"final adapter: {result.final_dir}")
    else:
        console.print(f"stopped at step {result.steps}; continue with: gistctl train --run-dir {path} --resume")
