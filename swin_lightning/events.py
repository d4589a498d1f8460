"""Reading a run's TensorBoard event files (ground floor): every scalar series by step, and
a check that each record passes its checksum. The one reader that reports, run status, tune
and the GPU check share."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


class DamagedRunError(ValueError):
    """A run's event files cannot be trusted: which file and what is wrong."""


def check_event_file(path: Path) -> None:
    """Raise :class:`DamagedRunError` if a record of a TensorBoard event file fails its CRC.

    A file cut short in its last record (a writer killed mid-write) is not damage: TensorBoard
    reads every complete record before it, and so does the report.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if header_crc != masked_crc32c(header):
            raise DamagedRunError(f"{path}: damaged record at byte {offset} (bad length checksum)")
        end = offset + 12 + length + 4
        if end > len(data):
            return  # truncated last record
        body = data[offset + 12 : end - 4]
        (body_crc,) = struct.unpack("<I", data[end - 4 : end])
        if body_crc != masked_crc32c(body):
            raise DamagedRunError(f"{path}: damaged record at byte {offset} (bad data checksum)")
        offset = end


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run folder's event files as ``(step, value)`` pairs by step,
    one value per step (a resumed run may log a step twice: the latest wins). The one
    TensorBoard reader of the package; a damaged event file raises :class:`DamagedRunError`.
    """
    for events in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        check_event_file(events)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    series = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time)}
        series[tag] = sorted(by_step.items())
    return series


def scalar_values(series: dict[str, list[tuple[int, float]]], tag: str) -> list[float]:
    """The values of one series of :func:`read_scalars`, in step order (none: empty)."""
    return [value for _, value in series.get(tag, [])]
