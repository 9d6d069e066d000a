"""The README and docs/ stay true to the code: links resolve, shown commands parse, plugin examples run.

Commands are checked against the real argparse parser (``saebench.cli.build_parser``) by reading its
subparsers' option strings and choices, never by running them; encoder and task names against the
entry points declared in pyproject.toml and the YAML presets. The two plugin examples of docs/plugins.md
are executed: the encoder is built and run on random activations, the task on random data.
"""

import argparse
import functools
import importlib
import re
import shlex
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PLUGINS = ROOT / "docs" / "plugins.md"

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
PLACEHOLDER = re.compile(r"^(\.\.\.|options|<[^>]*>|[A-Z][A-Z0-9_]*)$")
"""Tokens of a synopsis that stand for something: '...', '[options]', '<command>', 'M', 'DIR', 'E2'."""


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def without_code(text: str) -> str:
    """`text` with fenced code blocks blanked (line count kept) and inline code removed."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub("", text)


def code_blocks(text: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(text)]


def inline_code(text: str) -> list[str]:
    """Inline code spans outside fenced blocks, a span broken over lines joined with spaces."""
    text = FENCE.sub("", text)
    return [" ".join(m.group(1).split()) for m in INLINE_CODE.finditer(text)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation but '-' and '_' removed,
    each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors of every heading of a markdown file, duplicates numbered as GitHub does (-1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())):
        slug = github_slug(match.group(2))
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_github_slug_matches_known_anchors():
    assert github_slug("`ce_kl --all-at-once`") == "ce_kl---all-at-once"
    assert github_slug("Against sae-lens's `run_evals`") == "against-sae-lenss-run_evals"
    assert github_slug("Encoders: one example per family") == "encoders-one-example-per-family"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_point_to_existing_files_and_headings(doc):
    broken = []
    for target in LINK.findall(without_code(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {rel(path)}")
    assert not broken, f"{rel(doc)} has broken links:\n" + "\n".join(broken)


# --- commands -------------------------------------------------------------------------------------


@dataclass
class Command:
    where: str
    text: str
    error: str = ""
    """The 'saebench: error: ...' line a transcript shows the command printing (a demonstration of bad input)."""
    fragment: bool = False
    """An inline code span, which may stop before an option's value ('`saebench run --model` takes ...')."""


