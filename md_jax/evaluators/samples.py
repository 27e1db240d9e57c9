"""Sample grids: gather generated images from every device/host, tile them, write PNGs."""

from __future__ import annotations

import os

import jax
import numpy as np
from PIL import Image


def gather_to_host(x: jax.Array) -> np.ndarray:
  """The full global array on every host (works for arrays spread over several processes)."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """Tiles (N, H, W, C) uint8 images row-major into one image."""
  n, h, w, c = images.shape
  columns = max(1, min(columns, n))
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(image: np.ndarray, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(image)).save(path)
  return path


def _font(size: int):
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
  if hi <= lo:
    lo, hi = lo - 0.5, hi + 0.5
  pad = 0.05 * (hi - lo)  # keep points off the frame
  lo, hi = lo - pad, hi + pad
  raw = (hi - lo) / max(n - 1, 1)
  mag = 10 ** np.floor(np.log10(raw))
  step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
  return np.arange(np.floor(lo / step), np.ceil(hi / step) + 0.5) * step


def curve_png(points, path: str, *, xlabel: str, ylabel: str, title: str = "",
              labels=None, size=(720, 520)) -> str:
  """A line plot of (x, y) points in the given order, each point annotated with its label (the
  CFG scale of an FID-vs-CLIP sweep), written as a PNG with PIL alone."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  pts = np.asarray(points, np.float64).reshape(-1, 2)
  finite = pts[np.all(np.isfinite(pts), axis=1)]
  w, h = size
  left, right, top, bottom = 90, 30, 50 if title else 25, 70
  img = Image.new("RGB", (w, h), "white")
  draw = ImageDraw.Draw(img)
  font, small = _font(15), _font(12)
  if len(finite):
    xt = _ticks(finite[:, 0].min(), finite[:, 0].max())
    yt = _ticks(finite[:, 1].min(), finite[:, 1].max())
  else:
    xt = yt = np.arange(0.0, 1.01, 0.25)
  x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
  px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
  py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
  for x in xt:
    draw.line([(px(x), top), (px(x), h - bottom)], fill=(225, 225, 225))
    draw.text((px(x), h - bottom + 6), f"{x:.4g}", fill="black", font=small, anchor="ma")
  for y in yt:
    draw.line([(left, py(y)), (w - right, py(y))], fill=(225, 225, 225))
    draw.text((left - 6, py(y)), f"{y:.4g}", fill="black", font=small, anchor="rm")
  draw.rectangle([left, top, w - right, h - bottom], outline="black")
  xy = [(px(x), py(y)) for x, y in pts if np.isfinite(x) and np.isfinite(y)]
  if len(xy) > 1:
    draw.line(xy, fill=(31, 119, 180), width=2)
  labels = list(labels) if labels is not None else [""] * len(pts)
  for (x, y), lab in zip(pts, labels):
    if not (np.isfinite(x) and np.isfinite(y)):
      continue
    cx, cy = px(x), py(y)
    draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(31, 119, 180))
    if lab:
      draw.text((cx + 7, cy - 7), str(lab), fill=(60, 60, 60), font=small, anchor="ld")
  draw.text(((left + w - right) / 2, h - 22), xlabel, fill="black", font=font, anchor="mm")
  label_img = Image.new("RGB", (h - top - bottom, 24), "white")
  ImageDraw.Draw(label_img).text((label_img.width / 2, 12), ylabel, fill="black", font=font,
                                 anchor="mm")
  img.paste(label_img.rotate(90, expand=True), (8, top))
  if title:
    draw.text((w / 2, 20), title, fill="black", font=font, anchor="mm")
  return save_png(np.asarray(img), path)
