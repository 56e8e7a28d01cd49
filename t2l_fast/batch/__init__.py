"""Edits at scale: a manifest of edit jobs run in one warm process per device, over torchrun.

    t2l-fast batch jobs.yaml --out results/ [--clip NAME] [--clip-weights PATH] [--device ...]
    torchrun --nproc-per-node 8 -m t2l_fast.batch jobs.yaml --out results/

The manifest (YAML, or JSON Lines: one job object a line, ``{"defaults": {...}}`` on a line of its own)::

    defaults: {steps: 1000, seed: 0}
    jobs:
      - {input: photos/horse.jpg, prompt: golden horse, roi_prompt: horse, name: horse-gold}
      - {input: photos/horse.jpg, prompt: [ice horse, wooden horse], seed: [0, 1]}   # 4 jobs
      - {input: clips/car-turn, atlas: atlases/car-turn, layer: background, prompt: winter scene,
         set: {optim.steps: 3000}}

Job keys are ``t2l-fast edit``'s option names (``-`` or ``_``); ``set`` takes ``--set`` keys (a mapping or
a list of ``key=value``). Lists of prompts or seeds expand into one job per combination. Relative paths
are relative to the manifest's folder. CLIP, its weights and the device are chosen for the whole batch.

How it runs:

- The whole manifest is validated first (each job's config is built as ``t2l-fast edit`` builds it);
  a problem is one line naming the file, line and key, before any model loads.
- Each process loads CLIP once; every job builds its generator anew, so torch.compile's cached graphs
  (keyed on code, guarded on shapes) are reused by later jobs of the same shapes.
- Under torchrun, job indices are handed out by an atomic counter in the process group's store
  (``store.add``): a rank takes the next job when it is free. No collective is used (a rank may
  wait hours for a long video job elsewhere), so the process group is gloo even on GPUs; each rank
  uses ``cuda:LOCAL_RANK``.
- A job writes into a hidden staging folder, then a done marker, then the folder is renamed to
  ``OUT/NAME``: a job's folder is complete or absent. A rerun skips jobs whose marker matches the job
  (a changed job is redone); a killed run loses at most the jobs in flight.
- A failing job is recorded with its one-line error and the others go on. Rank 0 gathers every
  rank's records through the store and writes ``OUT/summary.json`` and ``OUT/summary.md``; the exit
  code is 1 when a job failed (2 for a bad manifest, 130 when interrupted).

The package: :mod:`~t2l_fast.batch.manifest` (reading and checking the manifest),
:mod:`~t2l_fast.batch.runner` (the jobs of one process, :func:`run`), :mod:`~t2l_fast.batch.distributed`
(the ranks of a torchrun launch), :mod:`~t2l_fast.batch.summary` (records, summary, progress). The
command is :mod:`t2l_fast.cli.batch`.
"""

from .manifest import BATCH_WIDE, JOB_KEYS, Job, load_manifest
from .runner import run
from .summary import DONE_MARKER, SUMMARY_FILES, BatchSummary, JobRecord

__all__ = [
    "BATCH_WIDE",
    "DONE_MARKER",
    "JOB_KEYS",
    "SUMMARY_FILES",
    "BatchSummary",
    "Job",
    "JobRecord",
    "load_manifest",
    "run",
]
