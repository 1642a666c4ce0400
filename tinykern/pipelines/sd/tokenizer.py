"""The CLIP tokenizer of SD1.x, built offline from the BPE merges shipped with tinykern.

Only the 48,894 merges are shipped (gzip, about 200 KB): the vocabulary follows from them the
way CLIP defines it (256 byte symbols, the same with "</w>", one token per merge, then the
start and end tokens), so no vocab.json is needed and nothing is downloaded.
"""

import functools
import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols():
    """GPT-2/CLIP's reversible map from bytes to printable characters, in CLIP's vocabulary
    order: the printable bytes first (as themselves), then the others as chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@functools.lru_cache(maxsize=1)
def _vocab_and_merges():
    data = resources.files(__package__).joinpath("data/clip_merges.txt.gz").read_bytes()
    merges = [tuple(line.split()) for line in gzip.decompress(data).decode("utf-8").splitlines() if line]
    base = _byte_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer():
    """A transformers CLIPTokenizer identical to SD1.5's (vocab 49,408, 77 positions, padded
    with <|endoftext|> = 49407)."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    # vocab.json + merges.txt in a scratch folder: the one input every transformers version's
    # CLIPTokenizer (4.x slow and fast, 5.x) accepts.
    with tempfile.TemporaryDirectory(prefix="tinykern-clip-") as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                              encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH, bos_token=BOS, eos_token=EOS,
                                             pad_token=EOS, unk_token=EOS, local_files_only=True)
