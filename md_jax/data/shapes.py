"""Procedural "shapes" text-to-image dataset.

One saturated, coloured object (circle, square, triangle or plus-shaped cross)
on a neutral, faintly textured background, with a caption in varied wording
that always states colour, shape and position. Everything is generated from a
seed, so the whole training pipeline runs without downloading anything.

The caption deliberately leaves object size, placement jitter inside its grid
cell, rotation, colour jitter and the background texture unspecified, so the
caption-conditional mean image is blurry, as it is for real data; a model has
to learn a distribution, not a lookup table.

All geometry is defined in relative coordinates ([0, 1] across the image) and
all random draws happen before anything size-dependent, so a record rendered at
32 px is (up to rounding) the box-downsampled version of the same record at
64 px.
"""

from __future__ import annotations

import colorsys
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

# Compositional generalisation probe: these (colour, shape) pairs never occur in
# the training split. Each colour and each shape is used at most once, so every
# colour is still seen with three shapes and every shape with five colours.
HELD_OUT = (
    ("blue", "triangle"),
    ("red", "cross"),
    ("yellow", "circle"),
    ("green", "square"),
)
HELD_OUT_IDS = frozenset((COLOURS.index(c), SHAPES.index(s)) for c, s in HELD_OUT)

SPLITS = ("train", "eval", "heldout")

# Hue in degrees. Neighbouring hues are >= 28 degrees apart while the per-image
# jitter is +-4 degrees, so the colour name is never ambiguous.
COLOUR_HUES = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 58.0,
    "green": 125.0,
    "blue": 222.0,
    "purple": 282.0,
}
HUE_JITTER_DEG = 4.0

# Object extent, as the diameter of a reference circle relative to the side.
SIZE_RANGE = (0.28, 0.42)
# Circumradius per unit size; chosen so the four shapes have similar visual
# weight (a triangle with the circle's circumradius looks much smaller).
CIRCUMRADIUS_FACTOR = {"circle": 0.45, "square": 0.55, "triangle": 0.6, "cross": 0.55}
CROSS_ARM_RATIO = (0.28, 0.36)  # arm half-thickness / arm half-length
POSITION_JITTER = 0.07
EDGE_MARGIN = 0.03

# name -> (base RGB, lightness jitter range). Chroma stays <= ~0.17, far below
# any object colour (>= ~0.65), so the object is always separable by colour.
BACKGROUNDS = {
    "white": ((0.95, 0.95, 0.95), (0.93, 1.02)),
    "light gray": ((0.75, 0.75, 0.75), (0.92, 1.07)),
    "gray": ((0.52, 0.52, 0.52), (0.88, 1.10)),
    "dark gray": ((0.27, 0.27, 0.27), (0.80, 1.15)),
    "black": ((0.07, 0.07, 0.07), (0.50, 1.60)),
    "beige": ((0.93, 0.87, 0.76), (0.92, 1.04)),
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
TEXTURES = ("noise", "gradient", "stripes")

SUPERSAMPLE = 4

# ---------------------------------------------------------------------------
# Caption wording. Kept as plain data so the tokenizer generator can enumerate
# the exact vocabulary.

COLOUR_WORDS = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign", "plus"),
}
BACKGROUND_WORDS = {
    "white": ("white", "light"),
    "light gray": ("light gray", "pale gray"),
    "gray": ("gray", "grey"),
    "dark gray": ("dark gray", "dark"),
    "black": ("black", "dark"),
    "beige": ("beige", "cream"),
}
_VERTICAL = {0: ("top", "upper"), 2: ("bottom", "lower")}
_HORIZONTAL = {0: ("left",), 2: ("right",)}
_CORNER_PHRASES = ("in the {v} {h} corner", "at the {v} {h}", "in the {v} {h}",
                   "at the {v} {h} corner", "near the {v} {h} corner")
_VERTICAL_EDGE_PHRASES = ("at the {v}", "at the {v} center", "in the {v} middle",
                          "along the {v} edge", "near the {v}")
_HORIZONTAL_EDGE_PHRASES = ("on the {h}", "on the {h} side", "at the {h} edge",
                            "in the middle {h}", "near the {h} side")
_CENTER_PHRASES = ("in the center", "in the middle", "at the center", "in the centre",
                   "at the middle")