def shown_commands(prefix: str) -> list[Command]:
    """Every command starting with `prefix` (e.g. 'saebench ') in a code block (continuation lines joined) or
    an inline code span of the README and docs/. In a transcript (a block with '$ ' lines) only the '$ '
    lines are commands; the rest is their output."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for block in code_blocks(text):
            lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()]
            transcript = any(line.startswith("$ ") for line in lines)
            for i, line in enumerate(lines):
                if transcript and not line.startswith("$ "):
                    continue
                line = line.removeprefix("$ ")
                if is_command(line, prefix):
                    after = lines[i + 1] if i + 1 < len(lines) else ""
                    error = after if after.startswith(prefix.strip() + ": error:") else ""
                    out.append(Command(rel(doc), line, error))
        out.extend(Command(rel(doc), span, fragment=True) for span in inline_code(text) if is_command(span, prefix))
    return out


def is_command(line: str, prefix: str) -> bool:
    """`prefix` followed by a word, an option or a <placeholder>: 'saebench run ...', not output such as
    'saebench evaluate(), reference cache cold: 124.5s'."""
    return re.match(rf"{re.escape(prefix)}\s*(-|<|[a-z][a-z-]*(\s|$))", line) is not None


def declared_entry_points(group: str) -> dict[str, str]:
    """Name -> 'module:attr' of the entry points pyproject.toml declares in `group` (read as text: tomllib
    needs Python 3.11, saebench supports 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(rf'^\[project\.entry-points\."{re.escape(group)}"\]\n(.*?)(?=^\[|\Z)', text, re.S | re.M)
    assert section, f"pyproject.toml declares no entry-point group {group}"
    return dict(re.findall(r'^(\w+)\s*=\s*"([^"]+)"', section.group(1), re.M))


def _declared_in_docs(group: str) -> set[str]:
    """Plugin names the docs declare in toml blocks (the worked examples of docs/plugins.md)."""
    names = set()
    for doc in DOCS:
        for block in code_blocks(doc.read_text()):
            if f'[project.entry-points."{group}"]' in block:
                names |= set(re.findall(r"^(\w+)\s*=", block, re.M))
    return names


@functools.cache
def known_encoders() -> set[str]:
    eps = set(declared_entry_points("saebench.encoders"))
    presets = yaml.safe_load((ROOT / "registry" / "encoders.yaml").read_text()).get("presets") or {}
    return eps | set(presets) | _declared_in_docs("saebench.encoders")


@functools.cache
def known_tasks() -> set[str]:
    names = set(declared_entry_points("saebench.tasks"))
    for preset_file in (ROOT / "tasks").glob("*.yaml"):
        names |= set(yaml.safe_load(preset_file.read_text()) or {})
    return names | _declared_in_docs("saebench.tasks")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _placeholder(token: str) -> bool:
    return bool(PLACEHOLDER.match(token)) or token.endswith("...")


def _family(spec: str) -> str:
    """'sae:default@layers.5.resid_post' -> 'sae'; 'sparse_coding?k=3' -> 'sparse_coding'."""
    return re.split(r"[:?@]", spec, maxsplit=1)[0]


def command_problems(tokens: list[str], parser: argparse.ArgumentParser,
                     command: Command | None = None) -> list[str]:
    """What in a `saebench ...` command (tokens after 'saebench') the parser would not accept."""
    subs = _subparsers(parser)
    if not tokens or tokens[0] in ("-h", "--help", "--version"):
        return []
    first, rest = tokens[0], tokens[1:]
    if _placeholder(first):  # 'saebench <command> --help': the rest must suit every subcommand
        return [p for sub in subs.values() for p in arguments_problems(rest, sub, command)]
    if first not in subs:
        return [f"no subcommand {first!r} (there are {sorted(subs)})"]
    return arguments_problems(rest, subs[first], command)


def arguments_problems(tokens: list[str], parser: argparse.ArgumentParser,
                       command: Command | None = None) -> list[str]:
    """What in the arguments of one subcommand its parser would not accept."""
    command = command or Command("", "")
    options = {s: a for a in parser._actions for s in a.option_strings}
    positionals = [a for a in parser._actions if not a.option_strings]
    problems, next_positional, i = [], 0, 0
    while i < len(tokens):
        token = tokens[i].strip("[]")
        i += 1
        if not token or _placeholder(token):
            continue
        if token.startswith("-"):
            name, eq, value = token.partition("=")
            action = options.get(name)
            if action is None:
                problems.append(f"{parser.prog} has no option {name}")
                continue
            if action.nargs == 0:
                continue
            if action.nargs == "?" and not eq and (i >= len(tokens) or tokens[i].startswith("-")):
                continue  # an optional value left out ('--ray' alone), as argparse reads it
            if not eq:
                if i >= len(tokens):
                    if not command.fragment:
                        problems.append(f"{name} needs a value")
                    continue
                value, i = tokens[i].strip("[]"), i + 1
            problems += value_problems(action, value, command)
        elif next_positional < len(positionals):
            problems += value_problems(positionals[next_positional], token, command)
            next_positional += 1
        else:
            problems.append(f"{parser.prog} takes no argument {token!r}")
    return problems


def value_problems(action: argparse.Action, value: str, command: Command) -> list[str]:
    """A value the option (or positional) does not take; an unknown encoder or task name is fine only in a
    demonstration of bad input whose error line names it as unknown."""
    if _placeholder(value):
        return []
    alternatives = value.split("|")  # a synopsis such as 'encoders|tasks|models'
    problems = []
    if action.choices is not None:
        problems += [f"{action.dest}: {v!r} is not one of {list(action.choices)}" for v in alternatives
                     if v not in action.choices]
    for dest, kind, known in (("encoder", "encoder family or preset", known_encoders),
                              ("task", "task or task preset", known_tasks)):
        if action.dest != dest:
            continue
        for v in alternatives:
            name, unknown = _family(v), _family(v) not in known()
            shown_as_unknown = f"unknown {dest} {name!r}" in command.error
            if unknown and not shown_as_unknown:
                problems.append(f"no {kind} {name!r} in {v!r}")
            elif shown_as_unknown and not unknown:
                problems.append(f"the error shown calls {dest} {name!r} unknown, but it exists")
    return problems


SAEBENCH_COMMANDS = shown_commands("saebench ")


def test_docs_show_commands():
    assert len(SAEBENCH_COMMANDS) > 20
    assert any(c.where == "README.md" for c in SAEBENCH_COMMANDS)


@pytest.mark.parametrize("command", SAEBENCH_COMMANDS, ids=lambda c: f"{c.where}: {c.text[:60]}")
def test_shown_saebench_command_fits_the_parser(command):
    from saebench.cli import build_parser

    tokens = shlex.split(command.text, comments=True)
    problems = command_problems(tokens[1:], build_parser(), command)
    assert not problems, f"{command.where}: `{command.text}`:\n" + "\n".join(problems)


def test_the_command_checker_catches_mistakes():
    from saebench.cli import build_parser

    parser = build_parser()
    check = lambda text: command_problems(shlex.split(text)[1:], parser)  # noqa: E731
    assert check("saebench run --model M --encoder identity --task ce_kl --limit 10") == []
    assert check("saebench list encoders|tasks|models") == []
    assert check("saebench run --model M --encoder identity --task ce_kl --no-such-option")
    assert check("saebench list widgets")
    assert check("saebench frobnicate")
    assert check("saebench run --dtype float8 --task ce_kl")
    assert check("saebench run --encoder identiy --task ce_kl")
    assert check("saebench run --encoder identity --task ce_kll")
    assert check("saebench sweep sweep.yaml --ray") == check("saebench sweep sweep.yaml --ray auto --quiet") == []


@functools.cache
def makefile_targets() -> set[str]:
    """Targets that have a rule in the Makefile ('name: prerequisites'; not 'VAR := value', not .PHONY)."""
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_\-/ ]+?)\s*:(?!=)", line)
        if match:
            targets |= set(match.group(1).split())
    return targets


