"""What the web page of ``t2l-fast serve`` does, without the page: input checks, runs in a worker thread
with progress, cancelling, and the outputs (images, videos, a zip of the output folder).

Nothing here imports Gradio (the page is :mod:`t2l_fast.serve.page`), so the handlers are tested as
plain Python. Bad input raises :class:`~t2l_fast.io.InputError` with one readable line; the page shows
it. A run (image edit, atlas fit, video edit) is a generator of updates: dicts from output names
(``status``, ``preview``, ``losses``, ``composite``, ``download``, ...) to new values.

The package: :mod:`~t2l_fast.serve.inputs` (checks of uploads, what the page shows),
:mod:`~t2l_fast.serve.worker` (a run in a thread, progress), :mod:`~t2l_fast.serve.state` (the server's
state, the fields made into a config), the handlers of each tab (:mod:`~t2l_fast.serve.image`,
:mod:`~t2l_fast.serve.atlas`, :mod:`~t2l_fast.serve.video`) joined in :mod:`~t2l_fast.serve.app`, and
the page itself (:mod:`~t2l_fast.serve.page`, the only module that imports Gradio).
"""

from .app import ADVANCED_KEYS, App, advanced_defaults, free_port_error
from .inputs import TEST_MODEL_NOTE, Limits, check_image_file, checkerboard, extract_images, samples

__all__ = [
    "ADVANCED_KEYS",
    "TEST_MODEL_NOTE",
    "App",
    "Limits",
    "advanced_defaults",
    "check_image_file",
    "checkerboard",
    "extract_images",
    "free_port_error",
    "samples",
]