# {o}: object phrase with article, {n}: object phrase without article,
# {p}: position phrase, {b}: background word(s).
_TEMPLATES = (
    "{o} {p}",
    "{o} {p}",
    "{n} {p}",
    "{p}, {o}",
    "a photo of {o} {p}",
    "an image of {o} {p}",
    "a picture of {o} {p}",
    "a drawing of {o} {p}",
    "there is {o} {p}",
    "one {n} {p}",
    "a single {n} {p}",
    "{o} placed {p}",
)
_BACKGROUND_TEMPLATES = (
    "{s} on a {b} background",
    "{s}, {b} background",
    "{s} against a {b} background",
    "{s} with a {b} background",
)
BACKGROUND_MENTION_PROB = 0.35


def _as_index(value, names: Sequence[str]) -> int:
  if isinstance(value, str):
    return names.index(value)
  return int(value)


def attrs_to_names(attrs: Mapping[str, Any]) -> dict:
  """Returns colour/shape/position as names whatever their encoding in attrs."""
  return dict(
      colour=COLOURS[_as_index(attrs["colour"], COLOURS)],
      shape=SHAPES[_as_index(attrs["shape"], SHAPES)],
      position=POSITIONS[_as_index(attrs["position"], POSITIONS)],
  )


def is_held_out(colour, shape) -> bool:
  return (_as_index(colour, COLOURS), _as_index(shape, SHAPES)) in HELD_OUT_IDS


def position_cell(position) -> tuple[int, int]:
  """(row, column) of a position in the 3x3 grid; row 0 is the top."""
  return divmod(_as_index(position, POSITIONS), 3)


# ---------------------------------------------------------------------------
# Scenes.


