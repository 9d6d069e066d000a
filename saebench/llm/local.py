"""LLM backends that run in this process: HF transformers (any chat model), and vllm's offline engine.

The transformers backend reads the full next-token distribution at the assistant's first token (one
forward pass per batch of prompts, left-padded, sorted by length so batches pad little); it takes
the same model names as ``--model``: a preset such as the embedded ``smollm2-135m``, a hub id, or a
local path, in the dtype saebench's ``auto`` picks for the device.
"""

import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path

import torch

from saebench.errors import SaebenchError
from saebench.llm.base import LLM, Chat, ResponseCache

TOKENS_PER_BATCH = 8192
"""Prompt tokens per forward pass of the in-process backend (bounds memory; ~64 simulation prompts)."""


class TransformersLLM(LLM):
    """A chat model loaded with transformers, in this process."""

    reads_text = True

    def __init__(self, name: str, dtype: str | None = None, device: str | None = None,
                 cache: ResponseCache | None = None, progress: bool = True):
        from saebench.models import load_model

        super().__init__(cache, progress)
        self.loaded = load_model(name, dtype=dtype, device=device)
        tok = self.loaded.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise SaebenchError(f"simulator model {name!r} has no chat template; use a chat (instruct) model")
        self.tokenizer = tok
        self.label = name
        weights = weights_identity(self.loaded.model_id, self.loaded.revision)
        self.cache_id = f"transformers:{weights}:{self.loaded.dtype}"

    def _encode(self, prompt: Chat) -> list[int]:
        text = self.tokenizer.apply_chat_template(prompt.messages(), add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _batches(self, prompts: Sequence[Chat]):
        """(indices, left-padded ids, attention mask) batches, longest prompts first."""
        encoded = [self._encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        start = 0
        while start < len(order):
            width = len(encoded[order[start]])
            size = max(1, TOKENS_PER_BATCH // max(width, 1))
            idx = order[start:start + size]
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = encoded[i]
                ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
            yield idx, ids.to(self.loaded.device), mask.to(self.loaded.device)
            start += size

    def _choice_ids(self, choices: Sequence[str]) -> list[int]:
        ids = []
        for c in choices:
            enc = self.tokenizer.encode(c, add_special_tokens=False)
            if len(enc) != 1:
                raise SaebenchError(f"answer {c!r} is {len(enc)} tokens for simulator {self.label!r}; answers must be one token")
            ids.append(enc[0])
        return ids

    @torch.inference_mode()
    def _choice_logprobs(self, prompts, choices):
        wanted = self._choice_ids(choices)
        out: list[dict[str, float] | None] = [None] * len(prompts)
        encoded = [self._encode(p) for p in prompts]
        shared = _common_prefix(encoded)
        if shared >= SHARED_PREFIX:  # scorer prompts share a long instruction: run it once, reuse its cache
            rows = self._suffix_last_logits(encoded, shared)
            for i, logits in rows:
                logp = torch.log_softmax(logits.float(), dim=-1)[wanted].cpu()
                out[i] = {c: float(v) for c, v in zip(choices, logp)}
            return out
        for idx, ids, mask in self._batches(prompts):
            self.stats.requests += 1
            logits = self.loaded.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)[:, wanted].cpu()
            for row, i in enumerate(idx):
                out[i] = {c: float(v) for c, v in zip(choices, logp[row])}
            self._answered(len(idx))
        return out

    def _suffix_last_logits(self, encoded: list[list[int]], shared: int):
        """(index, next-token logits after the whole prompt) per prompt: the `shared` first tokens run once, the
        rest right-padded in batches on copies of their key/value cache (the same numbers as one pass each)."""
        import copy

        model, device = self.loaded.model, self.loaded.device
        name = _cache_argument(model)
        shared = min(shared, min(len(e) for e in encoded) - 1)  # every prompt keeps at least its last token
        prefix_cache = model(input_ids=torch.tensor([encoded[0][:shared]], device=device), use_cache=True)[name]
        self.stats.requests += 1
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        start = 0
        while start < len(order):
            width = len(encoded[order[start]]) - shared
            size = max(1, TOKENS_PER_BATCH // max(width, 1))
            idx = order[start:start + size]
            start += size
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            for row, i in enumerate(idx):
                rest = encoded[i][shared:]
                ids[row, :len(rest)] = torch.tensor(rest)
                mask[row, shared:shared + len(rest)] = 1
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(idx))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                           **{name: cache}).logits
            self.stats.requests += 1
            for row, i in enumerate(idx):
                yield i, logits[row, len(encoded[i]) - shared - 1]
            self._answered(len(idx))

    @torch.inference_mode()
    def _generate(self, prompts, max_tokens):
        out: list[str | None] = [None] * len(prompts)
        for idx, ids, mask in self._batches(prompts):
            self.stats.requests += 1
            gen = self.loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                             do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            for row, i in enumerate(idx):
                out[i] = self.tokenizer.decode(gen[row, ids.shape[1]:], skip_special_tokens=True).strip()
            self._answered(len(idx))
        return out

    @torch.inference_mode()
    def _text_logprobs(self, prefix, texts):
        """The prefix is run once and its key/value cache reused for every batch of texts (right-padded)."""
        import copy

        model, device = self.loaded.model, self.loaded.device
        pre = self.tokenizer.encode(prefix, add_special_tokens=False) or [self.tokenizer.bos_token_id or 0]
        encoded = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        name = _cache_argument(model)
        first = model(input_ids=torch.tensor([pre], device=device), use_cache=True)
        prefix_cache = first[name]
        self.stats.requests += 1
        start_logp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        out: list[list[float] | None] = [None] * len(texts)
        size = max(1, TOKENS_PER_BATCH // (8 * max(1, max((len(e) for e in encoded), default=1))))
        for b in range(0, len(texts), size):
            idx = [i for i in range(b, min(b + size, len(texts))) if encoded[i]]
            for i in range(b, min(b + size, len(texts))):
                if not encoded[i]:
                    out[i] = []
            if not idx:
                continue
            width = max(len(encoded[i]) for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), len(pre) + width), dtype=torch.long)
            mask[:, :len(pre)] = 1
            for row, i in enumerate(idx):
                ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, len(pre):len(pre) + len(encoded[i])] = 1
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(idx))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                           **{name: cache}).logits.float()
            self.stats.requests += 1
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for row, i in enumerate(idx):
                n = len(encoded[i])
                toks = torch.tensor(encoded[i])
                later = logp[row, :n - 1].gather(1, toks[1:, None]).squeeze(1) if n > 1 else torch.zeros(0)
                out[i] = [float(start_logp[toks[0]])] + later.tolist()
            self._answered(len(idx))
        return out

    def close(self) -> None:
        self.loaded = None


