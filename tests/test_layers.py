"""The CPU conv path: same forward as XLA's conv, same gradients (kernel grads via matmuls)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax.models import layers


@pytest.mark.parametrize("shape,k,stride", [((2, 8, 8, 3), 3, 1), ((2, 9, 7, 4), 3, 2),
                                            ((1, 8, 8, 5), 1, 1), ((2, 16, 16, 4), 3, 2)])
def test_conv_gradients_match_xla(shape, k, stride):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (k, k, shape[-1], 6)) * 0.3
  out_ref = layers._xla_conv(x, w, stride)  # pylint: disable=protected-access
  g = jax.random.normal(kg, out_ref.shape)

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w, stride) * g)

  ref = jax.grad(loss(layers._xla_conv), argnums=(0, 1))(x, w)  # pylint: disable=protected-access
  got = jax.grad(loss(layers._conv_matmul_wgrad), argnums=(0, 1))(x, w)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(layers._conv_matmul_wgrad(x, w, stride)),  # pylint: disable=protected-access
                             np.asarray(out_ref), rtol=1e-6, atol=1e-6)
  for a, b in zip(ref, got):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def test_conv_forward_is_a_plain_convolution():
  """Export sees the primal: one conv_general_dilated, no matmul rewrite."""
  x = jnp.ones((1, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))
  jaxpr = jax.make_jaxpr(lambda x, w: layers.conv2d(x, w))(x, w)
  assert "conv_general_dilated" in str(jaxpr)


def test_upsample_nearest_matches_resize_including_the_1x1_case():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import upsample_nearest_2x  # pylint: disable=g-import-not-at-top
  for h, w in ((1, 1), (2, 3), (4, 4)):
    x = jnp.asarray(np.random.default_rng(h * 10 + w).normal(size=(2, h, w, 3)), jnp.float32)
    ref = jax.image.resize(x, (2, 2 * h, 2 * w, 3), method="nearest")
    np.testing.assert_array_equal(np.asarray(upsample_nearest_2x(x)), np.asarray(ref))
