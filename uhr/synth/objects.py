"""Small objects of a synthetic scene: classes, shapes, colours and where they may stand.

Four classes told apart by shape at full resolution: ships (long hull, pointed bow) on water,
cars (short box with a dark windscreen) in the lanes of urban roads, planes (fuselage, swept wings,
tailplane) and storage tanks (discs) on bare soil. Each object is one flat palette colour, so its
colour is a fact of the pixels, not a judgement. Objects come in groups (a harbour, a queue of
cars, an apron, a tank farm) and never overlap.

Rotation is the heading of the object's long axis in degrees, clockwise from the +x (column) axis
as seen on the image; size is the length of that axis in pixels; a bbox is [x0, y0, x1, y1] in
pixel-edge coordinates (the object covers columns x0..x1-1 and rows y0..y1-1).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from uhr.synth.landcover import LABEL, ROAD_PERIOD_PX, ROAD_WIDTH_PX, LandCover, LandCoverLayout


class ObjectClass(str, Enum):
    """Object classes, named as a single word or phrase answer would name them."""

    SHIP = "ship"
    CAR = "car"
    PLANE = "plane"
    STORAGE_TANK = "storage tank"


OBJECT_CLASSES: tuple[ObjectClass, ...] = tuple(ObjectClass)

# Saturated colours that no land-cover texture takes, so a colour is never ambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 36, 36),
    "blue": (36, 96, 226),
    "white": (246, 246, 246),
    "yellow": (244, 214, 46),
    "green": (46, 176, 72),
    "orange": (244, 134, 26),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
# Windscreens of cars.
GLASS_RGB = (34, 40, 52)


@dataclass(frozen=True)
class ObjectSpec:
    """How one class is sized, grouped and placed.

    `host`: the land cover it stands on; `size_px`: range of its long-axis length;
    `per_megapixel`: expected objects per million pixels of host cover; `group`: range of
    objects per group; `spread_px`: radius of a scattered group (ships; the other classes form
    rows, queues and grids); `same_colour`: a group shares one colour.
    """

    host: LandCover
    size_px: tuple[float, float]
    per_megapixel: float
    group: tuple[int, int]
    spread_px: float
    same_colour: bool = False


# Densities are objects per million pixels of the host land cover, so small training scenes and
# 32k archive scenes have the same object density and the same question mix.
OBJECT_SPECS: dict[ObjectClass, ObjectSpec] = {
    ObjectClass.SHIP: ObjectSpec(LandCover.WATER, (16.0, 60.0), 12.0, (1, 6), 160.0),
    ObjectClass.CAR: ObjectSpec(LandCover.URBAN, (8.0, 16.0), 40.0, (2, 8), 0.0),
    ObjectClass.PLANE: ObjectSpec(LandCover.BARE_SOIL, (24.0, 60.0), 6.0, (1, 4), 0.0),
    ObjectClass.STORAGE_TANK: ObjectSpec(LandCover.BARE_SOIL, (10.0, 40.0), 10.0, (2, 9), 0.0, same_colour=True),
}
# Free pixels kept between any two objects' boxes.
MARGIN_PX = 3
# Tries per group anchor and per object before giving up (crowded or small host areas).
ANCHOR_TRIES = 64
MEMBER_TRIES = 8


@dataclass(frozen=True)
class SceneObject:
    """One object as the ground truth records it."""

    id: int
    cls: ObjectClass
    colour: str
    centre: tuple[float, float]
    size_px: float
    rotation_deg: float
    bbox: tuple[int, int, int, int]

    @property
    def rgb(self) -> tuple[int, int, int]:
        return PALETTE[self.colour]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "class": self.cls.value,
            "colour": self.colour,
            "rgb": list(self.rgb),
            "centre": list(self.centre),
            "size_px": self.size_px,
            "rotation_deg": self.rotation_deg,
            "bbox": list(self.bbox),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        return cls(
            id=int(data["id"]),
            cls=ObjectClass(data["class"]),
            colour=str(data["colour"]),
            centre=(float(data["centre"][0]), float(data["centre"][1])),
            size_px=float(data["size_px"]),
            rotation_deg=float(data["rotation_deg"]),
            bbox=tuple(int(v) for v in data["bbox"]),  # type: ignore[arg-type]
        )


def rasterize(
    cls: ObjectClass, centre: tuple[float, float], size_px: float, rotation_deg: float, window: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of an object over a pixel window (x0, y0, x1, y1): (body, glass), each (h, w) bool.

    A pixel belongs to the object when its centre falls inside the shape; `glass` (a car's
    windscreen) is part of `body` and drawn dark.
    """
    x0, y0, x1, y1 = window
    # Local frame: u along the heading, v across it; pixel centres at +0.5.
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - centre[0]
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - centre[1]
    theta = math.radians(rotation_deg)
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = np.abs(-dx * math.sin(theta) + dy * math.cos(theta))
    length = size_px
    glass = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    if cls is ObjectClass.CAR:
        half_width = max(1.75, 0.225 * length)
        body = (np.abs(u) <= length / 2) & (v <= half_width)
        glass = body & (u >= 0.12 * length) & (u <= 0.28 * length)
    elif cls is ObjectClass.SHIP:
        half_width = max(1.75, 0.1 * length)
        bow = 2.4 * half_width
        # Full beam aft, tapering to a point over the last `bow` pixels.
        beam = half_width * np.clip((length / 2 - u) / bow, 0.0, 1.0)
        body = (u >= -length / 2) & (u <= length / 2) & (v <= beam)
    elif cls is ObjectClass.PLANE:
        half_width = max(1.0, 0.06 * length)
        nose = np.clip((length / 2 - u) / (3 * half_width), 0.0, 1.0)
        fuselage = (u >= -length / 2) & (u <= length / 2) & (v <= half_width * nose)
        wings = (v <= 0.48 * length) & (u <= 0.10 * length - 0.3 * v) & (u >= -0.06 * length - 0.3 * v)
        tail = (v <= 0.17 * length) & (u >= -0.5 * length) & (u <= -0.36 * length - 0.3 * v)
        body = fuselage | wings | tail
    else:
        body = u**2 + v**2 <= (length / 2) ** 2
    return np.broadcast_to(body, glass.shape).copy(), glass