class VLLMOfflineLLM(LLM):
    """vllm's offline engine in this process (GPU users with ``pip install vllm``); answer-token
    log-probs are vllm's top-20 at the first generated token."""

    TOP = 20

    def __init__(self, name: str, dtype: str = "auto", cache: ResponseCache | None = None, progress: bool = True,
                 engine_args: dict | None = None):
        """`engine_args` go to `vllm.LLM` as they are: `enforce_eager=True` skips compiling and CUDA graphs (a
        CPU engine starts in seconds instead of minutes; worth it for a few prompts), `max_model_len` bounds the
        KV cache."""
        super().__init__(cache, progress)
        try:
            import vllm
        except ImportError:
            raise SaebenchError("backend=vllm needs vllm (pip install vllm, on a CUDA machine); or serve the model "
                                "with any OpenAI-compatible server and pass --llm-url") from None
        self._vllm = vllm
        self.engine = vllm.LLM(model=name, dtype=dtype, max_logprobs=self.TOP, **(engine_args or {}))
        self.label = name
        self.cache_id = f"vllm:{weights_identity(name)}:{dtype}"

    def _run(self, prompts, max_tokens: int, logprobs: int | None):
        params = self._vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs)
        self.stats.requests += 1
        return self.engine.chat([p.messages() for p in prompts], params, use_tqdm=False)

    def _choice_logprobs(self, prompts, choices):
        out: list[dict[str, float] | None] = []
        for res in self._run(prompts, 1, self.TOP):
            first = res.outputs[0].logprobs[0] if res.outputs and res.outputs[0].logprobs else None
            if not first:  # counted, and not cached
                self.count_failure("unparsed", "no log-probs in the answer", "vllm returned no log-probs")
                out.append(None)
                continue
            out.append({lp.decoded_token: lp.logprob for lp in first.values() if lp.decoded_token is not None})
        return out

    def _generate(self, prompts, max_tokens):
        out: list[str | None] = []
        for res in self._run(prompts, max_tokens, None):
            if not res.outputs:
                self.count_failure("unparsed", "no output", "vllm returned no output for the prompt")
            out.append(res.outputs[0].text.strip() if res.outputs else None)
        return out


SHARED_PREFIX = 64
"""Prompt tokens every prompt of a call must share before the in-process backend runs them once for all."""


def _common_prefix(encoded: list[list[int]]) -> int:
    """Length of the longest token prefix all of `encoded` share."""
    if not encoded:
        return 0
    first, n = encoded[0], min(len(e) for e in encoded)
    for j in range(n):
        if any(e[j] != first[j] for e in encoded):
            return j
    return n


def _cache_argument(model) -> str:
    """The forward argument of the key/value cache: `cache` in transformers 5, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def weights_identity(name: str, revision: str | None = None) -> str:
    """`name` and what identifies its weights, for the response cache key of an in-process LLM.

    A local folder (or file) gets a sha256 of its files (weights, config, tokenizer; one read of every byte,
    about a second per GB), so a model retrained at the same path gets new answers. Otherwise `revision`: a hub
    commit (what load_model reports) or the embedded wheel's version; without one, the commit of `name` in the
    local Hugging Face cache, which is what vllm loads; `name` alone when there is none.
    """
    path = Path(name).expanduser()
    if path.exists():
        digest = hashlib.sha256()
        for file in sorted(f for f in (path.iterdir() if path.is_dir() else [path]) if f.is_file()):
            digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
        return f"{name}@sha256:{digest.hexdigest()[:16]}"
    if revision is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        revision = Path(cached).parent.name if isinstance(cached, str) else None
    return name if revision is None else f"{name}@{revision}"
