"""Procedural judge for the shapes dataset: does an image match its prompt?

No learning is involved, so the judge cannot share a model's blind spots. For
one image it:

1. fits a plane per colour channel to the border pixels (robust to the
   background's gradient; the residual tells a smooth background from noise);
2. segments pixels far (in RGB) from that background; exactly one significant
   connected component must exist, ignoring specks;
3. estimates the object colour and, per pixel, the object opacity `alpha` by
   projecting onto the background -> object colour line; pixels off that line
   mean a second colour, i.e. not one clean object;
4. measures edge width as sum(alpha * (1 - alpha)) / sum(|grad alpha|), which
   is 0.56 * sigma for a Gaussian-blurred step and ~0.2 px for an anti-aliased
   one, so blurry blobs are rejected while slightly soft edges pass;
5. names the colour by nearest palette hue, the shape by the best-fitting
   template (each shape at the measured area and centroid, over a grid of
   rotations; fitting the soft alpha keeps this reliable down to ~9 px
   objects), and the position by the grid cell of the alpha-weighted centroid.

A rejected image (no object, several objects, blurred, ...) scores False on all
three attributes. The thresholds below are frozen by tests/test_shapes_judge.py;
changing them changes reported numbers, so re-pin deliberately.
"""

from __future__ import annotations

import colorsys
import functools
import math
import re
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from md_jax.data.shapes import COLOURS, COLOUR_HUES, POSITIONS, SHAPES

# Words the captions use, mapped to attribute names.
_COLOUR_KEYWORDS = {
    "red": "red", "green": "green", "blue": "blue", "yellow": "yellow",
    "purple": "purple", "violet": "purple", "orange": "orange",
}
_SHAPE_KEYWORDS = {
    "circle": "circle", "disc": "circle", "disk": "circle", "dot": "circle",
    "square": "square", "box": "square",
    "triangle": "triangle",
    "cross": "cross", "plus": "cross",
}
_ROW_KEYWORDS = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_COL_KEYWORDS = {"left": 0, "right": 2}
_CENTER_KEYWORDS = {"center", "centre", "middle", "centered", "central"}

# Segmentation: RGB distance (0..sqrt(3) scale) from the fitted background.
# Background texture stays below ~0.1, object colours are >= ~0.5 away.
DETECT_THRESHOLD = 0.2
BORDER_RESIDUAL_MAX = 0.08      # median border residual of a smooth background
BORDER_INLIER_MIN = 0.6         # share of border pixels the plane must explain
SPECK_FRACTION = 0.004          # components below this share of the image are specks
SECOND_OBJECT_RATIO = 0.1       # ... and below this share of the main one
MIN_OBJECT_FRACTION = 0.01      # smaller main objects cannot be judged
MIN_OBJECT_CHROMA = 0.25        # grey objects have no palette colour
OFF_LINE_RESIDUAL = 0.25        # RGB distance off the background->object line
OFF_LINE_MAX_SHARE = 0.15       # share of object pixels allowed off that line
EDGE_WIDTH_MAX_64 = 0.65        # edge width (px at 64 px) above which = blurred
FIT_ERROR_MAX = 0.3             # L1 template error / area above which = no shape
ANGLE_STEP_DEG = 4.0
CROSS_ARM_RATIO = 0.32          # middle of the dataset's range


def parse_prompt(text: str) -> dict:
  """Colour, shape and position names stated by a prompt (None if missing)."""
  words = re.findall(r"[a-z]+", text.lower())
  colour = next((_COLOUR_KEYWORDS[w] for w in words if w in _COLOUR_KEYWORDS), None)
  shape = next((_SHAPE_KEYWORDS[w] for w in words if w in _SHAPE_KEYWORDS), None)
  row = next((_ROW_KEYWORDS[w] for w in words if w in _ROW_KEYWORDS), None)
  col = next((_COL_KEYWORDS[w] for w in words if w in _COL_KEYWORDS), None)
  if row is None and col is None and not _CENTER_KEYWORDS.intersection(words):
    position = None
  else:
    position = POSITIONS[3 * (1 if row is None else row) + (1 if col is None else col)]
  return dict(colour=colour, shape=shape, position=position)


def from_model_output(images: Any) -> np.ndarray:
  """float images in [-1, 1] (as the models produce) -> uint8 in [0, 255]."""
  x = np.asarray(images, dtype=np.float32)
  return np.round(np.clip((x + 1.0) * 127.5, 0, 255)).astype(np.uint8)


