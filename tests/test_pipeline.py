"""Tests of the grain pipeline: sharding, determinism, checkpointing, dropout."""

import numpy as np
import pytest

from md_jax.data import pipeline
from md_jax.data import shapes as S


@pytest.fixture(scope="module")
def tok():
  return pipeline.load_tokenizer()


def _kwargs(tok, **over):
  kw = dict(split="train", image_size=16, global_batch_size=8, seed=5, tokenizer=tok,
            max_length=12, num_records=40, caption_dropout=0.0, num_threads=0)
  kw.update(over)
  return kw


def _iterator(tok, process_index=0, process_count=1, **over):
  return pipeline.make_shapes_iterator(process_index=process_index,
                                       process_count=process_count, **_kwargs(tok, **over))


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_layout(tok):
  batch = next(_iterator(tok, image_size=32, global_batch_size=6, process_count=2,
                         process_index=1))
  assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["input_ids"].shape == (3, 12) and batch["input_ids"].dtype == np.int32
  for k in ("colour", "shape", "position"):
    assert batch[k].shape == (3,) and batch[k].dtype == np.int32
  assert batch["held_out"].shape == (3,) and batch["held_out"].dtype == np.bool_
  assert (batch["input_ids"][:, 0] == tok.bos_token_id).all()


def test_batch_matches_source_records(tok):
  batch = next(_iterator(tok, image_size=16))
  src = S.ShapesSource("train", 16, 40, seed=5)
  by_caption = {}
  for i in range(40):
    r = src[i]
    by_caption.setdefault(pipeline.decode_ids(tok, pipeline.tokenize(tok, r["caption"], 12))[0], r)
  for row, text in enumerate(pipeline.decode_ids(tok, batch["input_ids"])):
    rec = by_caption[text]
    assert batch["colour"][row] == rec["colour"] and batch["position"][row] == rec["position"]
    expected = rec["image"].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"][row], expected, atol=1e-6)


def test_processes_partition_the_global_batch(tok):
  # 40 records, 8 per step: steps 5+ cross into the second (reshuffled) epoch.
  whole = _iterator(tok)
  parts = [_iterator(tok, process_index=p, process_count=2) for p in range(2)]
  quarters = [_iterator(tok, process_index=p, process_count=4) for p in range(4)]
  for _ in range(7):
    g = next(whole)
    halves = [next(it) for it in parts]
    qs = [next(it) for it in quarters]
    for k in g:
      assert np.array_equal(g[k], np.concatenate([h[k] for h in halves])), k
      assert np.array_equal(g[k], np.concatenate([q[k] for q in qs])), k


def test_epochs_are_permutations_and_reshuffled(tok):
  it = _iterator(tok, image_size=16, global_batch_size=10, num_records=20)
  epochs = []
  for _ in range(2):
    images = np.concatenate([next(it)["image"] for _ in range(2)])
    epochs.append(images.reshape(20, -1))
  key = lambda arr: sorted(map(bytes, (arr * 127.5 + 127.5).astype(np.uint8)))
  assert key(epochs[0]) == key(epochs[1])  # same records ...
  assert not np.array_equal(epochs[0], epochs[1])  # ... in a new order


def test_deterministic_order_depends_on_seed(tok):
  a, b, c = _iterator(tok), _iterator(tok), _iterator(tok, seed=6)
  ba, bb, bc = next(a), next(b), next(c)
  assert _equal(ba, bb)
  assert not np.array_equal(ba["image"], bc["image"])


def test_threads_do_not_change_data(tok):
  a, b = _iterator(tok), _iterator(tok, num_threads=2)
  for _ in range(3):
    assert _equal(next(a), next(b))


def test_get_state_set_state(tok):
  it = _iterator(tok)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  following = next(it)
  fresh = _iterator(tok)
  fresh.set_state(state)
  assert _equal(next(fresh), expected)
  assert _equal(next(fresh), following)


def test_orbax_checkpoint_roundtrip(tok, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  it = _iterator(tok, process_count=2, process_index=0)
  next(it)
  next(it)
  ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(it))
  expected = next(it)
  fresh = _iterator(tok, process_count=2, process_index=0)
  ckpt.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(fresh))
  assert _equal(next(fresh), expected)


def test_caption_dropout(tok):
  rows = []
  it = _iterator(tok, caption_dropout=0.5, num_records=400, global_batch_size=40)
  for _ in range(2):
    rows.append(next(it)["input_ids"])
  ids = np.concatenate(rows)
  empty = (ids[:, 1] == tok.eos_token_id)
  assert 0.3 < empty.mean() < 0.7
  assert (ids[empty, 1:] == tok.pad_token_id).all()
  # Dropout is a property of the record: a different process split drops the same.
  halves = [_iterator(tok, caption_dropout=0.5, num_records=400, global_batch_size=40,
                      process_count=2, process_index=p) for p in range(2)]
  assert np.array_equal(np.concatenate([next(h)["input_ids"] for h in halves]), rows[0])
  all_empty = next(_iterator(tok, caption_dropout=1.0))["input_ids"]
  assert (all_empty[:, 1] == tok.eos_token_id).all()
  none_empty = next(_iterator(tok, caption_dropout=0.0))["input_ids"]
  assert not (none_empty[:, 1] == tok.eos_token_id).any()


def test_splits_in_pipeline(tok):
  train = next(_iterator(tok, global_batch_size=40))
  assert not train["held_out"].any()
  held = next(_iterator(tok, split="heldout", global_batch_size=40))
  assert held["held_out"].all()


def test_validation(tok):
  with pytest.raises(ValueError, match="global_batch_size"):
    _iterator(tok, global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    _iterator(tok, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="num_records"):
    _iterator(tok, num_records=4)
  with pytest.raises(ValueError, match="caption_dropout"):
    _iterator(tok, caption_dropout=1.5)


@pytest.mark.slow
def test_worker_processes_give_the_same_data(tok):
  # Worker start-up re-imports the stack (~10 s on a loaded 2-core machine),
  # so one iterator is rewound instead of restoring into a second one.
  ref = _iterator(tok)
  expected = [next(ref) for _ in range(4)]
  it = _iterator(tok, worker_count=2)
  try:
    assert _equal(next(it), expected[0])
    assert _equal(next(it), expected[1])
    state = it.get_state()
    assert _equal(next(it), expected[2])
    assert _equal(next(it), expected[3])
    it.set_state(state)
    assert _equal(next(it), expected[2])
  finally:
    it.close()


def test_prompt_warnings_say_what_a_too_long_prompt_keeps():
  tok = pipeline.load_tokenizer(None)
  assert pipeline.prompt_warnings(tok, "a red circle in the top left corner", 16) == []
  long = "a red circle in the top left corner on a white background and more " * 40
  (message,) = pipeline.prompt_warnings(tok, long, 16)
  assert "more than the text encoder's 16" in message
  assert "only 'a red circle in the top left corner on a white background and' is used" in message
  ids = pipeline.tokenize(tok, long, 16)[0]
  assert tok.decode(ids, skip_special_tokens=True).strip() in message