def _pick(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def sample_object(attrs: Mapping[str, Any], rng: np.random.Generator) -> dict:
  """Draws the nuisance parameters (size, jitter, rotation, tint) of one object."""
  colour = COLOURS[_as_index(attrs["colour"], COLOURS)]
  shape = SHAPES[_as_index(attrs["shape"], SHAPES)]
  row, col = position_cell(attrs["position"])
  size = rng.uniform(*SIZE_RANGE)
  radius = CIRCUMRADIUS_FACTOR[shape] * size
  jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
  lo, hi = radius + EDGE_MARGIN, 1.0 - radius - EDGE_MARGIN
  # Keep the whole object inside the image: a cropped shape would change its
  # outline, and the centroid stays inside the cell (cells are 1/3 wide).
  cy = float(np.clip((row + 0.5) / 3 + jitter[0], lo, hi))
  cx = float(np.clip((col + 0.5) / 3 + jitter[1], lo, hi))
  angle = rng.uniform(0.0, 2 * math.pi)
  arm_ratio = rng.uniform(*CROSS_ARM_RATIO)
  hue = (COLOUR_HUES[colour] + rng.uniform(-HUE_JITTER_DEG, HUE_JITTER_DEG)) / 360.0
  sat = rng.uniform(0.8, 1.0)
  val = rng.uniform(0.85, 1.0)
  rgb = colorsys.hsv_to_rgb(hue % 1.0, sat, val)
  return dict(shape=shape, colour=colour, center=(cy, cx), radius=float(radius),
              angle=float(angle), arm_ratio=float(arm_ratio),
              rgb=tuple(float(c) for c in rgb))


def sample_background(rng: np.random.Generator) -> dict:
  name = _pick(rng, BACKGROUND_NAMES)
  base, (lo, hi) = BACKGROUNDS[name]
  scale = rng.uniform(lo, hi)
  tint = rng.uniform(-0.015, 0.015, size=3)
  rgb = np.clip(np.asarray(base) * scale + tint, 0.02, 0.98)
  texture = _pick(rng, TEXTURES)
  # Lattices of random values define the noise; their shape never depends on
  # the output size, which keeps images consistent across resolutions.
  coarse = rng.uniform(-1, 1, size=(5, 5))
  fine = rng.uniform(-1, 1, size=(17, 17))
  return dict(
      name=name,
      rgb=tuple(float(c) for c in rgb),
      texture=texture,
      noise_amp=float(rng.uniform(0.02, 0.045)),
      grad_amp=float(rng.uniform(0.03, 0.07)),
      grad_angle=float(rng.uniform(0, 2 * math.pi)),
      stripe_amp=float(rng.uniform(0.015, 0.03)),
      stripe_freq=float(rng.uniform(4.0, 9.0)),
      stripe_angle=float(rng.uniform(0, math.pi)),
      stripe_phase=float(rng.uniform(0, 2 * math.pi)),
      grain_amp=float(rng.uniform(0.005, 0.012)),
      coarse=coarse,
      fine=fine,
  )


def sample_scene(attrs: Mapping[str, Any], rng: np.random.Generator) -> dict:
  """Scene = background + a list of objects; render_scene draws it at any size."""
  obj = sample_object(attrs, rng)
  return dict(background=sample_background(rng), objects=[obj])


def _box_weights(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Supersampled pixel centres and the (size, size*SS) box-averaging matrix."""
  n = size * SUPERSAMPLE
  u = (np.arange(n) + 0.5) / n
  down = np.kron(np.eye(size), np.full((1, SUPERSAMPLE), 1.0 / SUPERSAMPLE))
  return u, down


def _lattice_weights(u: np.ndarray, cells: int) -> np.ndarray:
  """(len(u), cells) bilinear-interpolation weights of a value-noise lattice."""
  t = u * (cells - 1)
  i0 = np.clip(np.floor(t).astype(int), 0, cells - 2)
  f = t - i0
  f = f * f * (3 - 2 * f)  # smoothstep hides the lattice grid lines
  w = np.zeros((len(u), cells))
  w[np.arange(len(u)), i0] = 1 - f
  w[np.arange(len(u)), i0 + 1] += f
  return w


def render_background(bg: Mapping[str, Any], size: int) -> np.ndarray:
  """Float (size, size, 3) background, box-filtered from the supersampled grid.

  Every texture term is separable (a sum of outer products of 1-D profiles), so
  the box filter is applied to the profiles and the cost is a few tiny matmuls.
  """
  u, down = _box_weights(size)
  wc = down @ _lattice_weights(u, bg["coarse"].shape[0])
  wf = down @ _lattice_weights(u, bg["fine"].shape[0])
  lum = bg["grain_amp"] * (wf @ bg["fine"] @ wf.T)
  texture = bg["texture"]
  if texture == "noise":
    lum += bg["noise_amp"] * (wc @ bg["coarse"] @ wc.T)
  elif texture == "gradient":
    gy = down @ (u - 0.5)
    gx = down @ (u - 0.5)
    a = bg["grad_angle"]
    lum += 2 * bg["grad_amp"] * (math.sin(a) * gy[:, None] + math.cos(a) * gx[None, :])
  else:
    k = 2 * math.pi * bg["stripe_freq"]
    ky = k * math.sin(bg["stripe_angle"])
    kx = k * math.cos(bg["stripe_angle"])
    ph = bg["stripe_phase"]
    # sin(ky*y + kx*x + ph) split into separable parts.
    sy, cy = down @ np.sin(ky * u + ph), down @ np.cos(ky * u + ph)
    sx, cx = down @ np.sin(kx * u), down @ np.cos(kx * u)
    lum += bg["stripe_amp"] * (np.outer(sy, cx) + np.outer(cy, sx))
  return np.asarray(bg["rgb"])[None, None, :] + lum[:, :, None]


def _inside(obj: Mapping[str, Any], y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Boolean membership of points (relative coords, broadcastable) in obj."""
  cy, cx = obj["center"]
  r = obj["radius"]
  dy, dx = y - cy, x - cx
  shape = obj["shape"]
  if shape == "circle":
    return dy * dy + dx * dx <= r * r
  c, s = math.cos(obj["angle"]), math.sin(obj["angle"])
  # Rotate the points into the shape frame instead of rotating the shape.
  px = c * dx + s * dy
  py = -s * dx + c * dy
  if shape == "square":
    h = r / math.sqrt(2)
    return (np.abs(px) <= h) & (np.abs(py) <= h)
  if shape == "triangle":
    inside = np.ones(np.broadcast(px, py).shape, bool)
    apothem = r / 2  # inradius of an equilateral triangle
    for k in range(3):
      t = math.pi / 2 + k * 2 * math.pi / 3  # outward edge normals
      inside &= (math.cos(t) * px + math.sin(t) * py) <= apothem
    return inside
  if shape == "cross":
    k = obj["arm_ratio"]
    a = r / math.sqrt(1 + k * k)
    b = k * a
    ax, ay = np.abs(px), np.abs(py)
    return ((ax <= a) & (ay <= b)) | ((ax <= b) & (ay <= a))
  raise ValueError(f"unknown shape {shape!r}")


def object_coverage(obj: Mapping[str, Any], size: int) -> np.ndarray:
  """Anti-aliased (size, size) coverage in [0, 1] via 4x4 supersampling."""
  ss = SUPERSAMPLE
  n = size * ss
  cov = np.zeros((size, size), np.float32)
  cy, cx = obj["center"]
  r = obj["radius"]
  # Only the object's bounding box is supersampled, aligned to whole pixels.
  y0 = max(0, int(math.floor((cy - r) * size)) - 1)
  y1 = min(size, int(math.ceil((cy + r) * size)) + 1)
  x0 = max(0, int(math.floor((cx - r) * size)) - 1)
  x1 = min(size, int(math.ceil((cx + r) * size)) + 1)
  if y1 <= y0 or x1 <= x0:
    return cov
  ys = (np.arange(y0 * ss, y1 * ss) + 0.5) / n
  xs = (np.arange(x0 * ss, x1 * ss) + 0.5) / n
  hit = _inside(obj, ys[:, None], xs[None, :]).astype(np.float32)
  hit = hit.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
  cov[y0:y1, x0:x1] = hit
  return cov


def render_scene(scene: Mapping[str, Any], size: int) -> np.ndarray:
  """uint8 (size, size, 3) image of a scene; size a multiple of 8, >= 16."""
  if size < 16 or size % 8:
    raise ValueError(f"size must be a multiple of 8 and >= 16, got {size}")
  img = render_background(scene["background"], size)
  for obj in scene["objects"]:
    a = object_coverage(obj, size)[:, :, None]
    img = img * (1 - a) + np.asarray(obj["rgb"])[None, None, :] * a
  return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def render(attrs: Mapping[str, Any], size: int, rng: np.random.Generator) -> np.ndarray:
  """Renders one object with the given colour/shape/position (ints or names)."""
  return render_scene(sample_scene(attrs, rng), size)


# ---------------------------------------------------------------------------
# Captions.


def _position_phrase(position, rng: np.random.Generator) -> str:
  row, col = position_cell(position)
  if row != 1 and col != 1:
    template = _pick(rng, _CORNER_PHRASES)
  elif row != 1:
    template = _pick(rng, _VERTICAL_EDGE_PHRASES)
  elif col != 1:
    template = _pick(rng, _HORIZONTAL_EDGE_PHRASES)
  else:
    return _pick(rng, _CENTER_PHRASES)
  v = _pick(rng, _VERTICAL[row]) if row != 1 else ""
  h = _pick(rng, _HORIZONTAL[col]) if col != 1 else ""
  return template.format(v=v, h=h)


def _synonym(rng: np.random.Generator, words: Sequence[str]) -> str:
  # The canonical word (first) is used half of the time so it dominates.
  if len(words) == 1 or rng.random() < 0.5:
    return words[0]
  return words[1 + int(rng.integers(len(words) - 1))]


def _with_article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(attrs: Mapping[str, Any], rng: np.random.Generator,
            background: str | None = None) -> str:
  """A caption stating colour, shape and position; background sometimes.

  background: the background name (a key of BACKGROUNDS); if None, taken from
  attrs["background"] when present, otherwise never mentioned.
  """
  names = attrs_to_names(attrs)
  colour = _synonym(rng, COLOUR_WORDS[names["colour"]])
  shape = _synonym(rng, SHAPE_WORDS[names["shape"]])
  bare = f"{colour} {shape}"
  text = _pick(rng, _TEMPLATES).format(
      o=_with_article(bare), n=bare, p=_position_phrase(names["position"], rng))
  if background is None:
    background = attrs.get("background")
  if background is not None and rng.random() < BACKGROUND_MENTION_PROB:
    word = _synonym(rng, BACKGROUND_WORDS[background])
    text = _pick(rng, _BACKGROUND_TEMPLATES).format(s=text, b=word)
  return text


def caption_vocabulary() -> tuple[str, ...]:
  """Every word any caption can contain (sorted), for building the tokenizer."""
  pieces = [*_TEMPLATES, *_BACKGROUND_TEMPLATES, *_CORNER_PHRASES,
            *_VERTICAL_EDGE_PHRASES, *_HORIZONTAL_EDGE_PHRASES, *_CENTER_PHRASES,
            "a an"]
  for table in (COLOUR_WORDS, SHAPE_WORDS, BACKGROUND_WORDS, _VERTICAL, _HORIZONTAL):
    for words in table.values():
      pieces.extend(words)
  words = set()
  for piece in pieces:
    words.update(re.findall(r"[a-z]+", re.sub(r"\{[a-z]\}", " ", piece)))
  return tuple(sorted(words))


# ---------------------------------------------------------------------------
# Records.


def _split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return SPLITS.index(split)


_TRAIN_PAIRS = tuple((c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))
                     if (c, s) not in HELD_OUT_IDS)
_HELD_OUT_PAIRS = tuple(sorted(HELD_OUT_IDS))
_ALL_PAIRS = tuple((c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES)))


