"""The fast path's compile plan at the real sizes, on the CPU: a bounded number of graphs, all made in
the first step, and few device operations outside the compiled regions in a steady step.

One 512x768 edit with 16 views and an ROI prompt through the real ViT-B/32 and generator structures
(narrow widths: graph counts and op counts do not depend on them), compiled with ``aot_eager`` (dynamo
and AOT autograd, no code generation), crops drawn from the real distribution for 40 steps
(benchmarks/compile_plan.py is the instrument; the README states the bounds asserted here).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from t2l_fast.config import RuntimeConfig
from t2l_fast.pipeline.engine import Engine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from compile_plan import eager_device_ops, measure, narrow_vit_b32, real_size_config  # noqa: E402

GRAPH_BOUND = 4  # the README's graphs per edit (measured 3: generator, training crop, objective)
EAGER_OP_BOUND = 100  # the README's device ops outside the compiled regions per steady step


@pytest.fixture(scope="module")
def plan() -> dict:
    cfg = real_size_config(steps=40, backend="aot_eager", channels=4)
    return measure(cfg, narrow_vit_b32(width=32), torch.device("cpu"), profile_steps=3)


def test_every_graph_is_made_in_the_first_step_and_their_number_is_bounded(plan):
    assert plan["steps"] == 40 and plan["graph_breaks"] == 0
    assert 0 < plan["graphs"] <= GRAPH_BOUND, plan["graphs_per_step"]
    assert plan["graphs_after_first_step"] == 0, plan["graphs_per_step"]


def test_a_steady_step_runs_few_device_ops_outside_the_compiled_regions(plan):
    assert plan["eager_ops_per_step"] <= EAGER_OP_BOUND, plan["eager_ops_top"]


def test_the_op_counter_sees_eager_ops_and_not_compiled_ones():
    """The instrument: ops of a compiled region are not counted, eager ones are (views are free)."""
    from torch.profiler import ProfilerActivity, profile

    fn = torch.compile(lambda x: (x.sin() * 2).sum(), backend="aot_eager", dynamic=True)
    x = torch.randn(7, requires_grad=True)
    fn(x).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x).backward()  # compiled: forward and backward inside the regions
        y = x.detach().cos().view(-1)  # eager: one op (the view is free)
        _ = y + 1  # eager: one op
    counts = eager_device_ops(prof.events())
    assert counts["aten::cos"] == 1 and counts["aten::add"] == 1
    assert "aten::sin" not in counts and "aten::view" not in counts


def test_a_failed_compile_falls_back_to_eager_with_one_warning(caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    engine = Engine(RuntimeConfig(mode="fast", compile="on"), torch.device("cpu"))
    engine.backend = broken_backend
    calls = []

    def double(x):
        calls.append(1)
        return x * 2

    run = engine.compiled(double)
    x = torch.arange(3.0)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(run(x), x * 2) and torch.equal(run(x), x * 2)
    warnings = [r for r in caplog.records if "running it eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "double" in warnings[0].getMessage()
