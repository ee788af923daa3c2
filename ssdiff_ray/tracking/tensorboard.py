"""Round scalars and sample grids as TensorBoard event files, one step per round.

Written with TensorBoard's own event writer and protos rather than
``torch.utils.tensorboard`` (which wraps the same writer): the driver never imports torch
(start-up time and memory), and the grids are already PNG files, so they go in unchanged.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from ssdiff_ray.tracking.base import Tracker


class TensorBoardLog(Tracker):
    name = "TensorBoard"

    def __init__(self, log_dir: Path, start_round: int = 1):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.Event, self.Summary = Event, Summary
        log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(log_dir))
        if start_round > 1:
            # A resumed run: TensorBoard drops what the stopped run logged after its last
            # checkpoint (steps >= start_round), as torch's SummaryWriter(purge_step=) does.
            self.writer.add_event(Event(wall_time=time.time(), step=start_round,
                                        session_log=SessionLog(status=SessionLog.START)))
        self.writer.flush()

    def log_round(self, round_: int, scalars: dict[str, float], grid_png: Path | None) -> None:
        values = [self.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        if grid_png is not None and grid_png.is_file():
            png = grid_png.read_bytes()
            width, height = png_size(png)
            values.append(self.Summary.Value(tag="samples", image=self.Summary.Image(
                height=height, width=width, colorspace=3, encoded_image_string=png)))
        self.writer.add_event(self.Event(wall_time=time.time(), step=round_,
                                         summary=self.Summary(value=values)))
        self.writer.flush()  # a user watching the run sees each round as it ends

    def finish(self, run_dir: Path, status: str) -> None:
        self.writer.close()


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return struct.unpack(">II", png[16:24])