MAKE_COMMANDS = shown_commands("make ")


@pytest.mark.parametrize("command", MAKE_COMMANDS, ids=lambda c: f"{c.where}: {c.text[:60]}")
def test_shown_make_targets_exist(command):
    tokens = shlex.split(command.text, comments=True)[1:]
    wanted = [t for t in tokens if "=" not in t and not t.startswith("-")]
    missing = set(wanted) - makefile_targets()
    assert wanted and not missing, f"{command.where}: `{command.text}`: no Makefile target {sorted(missing)}"


def test_readme_stays_a_front_page():
    """The README is what saebench answers, the two commands and one example per family; the reference
    lives in docs/. It stays at most 250 lines (it was 905 when it held everything)."""
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move reference material to docs/"


def test_readme_shows_make_demo_and_make_test():
    assert {"demo", "test"} <= {c.text.split()[1] for c in MAKE_COMMANDS if c.where == "README.md"}


# --- the plugin examples of docs/plugins.md -------------------------------------------------------


def example(name: str) -> types.ModuleType:
    """The code block right after `<!-- example: name -->` in docs/plugins.md, executed as a module."""
    text = PLUGINS.read_text()
    match = re.search(rf"^<!-- example: {name} -->\n```python\n(.*?)^```$", text, re.S | re.M)
    assert match, f"docs/plugins.md has no python block right after <!-- example: {name} -->"
    assert text.count(f"<!-- example: {name} -->") == 1
    module = types.ModuleType(f"saebench_docs_example_{name}")
    module.__file__ = str(PLUGINS)
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(match.group(1), f"{PLUGINS}:<example {name}>", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


def defined_subclass(module: types.ModuleType, base: type) -> type:
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, base) and v.__module__ == module.__name__]
    assert len(classes) == 1, f"expected one {base.__name__} subclass in the example, found {classes}"
    return classes[0]


