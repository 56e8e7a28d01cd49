"""A batch over the ranks of a torchrun launch: job indices handed out by an atomic counter in the
process group's store (``store.add``), each rank's records gathered by rank 0 through the store. No
collective is used (a rank may wait hours for a long video job elsewhere), so the process group is
gloo even on GPUs; each rank uses ``cuda:LOCAL_RANK``. Without torchrun a plain counter stands in."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import timedelta

from .summary import JobRecord


class Local:
    """One process: a plain counter stands in for the store."""

    rank, world_size, local_rank = 0, 1, 0

    def __init__(self) -> None:
        self._values: dict[str, int] = {}

    def add(self, key: str, amount: int) -> int:
        self._values[key] = self._values.get(key, 0) + amount
        return self._values[key]


class Distributed:
    """Ranks of a torchrun launch, coordinated through the default process group's store."""

    _calls = 0  # run() calls in this process: each ``run`` on every rank gets its own keys

    def __init__(self) -> None:
        import torch.distributed as dist

        self.created = False
        if not dist.is_initialized():
            # gloo even on GPUs: no tensor collective is used, only the store
            dist.init_process_group("gloo", timeout=timedelta(days=7))
            self.created = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.store = dist.distributed_c10d._get_default_store()
        Distributed._calls += 1
        # an elastic restart reuses the agent's store: keys of a new attempt must start afresh
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"t2l_fast.batch/{restart}/{Distributed._calls}"

    def add(self, key: str, amount: int) -> int:
        return int(self.store.add(f"{self.prefix}/{key}", amount))

    def post(self, records: list[JobRecord]) -> None:
        self.store.set(
            f"{self.prefix}/records/{self.rank}", json.dumps([dataclasses.asdict(r) for r in records])
        )
        self.add("ranks_finished", 1)

    def gather(self) -> list[JobRecord]:
        """Rank 0: every rank's records, once all ranks have posted (polled: no timeout applies)."""
        while self.add("ranks_finished", 0) < self.world_size:
            time.sleep(0.2)
        out = []
        for r in range(self.world_size):
            out += [JobRecord(**d) for d in json.loads(self.store.get(f"{self.prefix}/records/{r}"))]
        return out

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(device: str, local_rank: int, world_size: int) -> str:
    """Under torchrun each rank takes its own GPU (``cuda:LOCAL_RANK``)."""
    if world_size > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            return f"cuda:{local_rank}"
    return device