# ---------------------------------------------------------------------------
# Geometry.


def _fit_background(x: np.ndarray):
  """Robust per-channel plane fit to the border ring.

  Returns (bg image, median residual, inlier share).
  """
  h, w = x.shape[:2]
  bw = max(1, int(round(min(h, w) / 32)))
  ring = np.zeros((h, w), bool)
  ring[:bw] = ring[-bw:] = True
  ring[:, :bw] = ring[:, -bw:] = True
  ys, xs = np.nonzero(ring)
  design = np.stack([np.ones(len(ys)), (ys + 0.5) / h - 0.5, (xs + 0.5) / w - 0.5], 1)
  vals = x[ys, xs]
  keep = np.ones(len(ys), bool)
  for _ in range(3):
    coef, *_ = np.linalg.lstsq(design[keep], vals[keep], rcond=None)
    res = np.linalg.norm(vals - design @ coef, axis=1)
    thr = max(0.04, 3.0 * float(np.median(res[keep])))
    keep = res < thr
    if keep.sum() < 3:
      keep[:] = True
      break
  gy = ((np.arange(h) + 0.5) / h - 0.5)[:, None, None]
  gx = ((np.arange(w) + 0.5) / w - 0.5)[None, :, None]
  coef = coef.astype(np.float32)
  bg = coef[0] + gy.astype(np.float32) * coef[1] + gx.astype(np.float32) * coef[2]
  return bg, float(np.median(res)), float(keep.mean())


def _hue_deg(rgb: np.ndarray) -> tuple[float, float]:
  r, g, b = (float(np.clip(c, 0.0, 1.0)) for c in rgb)
  hue, _, _ = colorsys.rgb_to_hsv(r, g, b)
  return hue * 360.0, max(r, g, b) - min(r, g, b)


def _nearest_colour(hue: float) -> str:
  def dist(name):
    d = abs(hue - COLOUR_HUES[name]) % 360.0
    return min(d, 360.0 - d)
  return min(COLOURS, key=dist)


@functools.lru_cache(maxsize=None)
def _angles(period_deg: float) -> np.ndarray:
  return np.deg2rad(np.arange(0.0, period_deg, ANGLE_STEP_DEG))


def _template_errors(alpha: np.ndarray, dy: np.ndarray, dx: np.ndarray,
                     area: float) -> dict:
  """Best L1 error / area of each shape's template (any rotation)."""
  def coverage(sdf):  # anti-aliased coverage from a signed distance in pixels
    return np.clip(0.5 - sdf, 0.0, 1.0)

  def err(cov):
    return np.abs(cov - alpha).sum(axis=-1) / area

  out = {}
  out["circle"] = float(err(coverage(np.hypot(dy, dx) - math.sqrt(area / math.pi))))

  def rotated(period):
    th = _angles(period)[:, None]
    c, s = np.cos(th).astype(np.float32), np.sin(th).astype(np.float32)
    return c * dx + s * dy, -s * dx + c * dy

  px, py = rotated(90.0)
  ax, ay = np.abs(px), np.abs(py)
  half = math.sqrt(area) / 2
  out["square"] = float(err(coverage(np.maximum(ax - half, ay - half))).min())
  k = CROSS_ARM_RATIO
  a = math.sqrt(area / (8 * k - 4 * k * k))
  b = k * a
  sdf = np.minimum(np.maximum(ax - a, ay - b), np.maximum(ax - b, ay - a))
  out["cross"] = float(err(coverage(sdf)).min())

  px, py = rotated(120.0)
  apothem = math.sqrt(area / (3 * math.sqrt(3)))
  sdf = None
  for j in range(3):
    t = math.pi / 2 + j * 2 * math.pi / 3
    d = math.cos(t) * px + math.sin(t) * py - apothem
    sdf = d if sdf is None else np.maximum(sdf, d)
  out["triangle"] = float(err(coverage(sdf)).min())
  return out


def _reject(reason: str, detected=None) -> dict:
  return dict(colour=False, shape=False, position=False, detected=detected,
              reason=reason)


