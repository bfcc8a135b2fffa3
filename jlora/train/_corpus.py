"""The embedded demo corpus: short templated stories and Q/A records, generated from a seed.

``python -m jlora.train._corpus`` rewrites ``jlora/train/data/tiny_stories.jsonl``
(shipped with the package, ~150 KB), so the demo needs no download, and
``jlora/train/data/qa.jsonl``: its Q/A records alone, the default job's data
(the shipped base model was pretrained on stories only). Stories are
plain-text records; the Q/A records are instruction records whose prompt is
masked out of the loss.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Mia", "Tom", "Ada", "Leo", "Zoe", "Sam", "Ivy", "Max", "Nia", "Ben"]
ANIMALS = ["cat", "dog", "fox", "owl", "frog", "duck", "bear", "fish"]
PLACES = ["park", "garden", "forest", "river", "beach", "hill", "farm", "town"]
THINGS = ["ball", "kite", "book", "hat", "cake", "boat", "drum", "lamp"]
COLORS = ["red", "blue", "green", "yellow", "pink", "brown"]
FEELINGS = ["happy", "sleepy", "brave", "hungry", "curious", "proud"]


def story(rng: random.Random) -> str:
  n, a, p, t, c, f = (rng.choice(x) for x in (NAMES, ANIMALS, PLACES, THINGS, COLORS, FEELINGS))
  lines = [
      f"{n} had a {c} {t}.",
      f"One day {n} went to the {p} with a {a}.",
      f"The {a} saw the {c} {t} and felt {f}.",
      rng.choice([f"They played with the {t} all day.", f"The {a} ran around the {p}.",
                  f"{n} gave the {t} to the {a}."]),
      rng.choice([f"At night {n} was {f} and went home.", f"Then the {a} went to sleep.",
                  f"{n} and the {a} were friends."]),
  ]
  return " ".join(lines)


def qa(rng: random.Random) -> dict:
  x, y = rng.randint(0, 20), rng.randint(0, 20)
  if rng.random() < 0.5:
    return {"prompt": f"Q: What is {x} plus {y}?\nA: ", "completion": f"{x + y}."}
  n, t, c = rng.choice(NAMES), rng.choice(THINGS), rng.choice(COLORS)
  return {"prompt": f"{n} has a {c} {t}.\nQ: What color is the {t}?\nA: ", "completion": f"It is {c}."}


def records(count: int = 1400, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  return [{"text": story(rng)} if rng.random() < 0.75 else qa(rng) for _ in range(count)]


def write_corpus(path: str | Path, count: int = 1400, seed: int = 0, kinds: tuple[str, ...] = ("text", "prompt")) -> Path:
  """Write the corpus's records that have one of the fields ``kinds`` as JSON lines."""
  path = Path(path)
  path.write_text("".join(json.dumps(r) + "\n" for r in records(count, seed) if any(k in r for k in kinds)))
  return path


if __name__ == "__main__":
  from jlora.train._data import EMBEDDED_CORPUS, EMBEDDED_QA

  print(write_corpus(EMBEDDED_CORPUS), EMBEDDED_CORPUS.stat().st_size, "bytes")
  print(write_corpus(EMBEDDED_QA, kinds=("prompt",)), EMBEDDED_QA.stat().st_size, "bytes")
