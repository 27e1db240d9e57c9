"""(Re)generates the tiny CLIP-style BPE tokenizer of the shapes dataset.

    python -m md_jax.data.make_shapes_tokenizer [--out DIR]

The vocabulary follows CLIP's layout: the 256 byte-level symbols, the same 256
with the end-of-word marker "</w>", one entry per learned merge, then
<|startoftext|> and <|endoftext|>. Merges are learned by plain BPE on the
caption vocabulary until every caption word is a single token; because
encoding replays merges in the order they were learned, each caption word
encodes to exactly one token, while any other text still falls back to
byte-level symbols instead of <|endoftext|>-as-unknown.

The output is a pure function of the caption vocabulary (ties between equally
frequent pairs are broken lexicographically), so rerunning it reproduces the
packaged files byte for byte.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Iterable

from md_jax.data import shapes

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "assets", "shapes_tokenizer")


def byte_symbols() -> list[str]:
  """The byte -> printable-unicode table of byte-level BPE, in byte order.

  Printable Latin-1 bytes map to themselves; the rest (controls, space, ...)
  are shifted to code points from 256 upwards so every byte has a visible,
  whitespace-free symbol.
  """
  keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(
      range(0xAE, 0xFF + 1))
  table, extra = [], 0
  for b in range(256):
    if b in keep:
      table.append(chr(b))
    else:
      table.append(chr(256 + extra))
      extra += 1
  return table


def _word_symbols(word: str, table: list[str]) -> tuple[str, ...]:
  syms = [table[b] for b in word.encode("utf-8")]
  syms[-1] += END_OF_WORD
  return tuple(syms)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
  """BPE merges that turn every word into one symbol (deterministic)."""
  table = byte_symbols()
  segs = {w: _word_symbols(w, table) for w in sorted(set(words))}
  merges: list[tuple[str, str]] = []
  while True:
    counts = collections.Counter()
    for syms in segs.values():
      for pair in zip(syms, syms[1:]):
        counts[pair] += 1
    if not counts:
      return merges
    best = min(counts, key=lambda p: (-counts[p], p))
    merges.append(best)
    joined = best[0] + best[1]
    for w, syms in segs.items():
      out, i = [], 0
      while i < len(syms):
        if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
          out.append(joined)
          i += 2
        else:
          out.append(syms[i])
          i += 1
      segs[w] = tuple(out)


def build(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
  table = byte_symbols()
  tokens = list(table) + [s + END_OF_WORD for s in table]
  merges = learn_merges(words)
  for a, b in merges:
    tokens.append(a + b)
  tokens += [BOS, EOS]
  vocab = {}
  for tok in tokens:
    vocab.setdefault(tok, len(vocab))
  return vocab, merges


def write(out_dir: str = DEFAULT_DIR) -> str:
  vocab, merges = build(shapes.caption_vocabulary())
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    f.write("\n")
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    for a, b in merges:
      f.write(f"{a} {b}\n")
  config = {
      "tokenizer_class": "CLIPTokenizer",
      "model_max_length": MODEL_MAX_LENGTH,
      "bos_token": BOS,
      "eos_token": EOS,
      "unk_token": EOS,
      "pad_token": EOS,
      "do_lower_case": True,
      "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f, indent=2, sort_keys=True)
    f.write("\n")
  return out_dir


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=DEFAULT_DIR, help="output directory")
  args = parser.parse_args(argv)
  out = write(args.out)
  vocab, merges = build(shapes.caption_vocabulary())
  print(f"wrote {out}: {len(vocab)} tokens, {len(merges)} merges, "
        f"{len(shapes.caption_vocabulary())} caption words")


if __name__ == "__main__":
  main()