def analyse(image: np.ndarray, require_sharp: bool = True) -> dict:
  """Detects the single object of an image.

  Returns dict(ok, reason, and when ok: colour, shape, position names plus
  diagnostics hue, chroma, area (share of the image), centroid (relative y, x),
  edge_width (px at 64 px), fit_error, fit_errors per shape).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f"expected a uint8 image, got {image.dtype}; "
                    "use from_model_output() for [-1, 1] floats")
  if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 16:
    raise ValueError(f"expected an (H, W, 3) image with H, W >= 16, got {image.shape}")
  x = image.astype(np.float32) / 255.0
  h, w = x.shape[:2]
  bg, border_res, inliers = _fit_background(x)
  if border_res > BORDER_RESIDUAL_MAX or inliers < BORDER_INLIER_MIN:
    return dict(ok=False, reason="background not uniform")
  diff = x - bg
  dist = np.linalg.norm(diff, axis=-1)
  labels, n = ndimage.label(dist > DETECT_THRESHOLD, structure=np.ones((3, 3)))
  if n == 0:
    return dict(ok=False, reason="no object")
  sizes = np.bincount(labels.ravel())[1:]
  main = int(np.argmax(sizes))
  significant = sizes >= max(SPECK_FRACTION * h * w, SECOND_OBJECT_RATIO * sizes[main])
  if significant.sum() > 1:
    return dict(ok=False, reason="multiple objects")
  if sizes[main] < MIN_OBJECT_FRACTION * h * w:
    return dict(ok=False, reason="no object")
  comp = labels == main + 1

  # Object colour from its most distinct pixels (the interior, not the edge).
  d_comp = dist[comp]
  core = comp & (dist >= 0.85 * np.percentile(d_comp, 90))
  obj = np.median(x[core], axis=0)
  hue, chroma = _hue_deg(obj)
  if chroma < MIN_OBJECT_CHROMA:
    return dict(ok=False, reason="object not coloured")

  # Opacity by projection onto the background -> object line, in a band around
  # the component so that edge pixels below the detection threshold count.
  grow = max(2, int(round(min(h, w) / 16)))
  region = ndimage.binary_dilation(comp, iterations=grow)
  span = obj - bg[region]
  rel = diff[region]
  t = np.clip((rel * span).sum(-1) / np.maximum((span * span).sum(-1), 1e-6), 0.0, 1.0)
  off = np.linalg.norm(rel - t[:, None] * span, axis=-1)
  if np.mean(off[comp[region]] > OFF_LINE_RESIDUAL) > OFF_LINE_MAX_SHARE:
    return dict(ok=False, reason="object not one colour")
  alpha = np.zeros((h, w), np.float32)
  # Texture/noise moves alpha a little around 0 and 1; only the ramp counts.
  alpha[region] = np.clip((t - 0.1) / 0.8, 0.0, 1.0)

  area = float(alpha.sum())
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  cy = float((alpha * yy).sum() / area)
  cx = float((alpha * xx).sum() / area)

  gy, gx = np.gradient(alpha)
  grad = float(np.hypot(gy, gx).sum())
  edge_width = float((alpha * (1 - alpha)).sum() / max(grad, 1e-6)) * 64.0 / min(h, w)
  detected = dict(
      hue=round(hue, 3), chroma=round(chroma, 4), area=round(area / (h * w), 5),
      centroid=(round(cy / h, 5), round(cx / w, 5)), edge_width=round(edge_width, 4))
  if require_sharp and edge_width > EDGE_WIDTH_MAX_64:
    return dict(ok=False, reason="object not sharp", **detected)

  sel = region
  dy, dx = yy[sel] - cy, xx[sel] - cx
  errors = _template_errors(alpha[sel], dy, dx, area)
  shape = min(SHAPES, key=lambda s: errors[s])
  detected.update(fit_error=round(errors[shape], 4),
                  fit_errors={s: round(errors[s], 4) for s in SHAPES})
  if require_sharp and errors[shape] > FIT_ERROR_MAX:
    return dict(ok=False, reason="shape not recognised", **detected)
  row = min(2, max(0, int(3 * cy / h)))
  col = min(2, max(0, int(3 * cx / w)))
  return dict(ok=True, reason="ok", colour=_nearest_colour(hue), shape=shape,
              position=POSITIONS[3 * row + col], **detected)


def judge(image: np.ndarray, prompt: str, require_sharp: bool = True) -> dict:
  """dict(colour, shape, position: bool, detected: dict | None, reason: str).

  detected holds the analysis (names and diagnostics) or None when the image
  was rejected before an object was found; a rejected image is wrong on all
  three attributes. ``require_sharp=False`` is a diagnostic only (it never replaces the
  official score): it skips the sharpness and template-fit checks, to tell how close blurry
  samples are to the right attributes.
  """
  want = parse_prompt(prompt)
  found = analyse(image, require_sharp=require_sharp)
  if not found["ok"]:
    diag = {k: v for k, v in found.items() if k not in ("ok", "reason")}
    return _reject(found["reason"], diag or None)
  detected = {k: v for k, v in found.items() if k not in ("ok", "reason")}
  return dict(
      colour=want["colour"] is not None and want["colour"] == found["colour"],
      shape=want["shape"] is not None and want["shape"] == found["shape"],
      position=want["position"] is not None and want["position"] == found["position"],
      detected=detected,
      reason="ok",
  )


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95% Wilson score interval of a binomial proportion."""
  if n == 0:
    return (0.0, 1.0)
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, centre - half), min(1.0, centre + half))


