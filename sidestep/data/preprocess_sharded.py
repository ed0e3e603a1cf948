"""`preprocess` over several processes (torchrun / accelerate launch): each encodes every W-th audio file.

Files go round-robin; after each round of W files the outcomes are gathered to every process, so a dead or
stalled peer is noticed within one file's time (the collective timeout), process 0's bar counts all files,
and every process ends with the whole summary in file order. Each output is written atomically by the one
process that owns its file, so nothing is written twice and nothing half-written is left.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sidestep import distributed

if TYPE_CHECKING:
    from sidestep.data.preprocess import FileOutcome, _Job

__all__ = ["run_sharded"]


def run_sharded(job: "_Job", files: list[Path], audio_dir: Path) -> tuple[list["FileOutcome"], set[str], bool]:
    """(outcomes of all files in order, dataset-JSON entries used, whether any process loaded the encoders)."""
    from sidestep.data.preprocess import PreprocessEvent, Stage

    ctx = distributed.current()
    total = len(files)
    outcomes: list[FileOutcome] = []
    for first in range(0, total, ctx.world_size):
        index = first + ctx.rank
        mine = None
        if index < total:
            source = files[index].relative_to(audio_dir).as_posix()
            job.on_event(PreprocessEvent(Stage.START, index, total, source))
            mine = job.process(index, total, files[index], source)
        for outcome in distributed.all_gather_objects(mine):
            if outcome is not None:
                outcomes.append(outcome)
                job.on_event(PreprocessEvent(Stage.FINISH, len(outcomes) - 1, total, outcome.source, 1, 1, outcome))
    shared = distributed.all_gather_objects((job.json_entries_used, job.encoders is not None))
    used = {entry for entries, _ in shared for entry in entries}
    return outcomes, used, any(loaded for _, loaded in shared)