def _balanced_combo(index: int, pairs: Sequence[tuple[int, int]], seed: int,
                    split_id: int) -> tuple[int, int, int]:
  """Cycles through every (pair, position) combination in a seeded order.

  Any block of len(pairs) * 9 consecutive indices covers each combination
  exactly once, so even small evaluation sets are balanced.
  """
  n = len(pairs) * len(POSITIONS)
  block, offset = divmod(index, n)
  order = np.random.default_rng([seed, split_id, block, 0xBA1]).permutation(n)
  combo = int(order[offset])
  (c, s), p = pairs[combo % len(pairs)], combo // len(pairs)
  return c, s, p


def make_record(split: str, index: int, size: int, seed: int = 0) -> dict:
  """The record (image, caption, labels) at `index` of `split`, deterministic."""
  split_id = _split_id(split)
  rng = np.random.default_rng([seed, split_id, index])
  if split == "train":
    c, s = _TRAIN_PAIRS[int(rng.integers(len(_TRAIN_PAIRS)))]
    p = int(rng.integers(len(POSITIONS)))
  else:
    pairs = _ALL_PAIRS if split == "eval" else _HELD_OUT_PAIRS
    c, s, p = _balanced_combo(index, pairs, seed, split_id)
  attrs = dict(colour=c, shape=s, position=p)
  scene = sample_scene(attrs, rng)
  text = caption(attrs, rng, background=scene["background"]["name"])
  return dict(
      image=render_scene(scene, size),
      caption=text,
      colour=c,
      shape=s,
      position=p,
      held_out=(c, s) in HELD_OUT_IDS,
  )