def builtin(group: str, name: str) -> type:
    """A built-in plugin class, found from its pyproject.toml entry point."""
    module, _, attr = declared_entry_points(group)[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def test_encoder_example_satisfies_the_encoder_interface():
    from saebench.encoders.base import (DECODER_DICTIONARY, LATENTS, BuildContext, EncodeContext, Encoder,
                                        EncoderSpec, SparseCodes, dense)
    from saebench.errors import SaebenchError

    cls = defined_subclass(example("encoder"), Encoder)
    build = BuildContext(None, None, None, width=16)
    enc = cls.from_arg("4", build)
    assert isinstance(enc.spec, EncoderSpec) and enc.spec.d_in == 16 and enc.spec.label.endswith(":4")
    assert cls.from_arg(None, build).spec.arg is None
    with pytest.raises(SaebenchError):
        cls.from_arg("many", build)

    acts = torch.randn(10, 16)
    codes = enc.encode(acts, EncodeContext(torch.zeros(10, dtype=torch.long), torch.arange(10)))
    recon = enc.decode(codes)
    assert recon.shape == acts.shape and recon.dtype == torch.float32
    if LATENTS in enc.capabilities:
        d = dense(codes)
        assert d.shape == (10, enc.spec.d_latent)
        assert ((d != 0).sum(1) <= 4).all()
    if DECODER_DICTIONARY in enc.capabilities:  # decode(codes) = codes @ W_dec + decode(0), dense codes too
        assert enc.W_dec.shape == (enc.spec.d_latent, 16)
        offset = enc.decode(torch.zeros(1, enc.spec.d_latent))
        torch.testing.assert_close(enc.decode(dense(codes)), dense(codes) @ enc.W_dec + offset)
        torch.testing.assert_close(recon, enc.decode(dense(codes)))
    if isinstance(codes, SparseCodes):
        assert codes.indices.shape == codes.values.shape and codes.d_latent == enc.spec.d_latent


def test_task_example_declares_a_spec_and_runs_on_a_tiny_model(tiny_llama):
    from saebench.encoders.base import BuildContext, Encoder
    from saebench.tasks.base import RunSettings, Task, TaskContext, TaskResult, TaskSpec

    cls = defined_subclass(example("task"), Task)
    assert isinstance(cls.spec, TaskSpec) and isinstance(cls.spec.version, int)
    assert cls.spec.headline in {m.name for m in cls.spec.metrics}
    task = cls.from_params({"tokens": "256", "context_len": "16"})  # ?options arrive as text
    ctx = TaskContext.create(tiny_llama, "layers.1.resid_pre", RunSettings(batch_size=4, progress=False))
    assert isinstance(task.config(ctx), dict)

    build = BuildContext(None, None, None, width=tiny_llama.d_model)
    identity = builtin("saebench.encoders", "identity").from_arg(None, build)
    mean = builtin("saebench.encoders", "mean").from_arg(None, build)
    plugin = defined_subclass(example("encoder"), Encoder).from_arg("4", build)
    results = task.run(ctx, [identity, mean, plugin])
    assert set(results) == {"identity", "mean", plugin.spec.label}
    metrics = {m.name for m in cls.spec.metrics}
    for result in results.values():
        assert isinstance(result, TaskResult) and set(result.metrics) == metrics
        assert all(n == 16 for n in result.n.values())  # 256 tokens in 16-token contexts
    assert results["identity"].metrics["norm_ratio"] == pytest.approx(1)
    assert results["identity"].metrics["cos"] == pytest.approx(1)
    assert 0 < results[plugin.spec.label].metrics["cos"] < 1
