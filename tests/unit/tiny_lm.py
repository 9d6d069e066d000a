"""A tiny Llama trained for a few seconds on a bigram language, and data files for it.

Words follow a fixed successor map, so the last word of every passage is predictable from the
one before: a trained 2-layer model answers LAMBADA-style and CBT-style items correctly, and
ablating its residual stream makes it fail. Everything is written under the given folder.
"""

import json
import random
from pathlib import Path

import torch
from torch import Tensor

from saebench.encoders.base import LATENTS, BuildContext, Codes, EncodeContext, Encoder, EncoderSpec

WORDS = [f"w{i}" for i in range(24)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # <pad> is id 0, as lm-eval pads with 0


def successor(word: str) -> str:
    return WORDS[(WORDS.index(word) * 7 + 3) % len(WORDS)]


def passage(rng: random.Random, length: int) -> list[str]:
    words = [rng.choice(WORDS)]
    while len(words) < length:
        words.append(successor(words[-1]))
    return words


def build_tiny_model(folder: Path, steps: int = 80) -> Path:
    """Train and save a 2-layer Llama + word-level tokenizer; returns the model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = random.Random(0)
    for _ in range(steps):
        batch = torch.tensor([[vocab[w] for w in passage(rng, 16)] for _ in range(16)])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = folder / "tiny-llama"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_lambada(path: Path, n: int, seed: int = 1) -> Path:
    """lambada_test.jsonl format: {"text": passage}, the target is the last word."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(passage(rng, rng.randint(6, 14)))}) + "\n"
                            for _ in range(n)))
    return path


def write_cbt(path: Path, n: int, seed: int = 2) -> Path:
    """CBTest format: 20 numbered sentences, then '21 query<TAB>answer<TAB><TAB>candidates'."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(n):
        lines = [f"{k + 1} {' '.join(passage(rng, 5))}" for k in range(20)]
        query = passage(rng, 6)
        answer = query[-1]
        candidates = sorted(set(rng.sample([w for w in WORDS if w != answer], 9)) | {answer})
        lines.append(f"21 {' '.join(query[:-1])} XXXXX\t{answer}\t\t{'|'.join(candidates)}")
        blocks.append("\n".join(lines) + "\n\n")
    path.write_text("".join(blocks))
    return path


class ReluLatentEncoder(Encoder):
    """A fixed random ReLU dictionary with latents (codes = relu(x W), recon = codes W^T)."""

    capabilities = frozenset({LATENTS})

    def __init__(self, d_in: int, d_latent: int = 16, hookpoint: str | None = None):
        self.spec = EncoderSpec("relu_test", None, hookpoint, d_in, d_latent)
        self.w = torch.randn(d_in, d_latent, generator=torch.Generator().manual_seed(0)) / d_in**0.5

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "ReluLatentEncoder":
        return cls(build.model.d_model)

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        return torch.relu(acts.float() @ self.w)

    def decode(self, codes: Codes) -> Tensor:
        return codes @ self.w.T