def extent(cls: ObjectClass, centre: tuple[float, float], size_px: float, rotation_deg: float) -> tuple[int, int, int, int] | None:
    """The tight bbox of an object's pixels, or None when it covers no pixel centre."""
    reach = 0.75 * size_px + 2
    window = (
        math.floor(centre[0] - reach),
        math.floor(centre[1] - reach),
        math.ceil(centre[0] + reach),
        math.ceil(centre[1] + reach),
    )
    body, _ = rasterize(cls, centre, size_px, rotation_deg, window)
    rows = np.flatnonzero(body.any(axis=1))
    cols = np.flatnonzero(body.any(axis=0))
    if rows.size == 0:
        return None
    return (window[0] + int(cols[0]), window[1] + int(rows[0]), window[0] + int(cols[-1]) + 1, window[1] + int(rows[-1]) + 1)


def paint(
    objects: list[SceneObject], window: tuple[int, int, int, int], rgb: np.ndarray, nir: np.ndarray | None = None
) -> None:
    """Draw the objects that meet `window` into its RGB (h, w, 3) and, if given, NIR (h, w) arrays."""
    x0, y0, x1, y1 = window
    for obj in objects:
        bx0, by0, bx1, by1 = obj.bbox
        part = (max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1))
        if part[0] >= part[2] or part[1] >= part[3]:
            continue
        body, glass = rasterize(obj.cls, obj.centre, obj.size_px, obj.rotation_deg, part)
        rows = slice(part[1] - y0, part[3] - y0)
        cols = slice(part[0] - x0, part[2] - x0)
        colour = np.asarray(obj.rgb, dtype=np.float32)
        rgb[rows, cols][body] = colour
        rgb[rows, cols][glass] = GLASS_RGB
        if nir is not None:
            # Painted metal and glass: NIR about as bright as the visible bands.
            nir[rows, cols][body] = 0.8 * colour.mean()
            nir[rows, cols][glass] = 0.8 * float(np.mean(GLASS_RGB))


