"""The capturable step (runtime.cudagraphs): fixed staging buffers for the draws, gradients zeroed in
place, loss records copied out of the step's outputs into one device buffer, and the same numbers as
the default path. CUDA graphs themselves need a GPU (gpu_check measures them on and off); what makes
a step capturable is tested here on the CPU."""

from __future__ import annotations

import torch

from t2l_fast.augment import Staging
from t2l_fast.config import RuntimeConfig
from t2l_fast.pipeline.engine import Engine, RecordBuffer, StepRecord, optimise, resolve_records
from tests.conftest import small_config


def test_staging_reuses_its_buffers_and_nothing_sent_aliases_them():
    staging = Staging(slots=3)
    cpu = torch.device("cpu")
    sent, sources = [], []
    for i in range(7):  # odd sizes, growing and shrinking
        flat = torch.arange(5 + 3 * (i % 3), dtype=torch.float32) * (i + 1)
        sources.append(flat.clone())
        sent.append(staging.send(flat, cpu))
    buffers = [b.data_ptr() for b in staging.buffers]
    assert len(set(buffers)) == 3  # three fixed buffers, reused in turn
    staging.send(torch.ones(4), cpu)
    assert [b.data_ptr() for b in staging.buffers] == buffers  # no new allocation for a smaller send
    for out, src in zip(sent, sources, strict=True):
        assert torch.equal(out, src)  # still what was sent, though every buffer was written again
        assert all(out.data_ptr() != b for b in buffers)


def test_record_buffer_keeps_values_after_the_step_outputs_change():
    """A CUDA graph's outputs are overwritten by its next replay: the record must hold a copy."""
    buffer = RecordBuffer(capacity=5)  # replaced when full: records of two steps do not fit twice
    records, expected = [], []
    out = torch.zeros(3)  # stands for a graph's output memory, reused every step
    for step in range(6):
        out.copy_(torch.tensor([step + 0.5, 2.0 * step, -float(step)]))
        record = StepRecord(buffer)
        record.add({"loss": out[0], "a": out[1]}, 0.25)
        record.add({"loss": out[0], "b": out[2]}, 0.75)
        records.append(record)
        expected.append({"loss": step + 0.5, "a": 0.25 * 2.0 * step, "b": 0.75 * -float(step)})
    out.fill_(float("nan"))
    assert resolve_records(records) == expected


def _linear_run(static_grads: bool):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    cfg = small_config(steps=6).optim
    cfg.lr = 1e-2
    engine = Engine(RuntimeConfig(mode="fast", log_every=4), torch.device("cpu"))
    engine.static_grads = static_grads
    pointers = []

    class Objective:
        def __call__(self, y, step, gen, cache_key=None):
            target = torch.rand(y.shape, generator=gen)  # differs from step to step
            return {"loss": ((y - target) ** 2).mean(), "mean": y.mean()}

    def examples(step, gen):
        x = torch.randn(4 + step % 3, 5, generator=gen)  # a batch whose size changes
        yield net(x), None, 0.5
        yield net(x[:2] * 2), ("source",), 0.5

    def on_step(step, record):
        pointers.append([p.grad.data_ptr() if p.grad is not None else None for p in net.parameters()])

    history, _ = optimise(engine, net, Objective(), examples, cfg, 3, on_step=on_step)
    return history, [p.detach().clone() for p in net.parameters()], pointers


def test_gradients_zeroed_in_place_give_the_same_run():
    history, weights, pointers = _linear_run(static_grads=True)
    ref_history, ref_weights, ref_pointers = _linear_run(static_grads=False)
    assert history == ref_history
    for w, r in zip(weights, ref_weights, strict=True):
        assert torch.equal(w, r)
    assert all(p is None for step in ref_pointers for p in step)  # the default frees them
    assert all(p is not None for p in pointers[0]) and all(step == pointers[0] for step in pointers)


def test_capture_settings_follow_runtime_cudagraphs():
    cuda = torch.device("cuda")  # nothing runs on it: the settings only
    on = Engine(RuntimeConfig(mode="fast", compile="on", cudagraphs=True), cuda)
    off = Engine(RuntimeConfig(mode="fast", compile="on"), cuda)
    assert on.cudagraphs and on.static_grads and not off.cudagraphs and not off.static_grads
    assert Engine(RuntimeConfig(mode="fast", cudagraphs=True), torch.device("cpu")).cudagraphs is False


def _image_edit(tiny_clip, prefetch: bool, threads: list[str]):
    import threading

    import t2l_fast.pipeline.image as image_module
    from t2l_fast import ImageEditor

    cfg = small_config(steps=6, lambda_structure=1.0)
    cfg.runtime.mode, cfg.runtime.prefetch = "fast", prefetch
    cfg.roi_prompt, cfg.loss.bootstrap_steps = "cat", 4  # the bootstrap weight changes each step
    cfg.data.source_every = 2
    original = image_module.draw_crop

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    image_module.draw_crop = spy
    try:
        image = torch.rand(3, 151, 197, generator=torch.Generator().manual_seed(4))
        return ImageEditor(cfg, device="cpu", clip=tiny_clip)(image, prompt="golden")
    finally:
        image_module.draw_crop = original


def test_prefetched_draws_give_the_same_run(tiny_clip):
    threads_on, threads_off = [], []
    on = _image_edit(tiny_clip, True, threads_on)
    off = _image_edit(tiny_clip, False, threads_off)
    assert threads_on == ["t2l-fast-prefetch"] * 6 and threads_off == ["MainThread"] * 6
    assert on.losses == off.losses and len(on.losses) == 6
    assert {"structure", "bootstrap", "comp_dir"} <= set(on.losses[0])
    for k, v in off.generator_state.items():
        assert torch.equal(on.generator_state[k], v), k


def test_prefetch_hands_out_plans_in_order_and_raises_a_draw_error_at_its_step():
    import pytest

    from t2l_fast.pipeline.engine import Prefetcher

    def plan(step, gen):
        if step == 3:
            raise ValueError("bad draw")
        return step, float(torch.rand(1, generator=gen))

    gen = torch.Generator().manual_seed(0)
    inline = [plan(s, gen) for s in range(3)]
    plans = Prefetcher(plan, 10, torch.Generator().manual_seed(0), depth=2)
    assert [next(plans) for _ in range(3)] == inline
    with pytest.raises(ValueError, match="bad draw"):
        next(plans)
    plans.close()
    stopped = Prefetcher(plan, 3, torch.Generator().manual_seed(0), depth=1)
    stopped.close()  # a loop that ends early (Ctrl-C) stops the thread, though the queue is full
    assert not stopped._thread.is_alive()