_KEYS = ("colour", "shape", "position", "all")


def _summarise(results: Sequence[dict]) -> dict:
  n = len(results)
  out: dict[str, Any] = {"n": n}
  for key in _KEYS:
    if key == "all":
      k = sum(r["colour"] and r["shape"] and r["position"] for r in results)
    else:
      k = sum(bool(r[key]) for r in results)
    out[key] = k / n if n else float("nan")
    out[key + "_ci"] = wilson_interval(k, n)
  out["rejected"] = (sum(r["reason"] != "ok" for r in results) / n) if n else float("nan")
  # Sharpness: the median edge width (px at 64 px; blurred above EDGE_WIDTH_MAX_64) over the
  # images where one coloured object was found, sharp or not, with how many those are. The
  # accuracies cannot rank two sets of blurred samples (both rejected); this can.
  edges = [r["detected"]["edge_width"] for r in results
           if r.get("detected") and "edge_width" in r["detected"]]
  out["edge_width_median"] = float(np.median(edges)) if edges else float("nan")
  out["edge_width_median_ci"] = median_interval(edges)
  out["edge_width_n"] = len(edges)
  return out


def median_interval(values: Sequence[float], z: float = 1.959964) -> tuple[float, float]:
  """Distribution-free ~95% interval of a median: the order statistics of (1-based) ranks
  floor(n/2 - z*sqrt(n)/2) and ceil(1 + n/2 + z*sqrt(n)/2), from the normal approximation of
  Binomial(n, 1/2), clipped to the sample; (nan, nan) when empty."""
  x = np.sort(np.asarray(values, np.float64))
  n = len(x)
  if not n:
    return (float("nan"), float("nan"))
  half = z * math.sqrt(n) / 2
  lo = max(1, int(math.floor(n / 2 - half)))
  hi = min(n, int(math.ceil(1 + n / 2 + half)))
  return (float(x[lo - 1]), float(x[hi - 1]))


def score(images: Sequence[np.ndarray], prompts: Sequence[str],
          held_out: Sequence[bool] | None = None, require_sharp: bool = True) -> dict:
  """Accuracies with 95% Wilson intervals over a set of (image, prompt) pairs.

  Returns dict(n, colour, shape, position, all (all three right), each with a
  `<key>_ci` (lo, hi) interval, rejected (share of rejected images), edge_width_median with
  its edge_width_median_ci and edge_width_n (see _summarise)); when
  held_out is given, also 'held_out' and 'seen': the same for each subset.
  """
  images = list(images)
  prompts = list(prompts)
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
  results = [judge(im, p, require_sharp=require_sharp) for im, p in zip(images, prompts)]
  return summarise(results, held_out)


def summarise(results: Sequence[dict], held_out: Sequence[bool] | None = None) -> dict:
  """score()'s summary of verdicts already returned by judge()."""
  out = _summarise(results)
  if held_out is not None:
    held_out = [bool(h) for h in held_out]
    if len(held_out) != len(results):
      raise ValueError(f"{len(held_out)} held_out flags for {len(results)} images")
    out["held_out"] = _summarise([r for r, h in zip(results, held_out) if h])
    out["seen"] = _summarise([r for r, h in zip(results, held_out) if not h])
  return out


def chance() -> dict:
  """Accuracy of guessing uniformly (for a perfect detector and random prompts)."""
  c, s, p = 1 / len(COLOURS), 1 / len(SHAPES), 1 / len(POSITIONS)
  return dict(colour=c, shape=s, position=p, all=c * s * p)
