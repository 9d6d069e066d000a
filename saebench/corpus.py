"""Evaluation and training text, cut into fixed-length token contexts.

Two sources:
- ``wiki`` (embedded): the 105 English Wikipedia articles that ship inside gensim's wheel,
  markup stripped with gensim's own wiki tools. Runs offline.
- ``hf:<dataset>[:<config>]``: any Hugging Face dataset with a text column, streamed.

Every document goes to exactly one split by a hash of its text, so the evaluation split
(``eval``) never overlaps the split the default SAE is trained on (``train``), whatever the
seed. The seed only decides which contexts are drawn and in what order.
"""

import bz2
import hashlib
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from saebench.errors import SaebenchError

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_FRACTION = 0.3
"""Share of documents (by text hash) held out for evaluation."""


@dataclass(frozen=True)
class CorpusSpec:
    """Which text to draw contexts from."""

    name: str = "wiki"
    """'wiki' (embedded, offline) or 'hf:<dataset>[:<config>]'."""
    split: str = "eval"
    """'eval' (held-out documents) or 'train' (the rest)."""
    hf_split: str = "train"
    """Split of the Hugging Face dataset to stream (hf: corpora only)."""
    text_column: str = "text"
    """Column holding the document text (hf: corpora only)."""


def in_eval_split(text: str) -> bool:
    """Whether a document belongs to the held-out evaluation split (stable hash of its text)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < EVAL_FRACTION


def _wiki_markup_cleanup(text: str) -> str:
    # filter_wiki leaves bold/italic quote runs and heading equals signs; drop them so the
    # model sees prose, and squeeze the blank lines left where templates were removed.
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@cache
def wiki_articles() -> tuple[str, ...]:
    """The embedded Wikipedia articles as plain text (redirects and stubs dropped)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SaebenchError("the embedded corpus needs gensim: pip install gensim")
    path = Path(spec.submodule_search_locations[0]) / WIKI_FILE
    if not path.exists():
        raise SaebenchError(f"gensim is installed but its Wikipedia sample is missing ({path})")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(path) as fh:
        texts = [_wiki_markup_cleanup(filter_wiki(raw)) for _, raw, _ in extract_pages(fh)]
    return tuple(t for t in texts if len(t) > 500 and not t.upper().startswith("#REDIRECT"))


def documents(spec: CorpusSpec) -> Iterator[str]:
    """Yield the documents of `spec`'s split, in a fixed order."""
    if spec.split not in ("eval", "train"):
        raise SaebenchError(f"corpus split must be 'eval' or 'train', not {spec.split!r}")
    want_eval = spec.split == "eval"
    if spec.name == "wiki":
        source: Iterator[str] = iter(wiki_articles())
    elif spec.name.startswith("hf:"):
        source = _hf_documents(spec)
    else:
        raise SaebenchError(f"unknown corpus {spec.name!r}: use 'wiki' or 'hf:<dataset>[:<config>]'")
    for text in source:
        if text and in_eval_split(text) == want_eval:
            yield text


def _hf_documents(spec: CorpusSpec) -> Iterator[str]:
    import datasets

    name, _, config = spec.name[3:].partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=spec.hf_split, streaming=True)
        for row in stream:
            yield row[spec.text_column]
    except KeyError as exc:
        raise SaebenchError(f"dataset {name!r} has no column {spec.text_column!r}") from exc
    except Exception as exc:
        if isinstance(exc, SaebenchError):
            raise
        raise SaebenchError(f"could not stream dataset {name!r} from the hub: {exc}") from exc


