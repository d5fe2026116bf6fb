"""Extract frames: turn a video into sharp, well-spaced keyframes for reconstruction.

Neighbouring video frames are nearly identical (no baseline, quadratic matching cost) and hand-held
clips have motion-blurred stretches, so feeding every frame to SfM is slow and hurts it. This stage
decodes the clip twice with PyAV:

1. analyse every frame at a small size: sharpness (variance of the Laplacian) and the image motion
   since the previous frame (median displacement of LK-tracked corners, as a fraction of the
   image diagonal), with presentation timestamps so variable frame rate is handled;
2. split the cumulative motion into equal stretches about `target_motion` long (at most
   `max_frames` of them, always from the first frame to the last) and keep the sharpest frame of
   each stretch, never a blurred one where the stretch has a sharp one. Image motion alone
   under-counts what reconstruction needs: an orbit that keeps its subject centred (a drone
   circling a building) turns the viewpoint a lot while the image barely shifts, and a slow pan
   still shows new surface. So there is a floor: at least `min_frames` keyframes, spread over the
   clip's motion, when the clip has that many distinct views (positions at least
   `distinct_motion` apart; a tripod shot has one);
3. decode again and write only the chosen frames, full resolution, upright, as JPEG.

Full-resolution frames are never held in memory; the output folder appears only whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import av.container
import av.error
import av.video.stream
import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_dir, check_stop, write_json_atomic
from scandrop.pipeline.core.workspace import Workspace

_ANALYSIS_SHARE = 0.85  # progress fraction spent in the analysis pass; writing takes the rest
_BLUR_WINDOW_S = 1.0  # sharpness is judged against the median of the frames within this many seconds
_BLUR_WINDOW_MIN = 7  # ... and at least this many frames either side
_MAX_CORNERS = 300
_MIN_TRACKS = 12  # fewer good tracks than this: motion unknown, counted as one full keyframe step
_FB_TOLERANCE_PX = 1.0  # forward-backward LK error above this rejects a track
_CHECK_EVERY = 8  # frames between stop checks and progress reports

_VIDEO_HINT = "Drop the original video file from the camera or phone (mp4, mov, mkv), or a folder of photos."


class FramesConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_frames: int = Field(120, ge=3, description="Most keyframes to keep (the frame budget for SfM).")
    analysis_size: int = Field(
        320, ge=64, description="Long side, in pixels, of the grey copy used for blur and motion analysis."
    )
    target_motion: float = Field(
        0.025,
        gt=0.0,
        le=1.0,
        description="Image motion wanted between consecutive keyframes, as a fraction of the image "
        "diagonal (median corner displacement); keyframes are at most this far apart. 0.025 is about "
        "8 degrees of an orbit around an object the camera keeps in view; smaller = more overlap.",
    )
    min_frames: int = Field(
        30,
        ge=1,
        description="Fewest keyframes wanted when the clip has that many distinct views: slow, "
        "steady footage (an orbit that keeps its subject centred) moves the image little but still "
        "needs this many viewpoints for the overlap reconstruction wants. max_frames still caps it.",
    )
    distinct_motion: float = Field(
        0.002,
        gt=0.0,
        le=1.0,
        description="Image motion, as a fraction of the image diagonal, that makes two frames distinct "
        "views for the min_frames floor (0.002 is under a pixel at analysis size; a tripod's noise is "
        "less).",
    )
    blur_ratio: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="A frame whose sharpness is below this fraction of the median sharpness of the "
        "frames around it (within a second) counts as blurred.",
    )
    jpeg_quality: int = Field(95, ge=50, le=100, description="JPEG quality of the written keyframes.")


class KeptFrame(BaseModel):
    index: int = Field(description="Frame number in decode (presentation) order, from 0.")
    time_s: float = Field(description="Presentation time, seconds after the first frame.")
    sharpness: float = Field(description="Variance of the Laplacian at analysis size.")
    file: str = Field(description="Name of the JPEG written into the output folder.")


class FramesResult(BaseModel):
    decoded: int = Field(description="Frames decoded.")
    duration_s: float = Field(description="Length of the decoded part of the clip, seconds.")
    fps: float = Field(description="Average frame rate of the decoded frames.")
    width: int = Field(description="Width of the written frames (after rotation).")
    height: int = Field(description="Height of the written frames (after rotation).")
    rotation: int = Field(
        description="Counter-clockwise rotation applied from the display matrix: 0/90/180/270."
    )
    codec: str
    total_motion: float = Field(description="Image motion over the whole clip, in image diagonals.")
    kept: list[KeptFrame]
    rejected_blurred: int = Field(description="Frames not kept because they were blurred.")
    rejected_redundant: int = Field(
        description="Other frames not kept: too little motion since the previous keyframe, "
        "or beyond the budget."
    )
    notes: list[str] = Field(default_factory=list)


class _Analysis(NamedTuple):
    times: np.ndarray  # (N,) seconds after the first frame
    sharpness: np.ndarray  # (N,)
    motion: np.ndarray  # (N,) motion from the previous frame, fraction of the diagonal; [0] = 0
    lost: int  # frame pairs where tracking failed
    width: int  # coded frame size, before rotation
    height: int
    rotation: int
    rate: float  # frame rate the container states, for clips too short to measure one
    notes: list[str]


def run(
    config: FramesConfig, video: Path, out_dir: Path, progress: Progress, should_stop: StopCheck
) -> FramesResult:
    """Write the keyframes of `video` into `out_dir` as frame_{index:06d}.jpg and summarise them."""
    check_stop(should_stop)
    if not video.is_file():
        raise ScandropError(
            ErrorCode.input_missing,
            f"The video {video} does not exist.",
            "Check the path; the drop may have been moved or deleted before the job started.",
        )
    with _open(video) as container:
        stream = _video_stream(container, video)
        codec = stream.codec_context.name
        analysis = _analyse(config, container, stream, video, progress, should_stop)
    blurred = blurred_frames(analysis.sharpness, analysis.times, config.blur_ratio)
    chosen = select_keyframes(
        analysis.motion,
        analysis.sharpness,
        blurred,
        config.target_motion,
        config.max_frames,
        min_frames=config.min_frames,
        distinct_motion=config.distinct_motion,
    )
    notes = list(analysis.notes)
    if analysis.lost:
        notes.append(
            f"motion tracking failed between {analysis.lost} frame pairs (too little texture, or cuts); "
            "each counted as one keyframe step"
        )
    blurred_kept = int(blurred[chosen].sum())
    if blurred_kept:
        notes.append(f"{blurred_kept} keyframes are blurred: no sharp frame within a keyframe step of them")
    total_motion = float(analysis.motion.sum())
    if len(chosen) < 3:
        notes.append(
            f"the camera barely moved ({total_motion:.3f} image diagonals in all): "
            "too few viewpoints for reconstruction"
        )

    files = [f"frame_{i:06d}.jpg" for i in chosen]
    with _open(video) as container:
        stream = _video_stream(container, video)
        with atomic_dir(out_dir) as tmp:
            _write_frames(
                config, container, stream, video, chosen, files, analysis.rotation, tmp, progress, should_stop
            )

    n = len(analysis.times)
    span = float(analysis.times[-1] - analysis.times[0]) if n > 1 else 0.0
    fps = (n - 1) / span if span > 0 else analysis.rate
    rejected_blurred = int(blurred.sum()) - blurred_kept
    swap = analysis.rotation in (90, 270)
    progress(1.0, f"kept {len(chosen)} of {n} frames")
    return FramesResult(
        decoded=n,
        duration_s=span + (1.0 / fps if fps > 0 else 0.0),
        fps=fps,
        width=analysis.height if swap else analysis.width,
        height=analysis.width if swap else analysis.height,
        rotation=analysis.rotation,
        codec=codec,
        total_motion=total_motion,
        kept=[
            KeptFrame(
                index=int(i), time_s=float(analysis.times[i]), sharpness=float(analysis.sharpness[i]), file=f
            )
            for i, f in zip(chosen, files, strict=True)
        ],
        rejected_blurred=rejected_blurred,
        rejected_redundant=n - len(chosen) - rejected_blurred,
        notes=notes,
    )


def run_in_workspace(
    config: FramesConfig, video: Path, ws: Workspace, progress: Progress, should_stop: StopCheck
) -> FramesResult:
    """The stage as the pipeline runs it: keyframes into ws.frames_dir, reused by a resumed job."""
    if ws.frames_json.exists() and ws.frames_dir.is_dir():
        return FramesResult.model_validate_json(ws.frames_json.read_text())
    result = run(config, video, ws.frames_dir, progress, should_stop)
    write_json_atomic(ws.frames_json, result.model_dump(mode="json"))
    return result


def _open(video: Path) -> av.container.InputContainer:
    try:
        return av.open(str(video), mode="r")
    except av.error.FFmpegError as exc:
        raise ScandropError(
            ErrorCode.unreadable_video,
            f"{video.name} cannot be read as a video ({exc.strerror or exc}); the file is damaged, "
            "incomplete or not a video.",
            _VIDEO_HINT + " If it was still being copied, drop it again once the copy has finished.",
        ) from exc


def _video_stream(container: av.container.InputContainer, video: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        holds = f"it holds only {', '.join(kinds)}" if kinds else "it holds no streams at all"
        raise ScandropError(
            ErrorCode.unreadable_video, f"{video.name} has no video stream ({holds}).", _VIDEO_HINT
        )
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _nominal_rate(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


class _Decoder:
    """Frames in presentation order; skips packets the decoder rejects, stops where demuxing breaks."""

    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> None:
        self.container = container
        self.stream = stream
        self.bad_packets = 0
        self.stopped_by: str | None = None  # why demuxing ended before the end of the file

    def frames(self) -> Iterator[av.VideoFrame]:
        try:
            for packet in self.container.demux(self.stream):
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError:
                    self.bad_packets += 1
                    continue
                yield from decoded
        except av.error.FFmpegError as exc:  # truncated or damaged container, or no decoder
            self.stopped_by = str(exc.strerror or exc)


def _analyse(
    config: FramesConfig,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    video: Path,
    progress: Progress,
    should_stop: StopCheck,
) -> _Analysis:
    """Pass 1: sharpness and frame-to-frame motion of every frame, at analysis size."""
    rate = _nominal_rate(stream)
    expected_s = _expected_duration(container, stream)
    notes: list[str] = []
    times: list[float] = []
    sharpness: list[float] = []
    motion: list[float] = []
    lost = 0
    prev: np.ndarray | None = None
    size = (0, 0)
    width = height = rotation = 0
    diag = 1.0
    t0 = 0.0
    decoder = _Decoder(container, stream)
    for frame in decoder.frames():
        if not times:
            width, height = frame.width, frame.height
            rotation = _frame_rotation(frame, stream, notes)
            scale = min(1.0, config.analysis_size / max(width, height))
            size = (max(8, round(width * scale)), max(8, round(height * scale)))
            diag = math.hypot(*size)
            t0 = frame.time if frame.time is not None else 0.0
        t = frame.time if frame.time is not None else t0 + len(times) / (rate or 1.0)
        grey = frame.to_ndarray(width=size[0], height=size[1], format="gray", interpolation="AREA")
        times.append(t - t0)
        sharpness.append(float(cv2.Laplacian(grey, cv2.CV_32F).var()))
        if prev is None:
            motion.append(0.0)
        else:
            shift = image_motion(prev, grey)
            lost += shift is None
            motion.append(config.target_motion if shift is None else shift / diag)
        prev = grey
        if len(times) % _CHECK_EVERY == 0:
            check_stop(should_stop)
            frac = min(1.0, times[-1] / expected_s) if expected_s else 0.0
            progress(_ANALYSIS_SHARE * frac, f"analysed {len(times)} frames ({times[-1]:.1f} s)")
    n = len(times)
    if not n:
        why = f" ({decoder.stopped_by})" if decoder.stopped_by else ""
        raise ScandropError(
            ErrorCode.unreadable_video,
            f"No frame of the {stream.codec_context.name} video in {video.name} could be decoded{why}: "
            "the video stream is empty, damaged or in a format this build cannot decode.",
            _VIDEO_HINT + " Re-encoding it as H.264 mp4 works everywhere.",
        )
    covered = times[-1] * n / (n - 1) if n > 1 else 0.0
    if decoder.stopped_by:
        notes.append(f"stream ended early after {n} frames ({decoder.stopped_by}): file truncated?")
    elif stream.frames and n < 0.95 * stream.frames:
        notes.append(f"stream ended early after {n} of {stream.frames} frames: file truncated?")
    elif not stream.frames and expected_s and covered < 0.95 * expected_s:
        notes.append(
            f"stream ended early after {n} frames ({covered:.1f} of {expected_s:.1f} s): file truncated?"
        )
    if decoder.bad_packets:
        notes.append(f"{decoder.bad_packets} damaged packets skipped: some frames may be missing or smeared")
    return _Analysis(
        times=np.asarray(times),
        sharpness=np.asarray(sharpness),
        motion=np.asarray(motion),
        lost=lost,
        width=width,
        height=height,
        rotation=rotation,
        rate=rate,
        notes=notes,
    )


def _expected_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    """Duration the container claims, seconds (0 when it does not say): for progress and truncation."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(Fraction(container.duration, av.time_base))
    return 0.0


