"""Keyframes from video: evenly spaced in image motion, sharp, upright, and honest failures.

Test clips are a camera panning over a large procedural texture, encoded with PyAV, so the true
image motion of every frame is known exactly.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.ingest import extract_frames
from scandrop.pipeline.ingest.extract_frames import FramesConfig, FramesResult

W, H = 320, 240
BLURRED = (12, 13, 14)
DIAG = math.hypot(W, H)
APPLE = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets" / "video_cotracker_apple" / "apple.mp4"
)


def _texture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Multi-scale grey noise with a colour tint: corners everywhere, like a textured surface."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for cell, weight in ((2, 0.35), (6, 0.35), (24, 0.3)):
        small = rng.random((h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        img += weight * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)[:h, :w]
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _pan(n: int, travel_px: float) -> tuple[list[np.ndarray], np.ndarray]:
    """n crops of a texture along an ease-in/ease-out pan; returns frames and true x offsets."""
    s = (1 - np.cos(np.pi * np.arange(n) / (n - 1))) / 2  # speed 0 at both ends, fastest mid-way
    xs = 10 + travel_px * s
    ys = 20 + 8 * np.sin(2 * np.pi * np.arange(n) / n)
    tex = _texture(int(travel_px) + W + 40, H + 60)
    frames = []
    for x, y in zip(xs, ys, strict=True):
        m = np.float32([[1, 0, -x], [0, 1, -y]])  # sub-pixel shift: a smooth camera path
        frames.append(cv2.warpAffine(tex, m, (W, H), flags=cv2.INTER_LINEAR))
    return frames, xs


def _encode(
    path: Path,
    frames: list[np.ndarray],
    fps: int = 30,
    times_ms: np.ndarray | None = None,
    rotation: int = 0,
    codec: str = "libx264",
) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        if times_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = int(times_ms[i]), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def _run(video: Path, out: Path, **cfg: float) -> FramesResult:
    return extract_frames.run(FramesConfig(**cfg), video, out, no_progress, never_stop)


def _sine(stream: av.audio.stream.AudioStream) -> list[av.Packet]:
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)[None, :]
    frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 16000, 0
    return [*stream.encode(frame), *stream.encode()]


@pytest.fixture(scope="module")
def pan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray], np.ndarray]:
    """90 frames (3 s at 30 fps) panning 900 px = 2.25 diagonals; frames 12-14 blurred."""
    frames, xs = _pan(90, 900.0)
    for i in BLURRED:
        frames[i] = cv2.GaussianBlur(frames[i], (0, 0), 2.5)
    path = tmp_path_factory.mktemp("pan") / "pan.mp4"
    _encode(path, frames)
    return path, frames, xs


def test_image_motion_measures_a_known_shift() -> None:
    grey = cv2.cvtColor(_texture(400, 300), cv2.COLOR_RGB2GRAY)
    shifted = cv2.warpAffine(grey, np.float32([[1, 0, 3.0], [0, 1, -1.5]]), (400, 300))
    motion = extract_frames.image_motion(grey[40:-40, 40:-40], shifted[40:-40, 40:-40])
    assert motion == pytest.approx(math.hypot(3.0, 1.5), abs=0.1)
    flat = np.full((240, 320), 128, np.uint8)
    assert extract_frames.image_motion(flat, flat) is None  # no corners: motion unknown, not zero


def test_keyframes_are_evenly_spaced_in_motion_and_sharp(pan, tmp_path: Path) -> None:
    video, frames, xs = pan
    out = tmp_path / "frames"
    r = _run(video, out, target_motion=0.08)
    assert (r.decoded, r.width, r.height, r.rotation, r.codec) == (90, W, H, 0, "h264")
    assert r.fps == pytest.approx(30.0, rel=1e-3) and r.duration_s == pytest.approx(3.0, rel=1e-3)
    idx = [k.index for k in r.kept]
    assert idx == sorted(idx) and 3 <= len(idx) <= 120
    # 2.25 diagonals of motion / 0.08 per keyframe -> 30 keyframes at most 0.08 apart
    true_motion = np.abs(np.diff(xs)).sum() / DIAG
    assert r.total_motion == pytest.approx(true_motion, rel=0.03)
    assert len(idx) == math.ceil(true_motion / 0.08) + 1
    assert idx[0] <= 9 and idx[-1] >= 80  # first and last 10% of the clip
    gaps = np.diff(xs[idx]) / DIAG  # true motion between consecutive keyframes
    step = true_motion / (len(idx) - 1)
    assert gaps.min() > 0.4 * step and gaps.max() < 1.6 * step, (gaps / step).round(2)
    assert not set(idx) & set(BLURRED) and r.rejected_blurred == len(BLURRED)
    assert r.rejected_blurred + r.rejected_redundant + len(idx) == r.decoded
    assert sorted(p.name for p in out.iterdir()) == [k.file for k in r.kept]
    assert [k.file for k in r.kept] == [f"frame_{i:06d}.jpg" for i in idx]
    img = cv2.cvtColor(cv2.imread(str(out / r.kept[3].file)), cv2.COLOR_BGR2RGB).astype(int)
    assert img.shape == (H, W, 3)
    error = [np.abs(img - frames[i]).mean() for i in (idx[3] - 1, idx[3], idx[3] + 1)]
    assert error[1] < 12 and error[1] < 0.5 * min(error[0], error[2])  # the frame it names, in RGB
    assert not list(tmp_path.glob(".*"))  # no temporary folder left beside it


def test_budget_respaces_over_the_whole_clip(pan, tmp_path: Path) -> None:
    video, _, xs = pan
    r = _run(video, tmp_path / "f", target_motion=0.01, max_frames=8)
    idx = [k.index for k in r.kept]
    assert len(idx) == 8 and idx[0] <= 9 and idx[-1] >= 80
    gaps = np.diff(xs[idx])
    assert gaps.max() < 1.6 * gaps.mean()  # equal motion, not equal time: the pan eases in and out
    assert r.rejected_redundant == 90 - 8 - r.rejected_blurred


def test_select_keyframes_prefers_sharp_frames_and_keeps_coverage() -> None:
    motion = np.r_[0.0, np.full(20, 0.01)]  # 0.2 diagonals: 5 keyframes wanted near frames 0, 5, .., 20
    sharp = np.linspace(100, 120, 21)
    select = extract_frames.select_keyframes
    # the sharpest frame within a quarter step of each wanted position (sharpness grows with time here)
    assert select(motion, sharp, np.zeros(21, bool), target=0.05, budget=10) == [1, 6, 11, 16, 20]
    blurred = np.zeros(21, bool)
    blurred[8:13] = True  # the whole stretch of frame 10: it borrows the nearest sharp frame
    chosen = select(motion, sharp, blurred, target=0.05, budget=10)
    assert chosen[0] == 1 and chosen[-1] == 20 and len(chosen) == 5 and not blurred[chosen].any()
    blurred[5:16] = True  # nothing sharp within a step: coverage wins, one blurred keyframe
    chosen = select(motion, sharp, blurred, target=0.05, budget=10)
    assert chosen[0] == 1 and chosen[-1] == 20 and blurred[chosen].sum() == 1
    assert select(np.zeros(10), sharp[:10], np.zeros(10, bool), 0.05, 10) == [9]  # no motion: one frame


def test_floor_counts_distinct_views_not_frames() -> None:
    select = extract_frames.select_keyframes
    sharp, clear = np.full(101, 100.0), np.zeros(101, bool)
    slow = np.r_[0.0, np.full(100, 0.001)]  # 0.1 diagonals: 5 keyframes by motion alone
    assert len(select(slow, sharp, clear, target=0.025, budget=120)) == 5
    assert len(select(slow, sharp, clear, 0.025, 120, min_frames=30)) == 30
    assert len(select(slow, sharp, clear, 0.025, 20, min_frames=30)) == 20  # the budget still caps
    # Only 10 views 0.01 apart exist: the floor asks for no more than that.
    assert extract_frames.distinct_views(slow, 0.01) == 11
    assert len(select(slow, sharp, clear, 0.025, 120, min_frames=30, distinct_motion=0.01)) == 11
    jittery_tripod = np.r_[0.0, np.full(100, 0.00002)]  # codec noise, no real motion
    assert len(select(jittery_tripod, sharp, clear, 0.025, 120, min_frames=30)) == 2


def test_a_slow_steady_pan_still_gives_the_floor_of_keyframes(tmp_path: Path) -> None:
    """5 s of a slow, steady pan (a drone's orbit) over 0.25 image diagonals: motion alone would
    keep 11 frames."""
    xs = 10 + np.arange(150) * 100.0 / 149
    tex = _texture(W + 140, H + 40)
    frames = [cv2.warpAffine(tex, np.float32([[1, 0, -x], [0, 1, -20]]), (W, H)) for x in xs]
    video = tmp_path / "slow.mp4"
    _encode(video, frames)
    r = _run(video, tmp_path / "f")
    idx = [k.index for k in r.kept]
    assert len(idx) == FramesConfig().min_frames == 30
    assert idx[0] <= 10 and idx[-1] >= 140
    gaps = np.diff(xs[idx])
    assert gaps.min() > 0.4 * gaps.mean() and gaps.max() < 1.6 * gaps.mean()  # even in motion
    assert not r.notes or not any("barely moved" in n for n in r.notes)


def test_blurred_frames_are_judged_against_their_neighbours() -> None:
    sharp = np.r_[np.full(30, 100.0), np.full(30, 400.0)]  # the scene gets busier half-way
    sharp[[10, 45]] = [40.0, 150.0]
    times = np.arange(60) / 30
    assert np.flatnonzero(extract_frames.blurred_frames(sharp, times, 0.5)).tolist() == [10, 45]


def test_variable_frame_rate_uses_timestamps(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    frames, _ = _pan(40, 300.0)
    ms = np.r_[0, np.cumsum(rng.choice([20, 33, 50, 100], size=39))]
    video = tmp_path / "vfr.mkv"
    _encode(video, frames, times_ms=ms)
    r = _run(video, tmp_path / "f", target_motion=0.05)
    assert r.decoded == 40 and len(r.kept) >= 5
    for k in r.kept:
        assert k.time_s == pytest.approx(ms[k.index] / 1000, abs=1e-6)
    assert r.fps == pytest.approx(39 / (ms[-1] / 1000), rel=1e-6)


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    frames, _ = _pan(20, 200.0)
    video = tmp_path / "portrait.mp4"
    _encode(video, frames, rotation=90)  # counter-clockwise, as a phone held sideways writes it
    out = tmp_path / "f"
    r = _run(video, out, target_motion=0.05)
    assert (r.rotation, r.width, r.height) == (90, H, W)
    k = r.kept[1]
    img = cv2.cvtColor(cv2.imread(str(out / k.file)), cv2.COLOR_BGR2RGB).astype(int)
    assert img.shape == (W, H, 3)
    right = np.abs(img - np.rot90(frames[k.index], 1)).mean()
    wrong = np.abs(img - np.rot90(frames[k.index], -1)).mean()
    assert right < 12 and wrong > 3 * right


def test_rotate_upright_turns_counter_clockwise() -> None:
    a = np.arange(6).reshape(2, 3)
    assert extract_frames.rotate_upright(a, 90).tolist() == [[2, 5], [1, 4], [0, 3]]
    assert extract_frames.rotate_upright(a, 270).tolist() == [[3, 0], [4, 1], [5, 2]]
    assert extract_frames.rotate_upright(a, 0).tolist() == a.tolist()


def _fails(video: Path, tmp_path: Path) -> ScandropError:
    with pytest.raises(ScandropError) as err:
        _run(video, tmp_path / "f")
    assert not (tmp_path / "f").exists()
    return err.value


def test_random_bytes_are_unreadable(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(np.random.default_rng(1).bytes(20_000))
    err = _fails(video, tmp_path)
    assert err.code is ErrorCode.unreadable_video and "clip.mp4" in err.message and err.hint


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    video = tmp_path / "voice.mp4"
    with av.open(str(video), "w") as out:
        out.mux(_sine(out.add_stream("aac", rate=16000)))
    err = _fails(video, tmp_path)
    assert err.code is ErrorCode.unreadable_video and "no video stream" in err.message
    assert "audio" in err.message


def test_video_stream_without_frames_is_unreadable(tmp_path: Path) -> None:
    video = tmp_path / "empty.mkv"
    with av.open(str(video), "w") as out:
        v = out.add_stream("libx264", rate=30)
        v.width, v.height, v.pix_fmt = 64, 64, "yuv420p"
        out.mux(_sine(out.add_stream("aac", rate=16000)))
    with av.open(str(video)) as check:
        assert [s.type for s in check.streams] == ["video", "audio"]
    err = _fails(video, tmp_path)
    assert err.code is ErrorCode.unreadable_video and "No frame" in err.message


def test_missing_file(tmp_path: Path) -> None:
    assert _fails(tmp_path / "gone.mp4", tmp_path).code is ErrorCode.input_missing


def test_truncated_files_keep_what_decodes_or_fail_cleanly(tmp_path: Path) -> None:
    frames, _ = _pan(60, 600.0)
    for suffix in (".mkv", ".mp4"):
        whole = tmp_path / f"whole{suffix}"
        _encode(whole, frames)
        cut = tmp_path / f"cut{suffix}"
        data = whole.read_bytes()
        cut.write_bytes(data[: int(len(data) * 0.6)])
        if suffix == ".mp4":  # the index (moov) is written last: nothing can be found without it
            assert _fails(cut, tmp_path / "mp4").code is ErrorCode.unreadable_video
            continue
        r = _run(cut, tmp_path / "f", target_motion=0.05)
        assert 20 <= r.decoded < 60 and len(r.kept) >= 3
        assert any("ended early" in n and "truncated" in n for n in r.notes), r.notes
        assert len(list((tmp_path / "f").iterdir())) == len(r.kept)


def test_stop_request_cancels_and_leaves_nothing(pan, tmp_path: Path) -> None:
    video = pan[0]
    with pytest.raises(ScandropError) as err:
        extract_frames.run(FramesConfig(), video, tmp_path / "f", no_progress, lambda: True)
    assert err.value.code is ErrorCode.cancelled

    stop = False

    def progress(fraction: float, message: str) -> None:
        nonlocal stop
        stop = stop or message.startswith("wrote keyframe")  # cancel mid-way through writing

    with pytest.raises(ScandropError) as err:
        extract_frames.run(FramesConfig(target_motion=0.05), video, tmp_path / "f", progress, lambda: stop)
    assert err.value.code is ErrorCode.cancelled and stop
    assert list(tmp_path.iterdir()) == []


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        FramesConfig(max_frames=2)
    with pytest.raises(ValueError):
        FramesConfig(colour=True)


@pytest.mark.slow
def test_real_hand_held_clip(tmp_path: Path) -> None:
    if not APPLE.is_file():
        pytest.skip(f"real-data clip not present: {APPLE}")
    t = time.perf_counter()
    r = _run(APPLE, tmp_path / "f")
    took = time.perf_counter() - t
    idx = [k.index for k in r.kept]
    print(
        f"apple.mp4: decoded {r.decoded}, {r.width}x{r.height} {r.codec} {r.fps:.1f} fps, kept {len(idx)} "
        f"{idx}, blurred {r.rejected_blurred}, redundant {r.rejected_redundant}, {took:.2f} s, "
        f"notes {r.notes}"
    )
    assert (r.decoded, r.width, r.height, r.rotation) == (50, 1296, 720, 0)
    assert 30 <= len(idx) <= 50 and idx[0] <= 4 and idx[-1] >= 45  # the min_frames floor
    assert len(list((tmp_path / "f").iterdir())) == len(idx)


def test_a_still_camera_gives_few_keyframes_and_says_why(tmp_path: Path) -> None:
    still = _texture(W, H)
    video = tmp_path / "tripod.mp4"
    _encode(video, [still] * 30)
    r = _run(video, tmp_path / "f")
    assert r.decoded == 30 and len(r.kept) == 1 and r.total_motion < 0.01
    assert any("barely moved" in n for n in r.notes)
