"""Eval fakes: a deterministic text embedder with its identity, and a small emoji-like manifest."""

import hashlib

import numpy as np

from manifests.schema import ManifestWriter
from tests.helpers.images import png

D = 16
IDENTITY = {"llm": "fake-llm", "llm_fingerprint": "abc", "layer": 3, "readout": "pre_norm", "dim": D,
            "prompt_set": "flame", "prompt_set_hash": "h1", "position_mode": "restart"}


class FakeEmbedder:
    """Deterministic text -> unit vector (sha256-seeded Gaussian); counts embedded texts."""

    def __init__(self, identity=IDENTITY):
        self.identity = dict(identity)
        self.calls = 0

    def embed(self, texts, mode="single"):
        self.calls += len(texts)
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(f"{mode}:{t}".encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(D)
            out.append(v / np.linalg.norm(v))
        return np.array(out, np.float32)


def write_emoji_manifest(d):
    """4 test images = 2 emojis x 2 vendors sharing captions, 4 train images; names in de and fr."""
    w = ManifestWriter(d, source={"name": "emoji", "args": {}})
    cats = ["Animals & Nature", "Food & Drink"]
    for i in range(8):
        e = i // 2
        split = "test" if e < 2 else "train"
        cat = cats[e % 2]
        w.add({"key": f"{e}-{i % 2}", "image_bytes": png((40 * e, 200 * (i % 2), 90)), "split": split,
               "raw_caption": f"emoji {e}", "long_caption": f"a detailed emoji number {e}",
               "labels": {"category": cat, "subcategory": f"sub-{e % 2}"},
               "names": {"de": f"Emoji {e}", "fr": f"émoji {e}", "en": f"emoji {e}"}})
    w.close()
