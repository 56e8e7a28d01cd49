"""The fast path's steps read nothing back from the device and copy host data to it once per call.

On a GPU a scalar read (``item``, ``tolist``, ``bool()``, ``float()``, ``int()``, ``.cpu()``,
``nonzero``, boolean-mask indexing) of a device tensor waits for the device, and so does a copy of
host-built data. The CPU has no such boundary, so this test draws it: a tensor made by a factory
without a ``device`` argument (the random draws of a step, host constants), or computed only from
such tensors, is a host tensor; every other tensor is a device tensor. Reads of device tensors are
syncs; ``.to(device)`` of host tensors, and ``torch.tensor(data, device=...)`` of Python data, are
transfers. Both are counted during fast-mode steps.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from t2l_fast.config import preset
from t2l_fast.pipeline.image import ImageEditor
from t2l_fast.pipeline.video import VideoEditor
from t2l_fast.synthetic import two_layer_scene
from tests.conftest import small_config

T = torch.Tensor
READS = {T.item, T.tolist, T.__bool__, T.__float__, T.__int__, T.__index__, T.cpu, T.numpy, T.nonzero}
READS |= {torch.nonzero, torch.argwhere, torch.masked_select}
FACTORIES = {
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.eye,
    torch.arange,
    torch.linspace,
}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.host: dict[int, weakref.ref] = {}  # id -> tensor (ids of dead tensors are not trusted)
        self.syncs: list[str] = []
        self.transfers = 0

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        name = getattr(func, "__name__", str(func))
        if func in READS and tensors and not self._is_host(tensors[0]):
            self.syncs.append(name)
        if func is T.__getitem__ and any(t.dtype == torch.bool and not self._is_host(t) for t in tensors[1:]):
            self.syncs.append("boolean-mask indexing")
        moves = func in (T.to, T.cuda) and tensors and self._is_host(tensors[0])
        moves = moves and (
            func is T.cuda or "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])
        )
        # torch.tensor(python data, device=...) builds on the host and copies (and waits on CUDA)
        made_there = func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None
        if moves or (made_there and not tensors):
            self.transfers += 1
        out = func(*args, **kwargs)
        host = False
        if func in (T.cpu, T.numpy):  # what was read back lives on the host
            host = True
        elif func in FACTORIES:
            host = kwargs.get("device") is None
        elif tensors and not moves:
            host = all(self._is_host(t) for t in tensors)
        if moves:  # on the CPU the copy may be the same object: it is a device tensor from now on
            self.host.pop(id(out), None)
        if host:
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self.host[id(o)] = weakref.ref(o)
        return out


def _fast(cfg):
    cfg.runtime.mode = "fast"
    cfg.runtime.compile = "off"
    cfg.runtime.log_every = 1000  # no progress read-back inside the steps measured
    return cfg


def _count(run, steps: int):
    """(syncs, transfers) per step, measured over the steps after the first (caches warm)."""
    counter = SyncCounter()
    marks = []

    def on_step(step, record):  # the record is lazy: not reading it costs nothing
        marks.append((len(counter.syncs), counter.transfers))

    with counter:
        run(on_step)
    (s0, t0), (s1, t1) = marks[0], marks[steps - 1]
    return counter.syncs[s0:s1], (t1 - t0) / (steps - 1)


def test_image_steps_read_nothing_back(tiny_clip):
    source = torch.rand(3, 150, 190, generator=torch.Generator().manual_seed(0))
    cfg = _fast(small_config(steps=5))
    cfg.roi_prompt = "cat"
    cfg.data.source_every = 3  # a step with the whole image too
    editor = ImageEditor(cfg, device="cpu", clip=tiny_clip)
    syncs, transfers = _count(lambda cb: editor(source, callback=lambda s: cb(s.step, s.losses)), 5)
    assert syncs == []
    # per step: the crop's parameters, and the objective's draws per example (crop; sometimes the image)
    assert transfers <= 2.5  # 2 a step, 3 when the whole image is fed too


@pytest.mark.parametrize("layer", ["background", "foreground"])
def test_video_steps_read_nothing_back(tiny_clip, layer):
    data, frames = two_layer_scene(t=8, h=72, w=100, sprite=40)
    cfg = _fast(preset("video"))
    cfg.prompt = "winter"
    cfg.optim.steps = 4
    cfg.views.n_aug = 2
    cfg.generator.channels_down = cfg.generator.channels_up = 8
    cfg.data.source_every = 2
    cfg.data.jitter_p = 1.0  # the colour jitter's parameters travel too
    cfg.video.layer = layer
    editor = VideoEditor(cfg, device="cpu", clip=tiny_clip)
    syncs, transfers = _count(
        lambda cb: editor(frames, atlas=data, callback=lambda s: cb(s.step, s.losses)), 4
    )
    assert syncs == []
    assert transfers <= 4  # two jitters, the objective per example group (and the whole atlas)


def test_the_counter_sees_a_sync_and_a_transfer():
    """The instrument itself: a read of a device tensor and a copy of host data are both counted."""
    device_tensor = torch.ones(3)  # made outside the counter: a device tensor
    counter = SyncCounter()
    with counter:
        host = torch.rand(2)  # a random draw on the host
        float(host[0])  # a host read: free
        _ = host.to("cpu")  # a transfer
        if (device_tensor > 0).all():  # a device read: a sync
            pass
        device_tensor[device_tensor > 0]  # boolean-mask indexing: a sync
    assert counter.syncs == ["__bool__", "boolean-mask indexing"] and counter.transfers == 1


def test_the_objectives_batched_pass_traces_as_one_graph(tiny_clip):
    """With the step's randomness drawn first, the fast path's objective (views, CLIP, structure
    target, every loss, the fused ops) is one graph: no break that would split a compiled region."""
    import torch._dynamo

    from t2l_fast.losses import Layers
    from t2l_fast.objective import Objective

    cfg = small_config()
    cfg.roi_prompt = "cat"  # the directional loss and its no-gradient source views too
    objective = Objective(tiny_clip, cfg, batched=True)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 140, 170, generator=g)
    rgba = torch.rand(2, 4, 140, 170, generator=g).requires_grad_()
    draw = objective.draw(2, (140, 170), torch.Generator().manual_seed(1)).to("cpu")

    def step(rgba, source):
        return objective.compute(Layers.from_rgba(rgba, source), draw)["loss"]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(rgba, source)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    # and the traced graph computes what eager does
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(rgba, source), step(rgba, source))