def _frame_rotation(frame: av.VideoFrame, stream: av.video.stream.VideoStream, notes: list[str]) -> int:
    """Counter-clockwise degrees (0/90/180/270) that make the frame upright, from its display matrix."""
    degrees = float(frame.rotation or 0)
    if not degrees and "rotate" in stream.metadata:  # old muxers: clockwise degrees as a tag
        try:
            degrees = -float(stream.metadata["rotate"])
        except ValueError:
            notes.append(f"ignored a rotate tag that is not a number: {stream.metadata['rotate']!r}")
    quarter = round(degrees / 90.0) * 90 % 360
    if abs((degrees - quarter + 180) % 360 - 180) > 1.0:
        notes.append(f"display rotation {degrees:.1f} deg rounded to {quarter} deg")
    return int(quarter)


def rotate_upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate an (H, W, ...) image counter-clockwise by `rotation` degrees, a multiple of 90."""
    return np.ascontiguousarray(np.rot90(image, k=(rotation // 90) % 4))


def image_motion(prev: np.ndarray, grey: np.ndarray) -> float | None:
    """Median displacement in pixels of corners tracked from `prev` to `grey`; None if tracking fails.

    Corners are detected afresh on every frame (cheap at analysis size) and kept only when tracking
    them back lands within a pixel of where they started.
    """
    corners = cv2.goodFeaturesToTrack(prev, _MAX_CORNERS, 0.01, 7, blockSize=7)
    if corners is None or len(corners) < _MIN_TRACKS:
        return None
    lk = {"winSize": (21, 21), "maxLevel": 3}
    ahead, ok, _ = cv2.calcOpticalFlowPyrLK(prev, grey, corners, None, **lk)
    back, ok_back, _ = cv2.calcOpticalFlowPyrLK(grey, prev, ahead, None, **lk)
    good = (ok.ravel() == 1) & (ok_back.ravel() == 1)
    good &= np.linalg.norm((back - corners).reshape(-1, 2), axis=1) < _FB_TOLERANCE_PX
    if good.sum() < _MIN_TRACKS:
        return None
    return float(np.median(np.linalg.norm((ahead - corners).reshape(-1, 2)[good], axis=1)))


def blurred_frames(sharpness: np.ndarray, times: np.ndarray, ratio: float) -> np.ndarray:
    """Frames less sharp than `ratio` x the median sharpness of their neighbourhood (about a second)."""
    n = len(sharpness)
    if n > 1 and times[-1] > times[0]:
        half = max(_BLUR_WINDOW_MIN, round(_BLUR_WINDOW_S * (n - 1) / (times[-1] - times[0])))
    else:
        half = _BLUR_WINDOW_MIN
    local = np.array([np.median(sharpness[max(0, i - half) : i + half + 1]) for i in range(n)])
    return sharpness < ratio * local


def distinct_views(motion: np.ndarray, step: float) -> int:
    """How many frames of the clip are at least `step` of cumulative motion apart (greedily)."""
    count, last = 1, 0.0
    for c in np.cumsum(motion):
        if c - last >= step:
            count, last = count + 1, float(c)
    return count


def select_keyframes(
    motion: np.ndarray,
    sharpness: np.ndarray,
    blurred: np.ndarray,
    target: float,
    budget: int,
    min_frames: int = 1,
    distinct_motion: float = 0.002,
) -> list[int]:
    """Indices of the keyframes, ascending: one per equal stretch of cumulative motion.

    The clip's total motion is cut into n-1 equal steps, n = ceil(total / target) + 1, raised to
    `min_frames` where the clip has that many distinct views, capped at `budget`; keyframe k is
    wanted at k steps; stretch k gathers the frames whose cumulative motion
    rounds to step k (the first and last stretches are half steps, so the clip is covered from its
    first frame to its last). Each stretch gives its sharpest frame that is not blurred, looking
    within a quarter step of the wanted position first so that neighbouring keyframes do not bunch
    up at a shared border. A stretch whose frames are all blurred (fast motion blurs frames and
    also makes stretches short) borrows the sharp frame nearest its wanted position within a step;
    only where there is none does it keep its sharpest blurred frame, as coverage matters more.
    A stretch can be empty when one frame-to-frame jump spans more than a step.
    """
    cum = np.cumsum(motion)
    total = float(cum[-1])
    floor = min(min_frames, distinct_views(motion, distinct_motion))
    n = min(budget, max(math.ceil(total / target - 1e-9) + 1, floor)) if total > 0 else 1
    step = total / (n - 1) if n > 1 else math.inf
    stretch = np.zeros(len(cum), dtype=int) if n == 1 else np.clip(np.rint(cum / step), 0, n - 1).astype(int)
    chosen: set[int] = set()
    for k in np.unique(stretch):
        members = np.flatnonzero(stretch == k)
        sharp = members[~blurred[members]]
        wanted = k * step if n > 1 else 0.0
        if len(sharp):
            near = sharp[np.abs(cum[sharp] - wanted) <= step / 4]
            pool = near if len(near) else sharp
            chosen.add(int(pool[np.argmax(sharpness[pool])]))
            continue
        nearby = np.flatnonzero(~blurred & (np.abs(cum - wanted) <= step))
        nearby = nearby[~np.isin(nearby, list(chosen))]
        if len(nearby):
            chosen.add(int(nearby[np.argmin(np.abs(cum[nearby] - wanted))]))
        else:
            chosen.add(int(members[np.argmax(sharpness[members])]))
    return sorted(chosen)


def _write_frames(
    config: FramesConfig,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    video: Path,
    chosen: list[int],
    files: list[str],
    rotation: int,
    folder: Path,
    progress: Progress,
    should_stop: StopCheck,
) -> None:
    """Pass 2: decode again, write the chosen frames full size and upright; stop after the last one."""
    wanted = dict(zip(chosen, files, strict=True))
    params = [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality]
    written = 0
    for index, frame in enumerate(_Decoder(container, stream).frames()):
        if index % _CHECK_EVERY == 0:
            check_stop(should_stop)
        name = wanted.get(index)
        if name is None:
            continue
        path = folder / name
        if not cv2.imwrite(str(path), rotate_upright(frame.to_ndarray(format="bgr24"), rotation), params):
            raise OSError(f"could not write {path}")
        written += 1
        progress(
            _ANALYSIS_SHARE + (1 - _ANALYSIS_SHARE) * written / len(chosen),
            f"wrote keyframe {written} of {len(chosen)}",
        )
        if written == len(chosen):
            return
    raise ScandropError(
        ErrorCode.unreadable_video,
        f"{video.name} decoded differently the second time: {written} of {len(chosen)} keyframes found.",
        _VIDEO_HINT,
    )
