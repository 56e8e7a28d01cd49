"""What a batch reports: a record per job, the summary of a batch (``OUT/summary.json`` and
``OUT/summary.md``) and the progress shown while it runs."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

DONE_MARKER = ".t2l_done.json"  # written last into a job's folder: the job is complete
SUMMARY_FILES = ("summary.json", "summary.md")


@dataclass
class JobRecord:
    """What happened to one job (a row of the summary)."""

    index: int
    name: str
    input: str
    prompt: str
    seed: int
    status: str  # done | skipped (done by an earlier run) | failed | interrupted | not run
    out: str  # the job's output folder; "" when it has none (failed, interrupted, not run)
    rank: int = 0
    seconds: float | None = None  # the whole job: reading the input, training, writing
    first_step_seconds: float | None = None  # job start to the end of its first step (compile included)
    step_seconds: float | None = None  # median seconds per step after the first
    steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)  # the last step's loss terms
    error: str | None = None
    variants: int = 1  # jobs trained together with it (variants of one image or video), itself included


@dataclass
class BatchSummary:
    """The records of a batch; on rank 0 (or without torchrun) every job's, elsewhere the rank's own."""

    records: list[JobRecord]
    world_size: int = 1
    rank: int = 0
    seconds: float = 0.0
    out: str = ""

    @property
    def failed(self) -> list[JobRecord]:
        return [r for r in self.records if r.status in ("failed", "interrupted")]

    @property
    def ok(self) -> bool:
        return not self.failed and all(r.status in ("done", "skipped") for r in self.records)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.status] = counts.get(r.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "world_size": self.world_size,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "jobs": [dataclasses.asdict(r) for r in self.records],
        }

    def to_markdown(self) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.counts().items())
        together = [r for r in self.records if r.variants > 1 and r.status in ("done", "failed")]
        lines = [
            f"# t2l-fast batch: {len(self.records)} jobs ({counts}), {self.world_size} process(es), "
            f"{self.seconds:.1f} s",
            "",
        ]
        if together:
            lines += [
                f"{len(together)} jobs were trained together with others as variants of one input "
                "(they differ only in prompt or seed; seconds are the group's).",
                "",
            ]
        lines += [
            "| job | status | seconds | final losses | output |",
            "|---|---|---:|---|---|",
        ]
        for r in self.records:
            seconds = f"{r.seconds:.1f}" if r.seconds is not None else ""
            losses = " ".join(f"{k}={v:.4g}" for k, v in r.losses.items())
            status = r.status if not r.error else f"{r.status}: {r.error}"
            if r.variants > 1:
                status += f" (1 of {r.variants} variants)"
            lines.append(f"| {_md(r.name)} | {_md(status)} | {seconds} | {losses} | {_md(r.out)} |")
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class Progress:
    """One bar per rank on a terminal (jobs finished by all ranks / total); else a line per job."""

    def __init__(self, total: int, rank: int, world_size: int, enabled: bool | None):
        self.total, self.rank, self.world_size = total, rank, world_size
        tty = sys.stderr.isatty()
        self.bar = None
        if enabled is not False and tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"rank {rank}", position=rank, unit="job", dynamic_ncols=True)
        self.lines = enabled is not False and not tty
        self.mine = 0

    def job_done(self, record: JobRecord, finished: int) -> None:
        self.mine += 1
        if self.bar is not None:
            self.bar.n = finished
            self.bar.set_postfix_str(f"this rank {self.mine}, last {record.name} {record.status}")
        elif self.lines and record.status != "skipped":
            prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
            seconds = f" in {record.seconds:.1f} s" if record.seconds is not None else ""
            detail = (
                f": {record.error}"
                if record.error
                else (f" (loss {record.losses['loss']:.4g})" if "loss" in record.losses else "")
            )
            print(
                f"{prefix}{finished}/{self.total} {record.name} {record.status}{seconds}{detail}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
