"""The synthetic video benchmark: Fashion-MNIST items moving over textured noisy backgrounds, COCO truth.

Why synthetic: no video data set or pretrained detector can be downloaded here, and a seeded generator gives a
benchmark anyone can rebuild byte for byte. What makes it non-trivial: 3-7 objects per frame at 16-64 px that
change velocity and size, enter and leave through the borders and occlude each other (z-order); a panning
background of smoothed noise at three octaves plus a gradient; a slow global illumination change; Gaussian
camera noise; sprite contrast that varies, so some items are faint against a bright background.

Ground truth rules (one place): a sprite's pixels are those of its resized Fashion-MNIST image at or above
`mask_threshold`; its box is the tight box of the pixels of it that are visible (not covered by a sprite in
front, inside the frame), in COCO `[x, y, w, h]` with pixel-edge coordinates. An object with less than
`visible_min` of its sprite visible is kept but marked `iscrowd: 1` (COCO evaluation then ignores detections
of it instead of counting them as false positives); one with fewer than `visible_pixels_min` visible pixels
gets no annotation. Sequences for training draw sprites only from the Fashion-MNIST train split, test
sequences only from the test split; `seed` decides everything else.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)


def coco_categories(class_names: typing.Sequence[str]) -> List[Dict[str, Any]]:
    """COCO categories of the sprites' classes: label l (0..9) is category id l + 1 everywhere here."""
    return [{"id": i + 1, "name": n, "supercategory": "sprite"} for i, n in enumerate(class_names)]


SPLIT_CODES = {"train": 0, "test": 1}


@dataclass(frozen=True)
class SynthConfig:
    """Everything a sequence's look depends on besides the seed; validated once, never mutated."""

    width: int = 128
    height: int = 128
    frames: int = 150
    fps: float = 30.0
    min_size_px: float = 16.0
    max_size_px: float = 64.0
    initial_objects: Tuple[int, int] = (3, 6)
    min_objects: int = 3
    max_objects: int = 7
    enter_prob: float = 0.08  # per frame, while fewer than max_objects
    speed_px: Tuple[float, float] = (0.3, 2.0)  # per frame
    turn_prob: float = 0.04  # per frame: a new target velocity
    turn_rate: float = 0.15  # per frame: how fast the velocity approaches its target
    size_drift: float = 0.012  # std of the per-frame log-size change
    gain: Tuple[float, float] = (0.55, 1.25)  # sprite contrast
    mask_threshold: int = 40
    visible_min: float = 0.5
    visible_pixels_min: int = 16
    noise_sigma: Tuple[float, float] = (2.0, 6.0)
    background: bool = True  # False: flat black, no noise, no illumination change (tests)
    pan_px: float = 0.3  # max background pan per frame

    def __post_init__(self) -> None:
        if self.width < 32 or self.height < 32:
            raise ValueError(f"frames must be at least 32x32, got {self.width}x{self.height}")
        if self.frames < 1 or self.fps <= 0:
            raise ValueError("frames must be >= 1 and fps > 0")
        if not 4 <= self.min_size_px <= self.max_size_px <= min(self.width, self.height):
            raise ValueError("need 4 <= min_size_px <= max_size_px <= frame side")
        if not 0 < self.min_objects <= self.max_objects or self.initial_objects[0] > self.initial_objects[1]:
            raise ValueError("object counts must satisfy 0 < min_objects <= max_objects, lo <= hi")
        if not 0.0 <= self.visible_min <= 1.0:
            raise ValueError("visible_min is a fraction in [0, 1]")


@dataclass
class _Object:
    track_id: int
    sprite_index: int
    label: int
    image: np.ndarray  # 28x28 float32, 0..255
    size_px: float
    cx: float
    cy: float
    vx: float
    vy: float
    target_vx: float
    target_vy: float
    gain: float
    z: float


