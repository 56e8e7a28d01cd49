"""Video reading (frame folders, video files) and writing (H.264 MP4, PNG frames)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from t2l_fast.io import InputError
from t2l_fast.video_io import read_video, write_frames, write_video

T, H, W = 8, 64, 96


def _smooth_frames(num_frames: int = T, h: int = H, w: int = W) -> torch.Tensor:
    """(T, 3, H, W) uint8: smooth moving gradients (survive lossy H.264 well)."""
    t, y, x = torch.meshgrid(
        torch.arange(num_frames).float(), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"
    )
    rgb = torch.stack(
        [0.5 + 0.4 * torch.sin((x + 3 * t) / 9), 0.5 + 0.4 * torch.cos((y - 2 * t) / 7), (x + y) / (w + h)],
        dim=1,
    )
    return (rgb * 255).round().to(torch.uint8)


def test_video_write_read_round_trip(tmp_path):
    frames = _smooth_frames()
    path = write_video(tmp_path / "out.mp4", frames, fps=12)
    assert path == tmp_path / "out.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temp file left

    back, fps = read_video(path, size=None)
    assert back.dtype == torch.uint8 and back.shape == (T, 3, H, W)
    assert fps == pytest.approx(12.0)
    err = (back.float() - frames.float()).abs().mean().item()
    assert err < 4.0, err  # lossy, but close

    small, _ = read_video(path, max_frames=3, size=(48, 32))
    assert small.shape == (3, 3, 32, 48)


def test_write_video_float_and_odd_sizes(tmp_path):
    frames = _smooth_frames(3, 33, 47).float() / 255
    write_video(tmp_path / "odd.mp4", frames, fps=29.97)
    back, fps = read_video(tmp_path / "odd.mp4", size=None)
    assert back.shape == (3, 3, 34, 48)  # padded to even sizes for yuv420p
    assert fps == pytest.approx(29.97, abs=1e-3)


def test_frame_folder_round_trip(tmp_path):
    frames = _smooth_frames(5)
    paths = write_frames(tmp_path / "frames", frames)
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(5)]
    back, fps = read_video(tmp_path / "frames", size=None)
    assert fps == 25.0
    assert torch.equal(back, frames)  # PNG is lossless, order by name
    resized, _ = read_video(tmp_path / "frames", max_frames=2, size=(32, 24))
    assert resized.shape == (2, 3, 24, 32)


def test_frame_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no frames here")
    with pytest.raises(InputError, match="no frame images"):
        read_video(empty)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (40, 30)).save(mixed / "000.jpg")
    Image.new("RGB", (40, 30)).save(mixed / "001.png")
    Image.new("RGB", (41, 30)).save(mixed / "002.jpg")
    Image.new("RGB", (10, 10)).save(mixed / "003.jpg")
    with pytest.raises(InputError, match=r"002\.jpg is 41x30 but 000\.jpg is 40x30"):
        read_video(mixed)


def test_video_file_errors(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00 definitely not an mp4 file" * 50)
    with pytest.raises(InputError, match="cannot decode video"):
        read_video(bad)
    with pytest.raises(InputError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    other = tmp_path / "clip.gif"
    other.write_bytes(b"GIF89a")
    with pytest.raises(InputError, match="unsupported video"):
        read_video(other)
    with pytest.raises(InputError, match="max_frames"):
        read_video(bad, max_frames=0)
