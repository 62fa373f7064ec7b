"""The run's metrics: ``metrics.jsonl`` (one JSON record per line) and DeepSpeed's monitors (TensorBoard,
CSV, W&B, Comet: whichever the ds_config enables), written by rank 0. One x axis everywhere: the
optimizer step (DeepSpeed's own ``Train/Samples/*`` series count samples)."""

from __future__ import annotations

import json
import os

from .files import METRICS_NAME, atomic_write_text


class Logger:
    """Rank 0 writes metrics to ``metrics.jsonl`` and to TensorBoard through ``engine.monitor``.

    ``resume_step``: a resumed run continues its own log from that step. Records of later steps (written
    after the checkpoint, before the run stopped) are dropped from ``metrics.jsonl``, and TensorBoard is
    told to purge its points past the checkpoint (a ``SessionLog.START`` event, as ``SummaryWriter``'s
    ``purge_step`` writes one), so that each step appears once in both."""

    def __init__(self, engine, output_dir: str, rank: int, resume_step: int | None = None):
        self.engine, self.rank = engine, rank
        self.file = None
        self.last_loss = None
        """The training loss of the last logged step (every rank: it is averaged over them)."""
        if rank != 0:
            return
        path = os.path.join(output_dir, METRICS_NAME)
        kept = []
        if resume_step is not None and os.path.isfile(path):
            kept = [line for line in open(path) if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        atomic_write_text("".join(kept), path)
        self.file = open(path, "a")
        writer = getattr(getattr(engine.monitor, "tb_monitor", None), "summary_writer", None)
        if resume_step is not None and writer is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            # TensorBoard keeps the points before this step, of every file in the folder, and drops the rest
            writer.file_writer.add_event(Event(step=resume_step + 1,
                                               session_log=SessionLog(status=SessionLog.START)))

    def log(self, record: dict, tb: dict[str, float] | None = None) -> None:
        """``record`` to metrics.jsonl; the scalars ``tb`` to the monitors at the record's step (0 if none)."""
        if "loss" in record:
            self.last_loss = record["loss"]
        if self.rank != 0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if tb:
            step = record.get("step", 0)
            self.engine.monitor.write_events([(tag, value, step) for tag, value in tb.items()])

    def close(self) -> None:
        if self.file:
            self.file.close()