@dataclass
class Sequence:
    """One generated sequence: frames uint8 [T, H, W], per-frame annotation lists, optional id maps."""

    frames: np.ndarray
    annotations: List[List[Dict[str, Any]]]
    id_maps: Optional[np.ndarray] = None  # int16 [T, H, W]: track id of the visible sprite, -1 background
    sprite_indices: List[int] = field(default_factory=list)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (pixel centres aligned) in numpy: the same bytes on any machine (cv2: SIMD paths)."""
    src_h, src_w = image.shape
    ys = np.clip((np.arange(height, dtype=np.float64) + 0.5) * src_h / height - 0.5, 0, src_h - 1)
    xs = np.clip((np.arange(width, dtype=np.float64) + 0.5) * src_w / width - 0.5, 0, src_w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, src_h - 1)
    x1 = np.minimum(x0 + 1, src_w - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smoothed noise at three octaves plus a linear gradient, mapped to about 20..170 grey levels."""
    base = np.zeros((height, width), dtype=np.float32)
    for cells, amplitude in ((3, 1.0), (9, 0.5), (33, 0.25)):
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        base += amplitude * resize_bilinear(grid, height, width)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = (np.cos(angle) * xx / width + np.sin(angle) * yy / height) * rng.uniform(0.5, 2.0)
    base += gradient
    base -= base.min()
    base /= max(float(base.max()), 1e-6)
    low = rng.uniform(15, 60)
    high = rng.uniform(110, 175)
    return (low + (high - low) * base).astype(np.float32)