def token_contexts(
    tokenizer, spec: CorpusSpec, context_len: int, n_tokens: int, seed: int, bos_id: int
) -> torch.Tensor:
    """Draw ``ceil(n_tokens / context_len)`` contexts of `context_len` tokens, each starting with BOS.

    Documents are joined with a BOS token in front of each one and cut into pieces of
    ``context_len - 1`` tokens; each piece gets a BOS in front. The pieces are shuffled with
    `seed` and the first ones taken. Fewer are returned when the split is smaller.

    Returns:
        (n_contexts, context_len) int64 token ids.
    """
    if context_len < 2:
        raise SaebenchError(f"--context-len must be at least 2, not {context_len}")
    n_wanted = -(-n_tokens // context_len)
    piece = context_len - 1
    stream: list[int] = []
    is_hf = spec.name.startswith("hf:")
    for text in documents(spec):
        stream.append(bos_id)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        # a streamed dataset is unbounded: stop once there are plenty of pieces to draw from
        if is_hf and len(stream) >= 4 * n_wanted * piece:
            break
    n_pieces = len(stream) // piece
    if n_pieces == 0:
        raise SaebenchError(f"corpus {spec.name!r} ({spec.split} split) has too little text for one context")
    pieces = torch.tensor(stream[: n_pieces * piece], dtype=torch.long).view(n_pieces, piece)
    order = torch.randperm(n_pieces, generator=torch.Generator().manual_seed(seed))[:n_wanted]
    bos = torch.full((len(order), 1), bos_id, dtype=torch.long)
    return torch.cat([bos, pieces[order]], dim=1)


@dataclass(frozen=True)
class LongSequences:
    """Sequences for position-resolved tasks, and where they came from."""

    tokens: torch.Tensor
    """(n, length) int64 token ids, BOS first."""
    documents: list[int]
    """How many documents each sequence holds (1: a single document from its start)."""

    def provenance(self) -> str:
        """One line saying how many sequences come from one document."""
        single = sum(1 for d in self.documents if d == 1)
        text = f"{single} of {len(self.documents)} sequences are the start of a single document"
        if single < len(self.documents):
            text += (f"; {len(self.documents) - single} are packed from up to {max(self.documents)} documents "
                     "(later documents start after a BOS, whose positions are sinks)")
        return text


def long_sequences(tokenizer, spec: CorpusSpec, length: int, n: int, seed: int, bos_id: int) -> LongSequences:
    """`n` sequences of `length` tokens for measuring how encoders behave along a long context.

    Documents of at least ``length - 1`` tokens come first, each giving one sequence: BOS, then the
    document's first tokens, so position p is position p of a real document. Only when there are
    too few do later windows of long documents follow (BOS, then a window cut at a token
    boundary), and then packs of shorter documents joined by BOS tokens. Each tier is shuffled
    with `seed`; the first `n` sequences are taken (fewer when the split is smaller).
    """
    if length < 2:
        raise SaebenchError(f"--max-len must be at least 2, not {length}")
    piece = length - 1
    starts, later, rest = [], [], []  # (ids, documents)
    is_hf = spec.name.startswith("hf:")
    seen = 0
    for text in documents(spec):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        seen += len(ids)
        if len(ids) >= piece:
            starts.append((ids[:piece], 1))
            later.extend((ids[i:i + piece], 1) for i in range(piece, len(ids) - piece + 1, piece))
        else:
            rest.append(ids)
        # a streamed dataset is unbounded: stop at plenty of long documents, or of text to pack
        if is_hf and (len(starts) >= 4 * n or seen >= 16 * n * piece):
            break
    packed, stream, count = [], [], 0
    for ids in rest:
        stream.extend(([bos_id] if stream else []) + ids)
        count += 1
        while len(stream) >= piece:
            packed.append((stream[:piece], count))
            stream, count = stream[piece:], 1 if len(stream) > piece else 0
    gen = torch.Generator().manual_seed(seed)
    chosen: list[tuple[list[int], int]] = []
    for tier in (starts, later, packed):
        order = torch.randperm(len(tier), generator=gen).tolist()
        chosen.extend(tier[i] for i in order)
    chosen = chosen[:n]
    if not chosen:
        raise SaebenchError(f"corpus {spec.name!r} ({spec.split} split) has too little text for one "
                            f"{length}-token sequence; lower --max-len")
    tokens = torch.tensor([[bos_id] + ids for ids, _ in chosen], dtype=torch.long)
    return LongSequences(tokens, [d for _, d in chosen])
