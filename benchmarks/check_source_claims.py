"""List every sentence of saebench's code, docs and presets that names a source document and holds a number
the source's text does not contain.

The sources are the plain-text documents in ../shared/seeds/ (README there). A sentence "names" a source when
it mentions one of its authors or its seed id; every number in it (0.42, 26.6%, 1,000, 1e-3) must then be
findable in that source's text, or the sentence must say the number is saebench's own (listed as "own") or
cite the file of the authors' repository that has it (listed as "repo"), for a human to read. Prints one line per finding and a summary; exit code 1 if any number is
unverified. Not a test: the seeds are not part of the repository.

    python benchmarks/check_source_claims.py [--seeds ../shared/seeds]
"""

import argparse
import re
import sys
from pathlib import Path

ID = r"(?<![\d,.])(?:(?:seed|source|sources?') {0}|{0}'s|\({0}[,)]|{0} (?:Table|Fig|sec)|{0}: )"
"""How a sentence names a source by its seed id: 'seed 004', '004's', '(004)', '004 Table 1'."""
SOURCES = {
    "000": ("000_", r"EleutherAI's study|EleutherAI study|simulat\w+ (?:an )?SAE encoder|" + ID.format("000")),
    "001": ("001_", r"delphi's|Paulo et al|Juang|" + ID.format("001")),
    "002": ("002_", r"O'Neill|Gumran|Klindt|amortisation-gap study|" + ID.format("002")),
    "003": ("003_", r"Anthropic|circuits update|" + ID.format("003")),
    "004": ("004_", r"Anders|Bloom|" + ID.format("004")),
}
NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?(?:e-?\d+)?)%?")
REPO = re.compile(r"github\.com/|experiments/\w+\.py|commit [0-9a-f]{7}")
"""A sentence citing a file of the authors' repository: its numbers are checked by hand against that file."""
OWN = re.compile(r"saebench|here|this machine|embedded|SmolLM2|smollm2|ours|we measured|measured here", re.I)
SKIP_NUMBERS = {"0", "1", "2", "000", "001", "002", "003", "004", "2023", "2024", "2025", "2026"}
"""Years, 0/1/2 (counts such as two, indices) and the seed ids themselves carry no claim."""
FILES = ("saebench/**/*.py", "docs/**/*.md", "README.md", "tasks/*.yaml", "registry/*.yaml", "benchmarks/*.py")


def sentences(text: str, yaml: bool = False) -> list[tuple[int, str]]:
    """(line number, sentence) pairs; sentences may span lines (docstrings, wrapped markdown); in YAML each
    line is one."""
    if yaml:
        return list(enumerate(text.splitlines(), 1))
    out, start = [], 0
    # a sentence ends at . ! ? before a capital, a blank line, a list/table/heading line, or a docstring quote
    for match in re.finditer(r"(?<=[.!?])\s+(?=[A-Z(`\"*|])|\n\s*\n|\n(?=\s*[-|#])|\"\"\"", text):
        out.append((text.count("\n", 0, start) + 1, text[start:match.start()]))
        start = match.end()
    out.append((text.count("\n", 0, start) + 1, text[start:]))
    return out


def normalise(number: str) -> set[str]:
    """Spellings under which a number may appear in a source: 1,000 / 1000; 0.42 / .42; 26.6."""
    plain = number.replace(",", "")
    forms = {number, plain}
    if "." in plain:
        forms.add(plain.rstrip("0").rstrip("."))
    if re.fullmatch(r"\d{4,}", plain):
        forms.add(f"{int(plain):,}")
    return forms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "seeds")
    args = parser.parse_args()
    texts = {}
    for sid, (prefix, _) in SOURCES.items():
        found = sorted(args.seeds.glob(prefix + "*.txt"))
        if not found:
            sys.exit(f"no {prefix}*.txt in {args.seeds}: pass --seeds")
        texts[sid] = found[0].read_text()
    root = Path(__file__).resolve().parents[1]
    unverified = own = checked = 0
    for pattern in FILES:
        for path in sorted(root.glob(pattern)):
            if path.name == Path(__file__).name:
                continue
            for line, sentence in sentences(path.read_text(), path.suffix == ".yaml"):
                named = [sid for sid, (_, names) in SOURCES.items() if re.search(names, sentence)]
                if not named:
                    continue
                for number in NUMBER.findall(sentence):
                    if number in SKIP_NUMBERS or re.fullmatch(r"\d|(?:19|20)\d\d", number):
                        continue
                    checked += 1
                    if any(form in texts[sid] for sid in named for form in normalise(number)):
                        continue
                    tag = "repo" if REPO.search(sentence) else "own" if OWN.search(sentence) else "UNVERIFIED"
                    own += tag != "UNVERIFIED"
                    unverified += tag == "UNVERIFIED"
                    where = f"{path.relative_to(root)}:{line}"
                    print(f"{tag:10} {where}: {number} not in {'/'.join(named)} | {' '.join(sentence.split())[:200]}")
    print(f"{checked} numbers in sentences naming a source; {unverified} unverified, {own} in sentences that say "
          "they are saebench's own or cite the authors' repository (read them)")
    return 1 if unverified else 0


if __name__ == "__main__":
    sys.exit(main())
