"""TensorBoard scalars on rank 0, a null logger elsewhere (torchtitan's pattern)."""

from __future__ import annotations

import logging
from pathlib import Path

# Shown in TensorBoard's Text tab (tag "help/tags"): what each scalar means and when it is taken.
TAG_HELP = {
    "train/loss": "the objective handed to backward (pt_weight * loss_pt + reg), mean over the micro-batches and ranks since the last log",
    "train/loss_pt": "the pre-training loss (masked LM for MLM encoders), same averaging",
    "train/reg": "lam * sum ||W||_F over the regularized weights, same averaging",
    "train/lr": "learning rate after the step's scheduler update",
    "train/samples_per_second": "global samples per wall-clock second since the last log",
    "train/data_wait_fraction": "share of wall time blocked on the data loader since the last log",
    "reg/norm/<weight>": "||W||_F of one regularized weight at step k, taken in step k's forward, i.e. BEFORE step k's update",
}


class NullLogger:
    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops events a killed run wrote past its last checkpoint.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        if purge_step is None:
            self.writer.add_text("help/tags", "\n".join(f"- `{k}`: {v}" for k, v in TAG_HELP.items()), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_logger(is_main: bool, log_dir: Path, purge_step: int | None = None) -> NullLogger:
    return TensorBoardLogger(log_dir, purge_step) if is_main else NullLogger()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a run's event files, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    # A resumed run's writer starts at its checkpoint's step (purge_step), so the reader drops the
    # steps the interrupted run logged past it, as intended, and warns "Detected out of order
    # event.step likely caused by a TensorFlow restart" on the user's terminal; not a problem here.
    tb_log = logging.getLogger("tensorboard")
    level = tb_log.level
    tb_log.setLevel(logging.ERROR)
    try:
        acc.Reload()
    finally:
        tb_log.setLevel(level)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