class _SequenceMaker:
    """Simulates and renders one sequence; all randomness comes from one Generator, in a fixed order."""

    def __init__(self, config: SynthConfig, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        self.c = config
        self.images = images
        self.labels = labels
        self.rng = rng
        self.objects: List[_Object] = []
        self.next_id = 0
        self.sprite_indices: List[int] = []

    def _new_object(self, entering: bool) -> _Object:
        c, rng = self.c, self.rng
        index = int(rng.integers(len(self.images)))
        self.sprite_indices.append(index)
        size = float(np.exp(rng.uniform(np.log(c.min_size_px), np.log(c.max_size_px))))
        speed = rng.uniform(*c.speed_px)
        angle = rng.uniform(0, 2 * np.pi)
        vx, vy = speed * np.cos(angle), speed * np.sin(angle)
        cx = rng.uniform(0, c.width)
        cy = rng.uniform(0, c.height)
        if entering:  # just outside one border, heading in
            side = int(rng.integers(4))
            inward = max(abs(speed), 0.6)
            half = size / 2 - 2
            if side == 0:
                cx, vx = -half, inward
            elif side == 1:
                cx, vx = c.width + half, -inward
            elif side == 2:
                cy, vy = -half, inward
            else:
                cy, vy = c.height + half, -inward
        obj = _Object(
            track_id=self.next_id,
            sprite_index=index,
            label=int(self.labels[index]),
            image=self.images[index].reshape(self.images.shape[-2:]).astype(np.float32),
            size_px=size,
            cx=float(cx),
            cy=float(cy),
            vx=float(vx),
            vy=float(vy),
            target_vx=float(vx),
            target_vy=float(vy),
            gain=float(rng.uniform(*c.gain)),
            z=float(rng.uniform()),
        )
        if rng.uniform() < 0.5:
            obj.image = obj.image[:, ::-1].copy()
        self.next_id += 1
        return obj

    def _step(self) -> None:
        c, rng = self.c, self.rng
        for obj in self.objects:
            if rng.uniform() < c.turn_prob:
                speed = rng.uniform(0.0, c.speed_px[1])
                angle = rng.uniform(0, 2 * np.pi)
                obj.target_vx, obj.target_vy = speed * np.cos(angle), speed * np.sin(angle)
            obj.vx += c.turn_rate * (obj.target_vx - obj.vx)
            obj.vy += c.turn_rate * (obj.target_vy - obj.vy)
            obj.cx += obj.vx
            obj.cy += obj.vy
            obj.size_px = float(
                np.clip(obj.size_px * np.exp(rng.normal(0, c.size_drift)), c.min_size_px, c.max_size_px)
            )
        self.objects = [o for o in self.objects if not self._gone(o)]
        wanted = len(self.objects) < c.min_objects or rng.uniform() < c.enter_prob
        if wanted and len(self.objects) < c.max_objects:
            self.objects.append(self._new_object(entering=True))

    def _gone(self, obj: _Object) -> bool:
        half = obj.size_px / 2 + 1
        return (
            obj.cx + half < 0
            or obj.cy + half < 0
            or obj.cx - half > self.c.width
            or obj.cy - half > self.c.height
        )

    def _render(self, bg: np.ndarray, illumination: float, noise_sigma: float):  # type: ignore[no-untyped-def]
        c = self.c
        frame = bg.copy()
        id_map = np.full((c.height, c.width), -1, dtype=np.int16)
        full_pixels: Dict[int, int] = {}
        for obj in sorted(self.objects, key=lambda o: o.z):
            side = max(int(round(obj.size_px)), 4)
            sprite = resize_bilinear(obj.image, side, side)
            mask = sprite >= c.mask_threshold
            full_pixels[obj.track_id] = int(mask.sum())
            x0 = int(round(obj.cx - side / 2))
            y0 = int(round(obj.cy - side / 2))
            fx0, fy0 = max(x0, 0), max(y0, 0)
            fx1, fy1 = min(x0 + side, c.width), min(y0 + side, c.height)
            if fx0 >= fx1 or fy0 >= fy1:
                continue
            sub_mask = mask[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
            sub_sprite = sprite[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
            region = frame[fy0:fy1, fx0:fx1]
            region[sub_mask] = np.minimum(sub_sprite[sub_mask] * obj.gain, 255.0)
            id_map[fy0:fy1, fx0:fx1][sub_mask] = obj.track_id
        if c.background:
            frame = frame * illumination + self.rng.normal(0, noise_sigma, frame.shape).astype(np.float32)
        pixels = np.clip(np.round(frame), 0, 255).astype(np.uint8)
        return pixels, id_map, full_pixels

    def _annotate(self, id_map: np.ndarray, full_pixels: Dict[int, int]) -> List[Dict[str, Any]]:
        c = self.c
        out = []
        for obj in sorted(self.objects, key=lambda o: o.track_id):
            ys, xs = np.nonzero(id_map == obj.track_id)
            if len(xs) < c.visible_pixels_min:
                continue
            x1, y1 = int(xs.min()), int(ys.min())
            w, h = int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1
            visible = len(xs) / max(full_pixels.get(obj.track_id, 1), 1)
            out.append(
                {
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "category_id": obj.label + 1,
                    "iscrowd": int(visible < c.visible_min),
                    "track_id": obj.track_id,
                    "visible_fraction": round(float(visible), 4),
                    "sprite_index": obj.sprite_index,
                }
            )
        return out

    def make(self, keep_id_maps: bool) -> Sequence:
        c, rng = self.c, self.rng
        pad = int(np.ceil(c.pan_px * c.frames)) + 1
        big_bg = _background(rng, c.height + 2 * pad, c.width + 2 * pad)
        pan = rng.uniform(-c.pan_px, c.pan_px, size=2)
        period = rng.uniform(60, 240)
        phase = rng.uniform(0, 2 * np.pi)
        depth = rng.uniform(0.05, 0.2)
        noise_sigma = float(rng.uniform(*c.noise_sigma))
        for _ in range(int(rng.integers(c.initial_objects[0], c.initial_objects[1] + 1))):
            self.objects.append(self._new_object(entering=False))
        frames = np.empty((c.frames, c.height, c.width), dtype=np.uint8)
        id_maps = np.empty((c.frames, c.height, c.width), dtype=np.int16) if keep_id_maps else None
        annotations = []
        for t in range(c.frames):
            if t:
                self._step()
            if c.background:
                ox, oy = (int(round(pad + pan[i] * t)) for i in range(2))
                bg = big_bg[oy : oy + c.height, ox : ox + c.width]
                illumination = 1.0 + depth * np.sin(2 * np.pi * t / period + phase)
            else:
                bg, illumination = np.zeros((c.height, c.width), dtype=np.float32), 1.0
            frames[t], id_map, full = self._render(bg, float(illumination), noise_sigma)
            if id_maps is not None:
                id_maps[t] = id_map
            annotations.append(self._annotate(id_map, full))
        return Sequence(frames, annotations, id_maps, sorted(set(self.sprite_indices)))


def sequence_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sequence `index` of `split`: independent streams, one per (seed, split, index)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    return np.random.default_rng(
        np.random.SeedSequence(int(seed), spawn_key=(SPLIT_CODES[split], int(index)))
    )


def make_sequence(
    config: SynthConfig,
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    keep_id_maps: bool = False,
) -> Sequence:
    """One sequence whose sprites come from `images` (uint8 [N, 1, 28, 28] or [N, 28, 28]) and `labels`."""
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError("need as many labels as images, and at least one image")
    return _SequenceMaker(config, images, labels, rng).make(keep_id_maps)
