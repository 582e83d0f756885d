"""The Trainer callback every training method shares: the job's metrics rows, its stops
(pause, cancel) and its checkpoints, from the Trainer's own events."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from worker.training.distributed import agree, barrier, is_main_rank
from worker.training.spec import REWARD_FIGURES, TrainingHooks

# TRL's DPOTrainer logs these per step (and with "eval_" per evaluation); a row carries them
# as train_<name> and valid_<name>. Rewards are beta times the policy's log-probability
# ratio to the reference; the accuracy is the share of pairs whose chosen answer has the
# higher reward, the margin their mean difference.


def reward_metrics(logs: dict, source_prefix: str, row_prefix: str) -> dict[str, float]:
    """The reward figures of a TRL log dict, renamed for a metrics row (none outside DPO)."""
    return {
        f"{row_prefix}{name}": float(logs[f"{source_prefix}{key}"])
        for key, name in REWARD_FIGURES.items()
        if f"{source_prefix}{key}" in logs
    }


class HooksCallback(TrainerCallback):
    """Turns the Trainer's events into the job's metrics, stops and checkpoints.

    Which steps are checkpointed is decided here (epoch ends, every `checkpoint_steps`, a
    pause); the saving is the Trainer's own (`control.should_save`: adapter, optimizer,
    scheduler, RNG and trainer state), and `on_save` hands the directory to the hooks.

    With several ranks (worker.training.distributed) every rank runs this callback: rank 0's
    hooks alone reach the job, the stop and a time-based checkpoint are rank 0's answers
    broadcast to all (so all stop and save at the same step), and a checkpoint is handed on
    once every rank has written its part.
    """

    def __init__(
        self,
        hooks: TrainingHooks,
        validating: bool,
        checkpoint_steps: int | None,
        checkpoint_seconds: float | None = None,
        *,
        classes: list[str] | None = None,
    ) -> None:
        self.hooks = hooks
        # A classifier's class names, written into every checkpoint as into the final
        # adapter: a checkpoint's adapter says which output is which class too.
        self.classes = classes
        self.validating = validating
        self.checkpoint_steps = checkpoint_steps
        # Also checkpoint when this much time has passed since the last one, so a long
        # epoch never risks more than that much work to a crash.
        self.checkpoint_seconds = checkpoint_seconds
        self.last_checkpoint = time.monotonic()
        self.rows: list[dict] = []
        self.pending: dict | None = None  # a step's train row, waiting for its eval loss
        self.stop_reason: str | None = None  # "pause" | "cancel" once should_stop said so

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        # After a resume the Trainer has restored the count: this run's share starts here.
        self.tokens_at_begin = state.num_input_tokens_seen
        message = f"Training for {state.max_steps} steps"
        if state.global_step:  # resumed: the Trainer restored the step count
            message += f", continuing after step {state.global_step}"
        self.hooks.on_message(message)

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        # One collective a step, on every rank (a no-op in a single process).
        reason, due = agree(self.hooks.should_stop(), self.checkpoint_due(state))
        if reason == "pause":
            # Keep what was trained: this step is checkpointed. It is evaluated only if an
            # uninterrupted run would evaluate it too (the flow callback already said so):
            # each evaluation draws from the torch RNG (its DataLoader's seed) before the
            # RNG state is saved, so an extra one would shift every dropout mask after
            # the resume, and the resumed run would no longer match an uninterrupted one.
            self.stop_reason = "pause"
            control.should_training_stop = True
            self.checkpoint_here(control, evaluate=control.should_evaluate)
        elif reason:
            self.stop_reason = "cancel"
            control.should_training_stop = True
            control.should_evaluate = False  # stop now, not after a pass over the valid set
            control.should_save = False  # not even a save_steps checkpoint on this step
        elif due:
            self.checkpoint_here(control, evaluate=self.validating)
        return control

    def checkpoint_due(self, state: TrainerState) -> bool:
        if state.epoch is not None and float(state.epoch).is_integer():
            return True  # the last step of an epoch
        every = self.checkpoint_steps
        if every is not None and state.global_step % every == 0:
            return True
        interval = self.checkpoint_seconds
        return interval is not None and time.monotonic() - self.last_checkpoint >= interval

    def checkpoint_here(self, control: TrainerControl, evaluate: bool) -> None:
        # Every checkpoint is taken on a logged (and, but for a pause, evaluated) step, so
        # it carries the losses of the exact point it was taken at.
        control.should_log = True
        control.should_evaluate = evaluate
        control.should_save = True

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            row = {
                "step": state.global_step,
                "train_loss": float(logs["loss"]),
                "learning_rate": float(logs["learning_rate"]),
                "epoch": float(state.epoch or 0.0),
                "total_steps": state.max_steps,
                **reward_metrics(logs, "", "train_"),
            }
            if control.should_evaluate:
                self.pending = row  # the Trainer evaluates right after logging this step
            else:
                self.emit(row)
        elif "eval_loss" in logs:
            row = self.pending or {
                "step": state.global_step,
                "epoch": float(state.epoch or 0.0),
                "total_steps": state.max_steps,
            }
            self.pending = None
            row = {**row, "valid_loss": float(logs["eval_loss"])}
            for metric in ("mean_token_accuracy", "accuracy", "macro_f1"):
                if f"eval_{metric}" in logs:
                    row[f"valid_{metric}"] = float(logs[f"eval_{metric}"])
            row.update(reward_metrics(logs, "eval_", "valid_"))
            self.emit(row)

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        self.hooks.on_metrics(row)

    def on_save(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.last_checkpoint = time.monotonic()
        # Every rank writes its part of the checkpoint (its RNG state; with FSDP its shard
        # of the optimizer): it is complete once all are here.
        barrier()
        if not is_main_rank():
            return
        # Called right after Trainer._save_checkpoint wrote this directory (logging and
        # evaluation of the step come before the save, so its row is complete).
        step = state.global_step
        checkpoint_dir = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.classes is not None:
            (checkpoint_dir / "classes.json").write_text(json.dumps(self.classes))
        row = next((r for r in reversed(self.rows) if r["step"] == step), {})
        self.hooks.on_checkpoint(step, checkpoint_dir, row)