class _Occupancy:
    """Boxes placed so far, bucketed on a coarse grid for overlap checks."""

    def __init__(self, bucket_px: int = 128):
        self.bucket = bucket_px
        self.boxes: dict[tuple[int, int], list[tuple[int, int, int, int]]] = defaultdict(list)

    def _keys(self, box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
        b = self.bucket
        return [(i, j) for i in range(box[0] // b, (box[2] - 1) // b + 1) for j in range(box[1] // b, (box[3] - 1) // b + 1)]

    def free(self, box: tuple[int, int, int, int]) -> bool:
        grown = (box[0] - MARGIN_PX, box[1] - MARGIN_PX, box[2] + MARGIN_PX, box[3] + MARGIN_PX)
        for key in self._keys(grown):
            for other in self.boxes.get(key, ()):
                if grown[0] < other[2] and other[0] < grown[2] and grown[1] < other[3] and other[1] < grown[3]:
                    return False
        return True

    def add(self, box: tuple[int, int, int, int]) -> None:
        for key in self._keys(box):
            self.boxes[key].append(box)


def place_objects(layout: LandCoverLayout, fractions: dict[str, float], rng: np.random.Generator) -> list[SceneObject]:
    """Objects for a scene: per class, a Poisson number of objects in groups on the host cover.

    `fractions` are the land-cover shares of the scene (they set the expected count per class).
    Candidates that leave the scene, leave their host cover, leave the road (cars) or come within
    MARGIN_PX of another object are dropped, so a crowded area simply ends up with fewer objects.
    """
    occupancy = _Occupancy()
    placed: list[SceneObject] = []
    area_mpx = layout.width * layout.height / 1e6
    for cls in OBJECT_CLASSES:
        spec = OBJECT_SPECS[cls]
        target = int(rng.poisson(spec.per_megapixel * area_mpx * fractions[spec.host.value]))
        count = 0
        misses = 0
        while count < target and misses < 8:
            anchor = _anchor(layout, spec.host, rng)
            if anchor is None:
                break
            group = min(int(rng.integers(spec.group[0], spec.group[1] + 1)), target - count)
            added = 0
            # A tank farm is painted alike; cars, ships and planes each have their own colour.
            shared_colour = COLOURS[int(rng.integers(len(COLOURS)))] if spec.same_colour else None
            for cls_, centre, size, rotation in _group_members(cls, spec, anchor, group, layout, rng):
                if added == group:
                    break
                colour = shared_colour or COLOURS[int(rng.integers(len(COLOURS)))]
                obj = _accept(cls_, colour, centre, size, rotation, len(placed), layout, occupancy)
                if obj is not None:
                    placed.append(obj)
                    occupancy.add(obj.bbox)
                    added += 1
            count += added
            misses = misses + 1 if added == 0 else 0
    return placed


def _anchor(layout: LandCoverLayout, host: LandCover, rng: np.random.Generator) -> tuple[float, float] | None:
    """A random point on `host` cover (rejection sampling), or None when none is found."""
    for _ in range(ANCHOR_TRIES // 16):
        xs = rng.uniform(0, layout.width, size=16)
        ys = rng.uniform(0, layout.height, size=16)
        hits = np.flatnonzero(layout.labels_at(xs, ys) == LABEL[host])
        if hits.size:
            return float(xs[hits[0]]), float(ys[hits[0]])
    return None


def _group_members(
    cls: ObjectClass,
    spec: ObjectSpec,
    anchor: tuple[float, float],
    count: int,
    layout: LandCoverLayout,
    rng: np.random.Generator,
) -> list[tuple[ObjectClass, tuple[float, float], float, float]]:
    """Candidate (class, centre, size, rotation) for the members of one group at `anchor`."""
    ax, ay = anchor
    low, high = spec.size_px
    members = []
    if cls is ObjectClass.SHIP:
        # A harbour or anchorage: scattered, roughly parallel.
        heading = rng.uniform(0, 360)
        for _ in range(count * MEMBER_TRIES // 2):
            r = spec.spread_px * math.sqrt(rng.uniform())
            phi = rng.uniform(0, 2 * math.pi)
            centre = (ax + r * math.cos(phi), ay + r * math.sin(phi))
            members.append((cls, centre, rng.uniform(low, high), (heading + rng.normal(0, 20)) % 360))
    elif cls is ObjectClass.CAR:
        # A queue in one lane of the nearest road; lanes drive on the right.
        horizontal = bool(rng.integers(2))
        along, across = (ax, ay) if horizontal else (ay, ax)
        offset = layout.road_offset[1] if horizontal else layout.road_offset[0]
        road = round((across - offset - ROAD_WIDTH_PX / 2) / ROAD_PERIOD_PX)
        forward = bool(rng.integers(2))
        # Heading east the right-hand lane is the lower one; heading south it is the western one.
        right_lane = 0.75 if forward == horizontal else 0.25
        lane = offset + road * ROAD_PERIOD_PX + ROAD_WIDTH_PX * right_lane
        heading = (0.0 if forward else 180.0) + (0.0 if horizontal else 90.0)
        position = along
        for _ in range(count):
            size = rng.uniform(low, high)
            position += size / 2
            centre = (position, lane) if horizontal else (lane, position)
            members.append((cls, centre, size, (heading + rng.normal(0, 1.5)) % 360))
            position += size / 2 + rng.uniform(3, 14)
    elif cls is ObjectClass.PLANE:
        # Parked in a row across their common heading.
        heading = rng.uniform(0, 360)
        size = rng.uniform(low, high)
        across = math.radians(heading + 90)
        for k in range(count):
            step = k * 1.15 * size
            centre = (ax + step * math.cos(across), ay + step * math.sin(across))
            members.append((cls, centre, size * rng.uniform(0.9, 1.0), heading))
    else:
        # A tank farm: a rows x cols grid of equal tanks.
        size = rng.uniform(low, high)
        cols = math.ceil(math.sqrt(count))
        pitch = 1.4 * size
        for k in range(count):
            centre = (ax + (k % cols) * pitch, ay + (k // cols) * pitch)
            members.append((cls, centre, size, 0.0))
    return members


def _accept(
    cls: ObjectClass,
    colour: str,
    centre: tuple[float, float],
    size: float,
    rotation: float,
    object_id: int,
    layout: LandCoverLayout,
    occupancy: _Occupancy,
) -> SceneObject | None:
    """The object if it fits: inside the scene, on its host cover (cars: on the road), not crowding."""
    centre = (round(centre[0], 2), round(centre[1], 2))
    size = round(size, 1)
    rotation = round(rotation, 1) % 360.0
    box = extent(cls, centre, size, rotation)
    if box is None or box[0] < 0 or box[1] < 0 or box[2] > layout.width or box[3] > layout.height:
        return None
    if not occupancy.free(box):
        return None
    width, height = box[2] - box[0], box[3] - box[1]
    host = OBJECT_SPECS[cls].host
    if not (layout.labels(box[0], box[1], width, height) == LABEL[host]).all():
        return None
    if cls is ObjectClass.CAR:
        body, _ = rasterize(cls, centre, size, rotation, box)
        if not layout.road_mask(box[0], box[1], width, height)[body].all():
            return None
    return SceneObject(object_id, cls, colour, centre, size, rotation, box)
