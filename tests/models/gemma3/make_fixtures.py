"""Write the Gemma 3 270M reference fixtures from transformers' own load of the GGUF.

    .venv/bin/python tests/models/gemma3/make_fixtures.py [path/to/gemma-3-270m-q4_k_m.gguf]

Without a path it uses circuits_jax's cached copy (`cj.models.gemma3_path()`, fetched once). transformers
(CPU torch, no network) builds the tokenizer and dequantizes the GGUF itself, independently of
circuits_jax, and we record:

- tokenizer.json: `mixed_text.txt`'s token ids, whole and per line, as `AutoTokenizer.from_pretrained(dir,
  gguf_file=...)` gives them (BOS included, as Gemma's tokenizer adds it);
- logits.json / logits.npz: for 8 prompts (one longer than the 512-token sliding window), the prompt's
  token ids and the next-token logits of `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` at
  the last position: the top 50 (ids and values), the values at 512 fixed vocabulary ids, and the
  log-sum-exp over the whole vocabulary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TOP = 50
SAMPLED = 512
LONG = " ".join(f"Item {i}: the {['red', 'green', 'blue', 'small', 'large'][i % 5]} box holds {i * 7 % 13} stones."
                for i in range(60)) + " Item 60: the red box holds"  # fmt: skip
PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "When Mary and John went to the store, John gave a drink to",
    "When Mary and John went to the store, Mary gave a drink to",
    "def add(a, b):\n    return",
    "The capital of Japan is Tokyo. The capital of France is",
    "1, 2, 3, 4, 5,",
    "Café au lait et croissant: le petit-déjeuner",
    LONG,
]


def sampled_ids(vocab: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(vocab, SAMPLED, replace=False)).astype(np.int64)


def main(path: str | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        from circuits_jax.models import gemma3_path

        path = str(gemma3_path())
    gguf = Path(path)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = (HERE / "mixed_text.txt").read_text(encoding="utf-8")
    lines = text.split("\n")
    (HERE / "tokenizer.json").write_text(json.dumps({
        "source": "transformers AutoTokenizer.from_pretrained(dir, gguf_file='gemma-3-270m-q4_k_m.gguf'), BOS included",
        "text_ids": tok(text).input_ids,
        "line_ids": [tok(line).input_ids for line in lines],
    }) + "\n", encoding="utf-8")  # fmt: skip

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    ids = [tok(p).input_ids for p in PROMPTS]
    V = model.config.vocab_size
    cols = sampled_ids(V)
    top_ids, top_vals, samp, lse = [], [], [], []
    with torch.no_grad():
        for row in ids:
            logits = model(torch.tensor([row])).logits[0, -1].double().numpy()
            order = np.argsort(-logits, kind="stable")[:TOP]
            top_ids.append(order)
            top_vals.append(logits[order])
            samp.append(logits[cols])
            lse.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max())
    (HERE / "logits.json").write_text(json.dumps({
        "source": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), float32, CPU",
        "transformers": __import__("transformers").__version__, "torch": torch.__version__,
        "prompts": PROMPTS, "token_ids": ids,
    }, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")  # fmt: skip
    np.savez_compressed(
        HERE / "logits.npz", top_ids=np.asarray(top_ids, np.int64), top_logits=np.asarray(top_vals, np.float32),
        sampled_ids=cols, sampled_logits=np.asarray(samp, np.float32), logsumexp=np.asarray(lse, np.float64),
    )  # fmt: skip
    print("wrote", *(HERE / f for f in ("tokenizer.json", "logits.json", "logits.npz")))


if __name__ == "__main__":
    main(*sys.argv[1:2])
