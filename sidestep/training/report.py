"""`--report-to tensorboard|wandb`: the metrics.csv rows (and the audio samples) sent to a dashboard too.

Both are optional extras (`pip install "sidestep[tensorboard]"` / `"sidestep[wandb]"`); when the chosen one is
missing or cannot start, `open_reporter` says so in one notice and the run goes on with metrics.csv alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sidestep.training.config import ReportTo

if TYPE_CHECKING:
    from sidestep.training.events import SamplesSaved
    from sidestep.training.records import MetricsRow

__all__ = ["Reporter", "TensorBoardReporter", "WandbReporter", "open_reporter", "TENSORBOARD_DIR"]

TENSORBOARD_DIR = "tensorboard"


class Reporter(Protocol):
    def log(self, row: "MetricsRow") -> None: ...

    def samples(self, event: "SamplesSaved") -> None: ...

    def close(self) -> None: ...


def _scalars(row: "MetricsRow") -> dict[str, float]:
    out = {"train/loss": row.loss, "train/loss_ema": row.loss_ema, "train/lr": row.lr, "train/grad_norm": row.grad_norm,
           "train/epoch": row.epoch}
    if row.val_loss is not None:
        out["val/loss"] = row.val_loss
    return out


def _mono(path: Path) -> tuple[Any, int]:
    import soundfile as sf
    import torch

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(audio.mean(axis=1)), rate


class TensorBoardReporter:
    """Scalars under train/ and val/, and the samples as (mono) audio, in OUTPUT/tensorboard."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, row: "MetricsRow") -> None:
        for tag, value in _scalars(row).items():
            self.writer.add_scalar(tag, value, row.step)

    def samples(self, event: "SamplesSaved") -> None:
        for path in event.files:
            mono, rate = _mono(path)
            self.writer.add_audio(f"samples/{path.stem}", mono[None], event.step, sample_rate=rate)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, run: Any, wandb: Any) -> None:
        self.run, self.wandb = run, wandb

    def log(self, row: "MetricsRow") -> None:
        self.run.log(_scalars(row), step=row.step)

    def samples(self, event: "SamplesSaved") -> None:
        clips = {}
        for path in event.files:
            mono, rate = _mono(path)
            clips[f"samples/{path.stem}"] = self.wandb.Audio(mono.numpy(), sample_rate=rate)
        self.run.log(clips, step=event.step)

    def close(self) -> None:
        self.run.finish()


def open_reporter(kind: ReportTo, output_dir: Path, record: dict[str, Any]) -> tuple[Reporter | None, str | None]:
    """(the reporter, None), or (None, the notice saying why there is none) for a missing or failing extra."""
    if kind is ReportTo.NONE:
        return None, None
    fallback = "training goes on with metrics.csv only"
    if kind is ReportTo.TENSORBOARD:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None, (f"--report-to tensorboard: TensorBoard is not installed (pip install tensorboard, the "
                          f"sidestep extra of that name); {fallback}.")
        return TensorBoardReporter(SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR))), None
    try:
        import wandb
    except ImportError:
        return None, (f"--report-to wandb: Weights & Biases is not installed (pip install wandb, the sidestep extra "
                      f"of that name); {fallback}.")
    try:
        run = wandb.init(project="sidestep", name=Path(output_dir).name, dir=str(output_dir), config=record)
    except Exception as err:  # noqa: BLE001 - no login, no network: a dashboard must never stop the run
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        return None, f"--report-to wandb: Weights & Biases did not start ({reason}); {fallback}."
    return WandbReporter(run, wandb), None