class ShapesSource:
  """grain RandomAccessDataSource of shapes records.

  Record i of a split is a pure function of (seed, split, i): 'train' never
  contains HELD_OUT pairs, 'heldout' only those, 'eval' all pairs (balanced).
  """

  def __init__(self, split: str = "train", size: int = 64,
               num_records: int = 1_000_000, seed: int = 0):
    _split_id(split)
    if size < 16 or size % 8:
      raise ValueError(f"size must be a multiple of 8 and >= 16, got {size}")
    if num_records <= 0:
      raise ValueError(f"num_records must be positive, got {num_records}")
    self.split = split
    self.size = int(size)
    self.num_records = int(num_records)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index) -> dict:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"record {index} out of range [0, {self.num_records})")
    return make_record(self.split, index, self.size, self.seed)

  def __repr__(self) -> str:
    return (f"ShapesSource(split={self.split!r}, size={self.size}, "
            f"num_records={self.num_records}, seed={self.seed})")


def eval_prompts(n: int, seed: int = 0, held_out_fraction: float = 0.25
                 ) -> list[tuple[str, dict]]:
  """n evaluation prompts: (caption, dict(colour, shape, position, held_out)).

  round(n * held_out_fraction) prompts use HELD_OUT pairs, the rest the training
  pairs; each part cycles through all its (pair, position) combinations in a
  seeded order, so both parts are balanced. Attribute values are indices into
  COLOURS / SHAPES / POSITIONS.
  """
  n_held = int(round(n * held_out_fraction))
  out = []
  for i in range(n):
    held = i < n_held
    pairs = _HELD_OUT_PAIRS if held else _TRAIN_PAIRS
    j = i if held else i - n_held
    c, s, p = _balanced_combo(j, pairs, seed, 10 + int(held))
    rng = np.random.default_rng([seed, 0xE7A1, i])
    attrs = dict(colour=c, shape=s, position=p)
    out.append((caption(attrs, rng), dict(attrs, held_out=held)))
  # Interleave the two parts so any prefix has about the same mix.
  order = np.random.default_rng([seed, 0x5EED]).permutation(n)
  return [out[k] for k in order]

