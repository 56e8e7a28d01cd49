"""t2l_fast: fast text-driven layered image and video editing (Text2LIVE).

>>> from t2l_fast import ImageEditor
>>> result = ImageEditor()("horse.jpg", prompt="golden horse", roi_prompt="horse")  # doctest: +SKIP
>>> result.save("out/")  # doctest: +SKIP
"""

from .config import Config, load_yaml, preset
from .io import InputError
from .models.clip import Clip, load_clip
from .pipeline.image import EditResult, ImageEditor
from .pipeline.video import VideoEditor, VideoEditResult

__version__ = "0.1.0"

__all__ = [
    "Clip",
    "Config",
    "EditResult",
    "ImageEditor",
    "InputError",
    "VideoEditResult",
    "VideoEditor",
    "load_clip",
    "load_yaml",
    "preset",
]
