"""saebench.delphi_files against a run folder written by delphi's own code (benchmarks/make_delphi_fixtures.py)."""

import json
import shutil
from pathlib import Path

import pytest

from saebench.delphi_files import (FIELDS, SCORER_DIRS, latent_file_name, read_explanations, read_scores,
                                   write_explanations, write_scores)
from saebench.errors import SaebenchError

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "delphi_run"
MODULE = "layers.3.mlp"


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_is_byte_identical(tmp_path):
    module, texts = read_explanations(FIXTURE)
    assert module == MODULE and sorted(texts) == [0, 7, 42]
    assert "“curly”" in texts[0] and '"double"' in texts[0]
    write_explanations(tmp_path, module, texts)
    for scorer in SCORER_DIRS:
        module, per_latent = read_scores(FIXTURE, scorer)
        assert module == MODULE and sorted(per_latent) == [0, 7, 42]
        write_scores(tmp_path, scorer, module, per_latent)
    assert files(tmp_path) == files(FIXTURE)


def test_fixture_holds_delphi_values():
    _, detection = read_scores(FIXTURE, "detection")
    examples = [e for latent in detection.values() for e in latent]
    assert list(examples[0]) == list(FIELDS["detection"])
    assert {e["distance"] for e in examples} == {0, 1, -1.0}
    assert any(e["prediction"] is None for e in examples) and any(e["probability"] is None for e in examples)
    _, fuzz = read_scores(FIXTURE / "scores", "fuzzing")
    assert any(e["correct"] is None for latent in fuzz.values() for e in latent)


def test_written_bytes_are_orjson_not_json(tmp_path):
    example = {"text": "naïve", "distance": -1.0, "similarity": 1e-7, "extra": "left out"}
    (path,) = write_scores(tmp_path, "embedding", "h/3", {5: [example]})
    assert path.name == "h--3_latent5.txt" == latent_file_name("h/3", 5)
    assert path.read_bytes() == '[{"text":"naïve","distance":-1.0,"similarity":1e-7}]'.encode()
    assert json.loads(path.read_bytes()) == [{"text": "naïve", "distance": -1.0, "similarity": 1e-7}]
    assert read_scores(tmp_path, "embedding") == ("h/3", {5: [{k: example[k] for k in FIELDS["embedding"]}]})
    assert read_scores(tmp_path, "embedding", module="h--3")[0] == "h/3"
    assert not list(path.parent.glob(".tmp-*"))


def test_several_modules_need_a_choice(tmp_path):
    write_explanations(tmp_path, "layers.1", {0: "a"})
    write_explanations(tmp_path, "layers.2", {0: "b"})
    with pytest.raises(SaebenchError, match=r"several modules \(layers.1, layers.2\); pick one with module="):
        read_explanations(tmp_path)
    assert read_explanations(tmp_path / "explanations", module="layers.2") == ("layers.2", {0: "b"})
    with pytest.raises(SaebenchError, match="no module 'layers.9'"):
        read_explanations(tmp_path, module="layers.9")


def test_malformed_files_name_the_file(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "run")
    bad = tmp_path / "run" / "explanations" / f"{MODULE}_latent7.txt"
    bad.write_bytes(b'{"not": "a string"}')
    with pytest.raises(SaebenchError, match=r"layers.3.mlp_latent7.txt' is not a JSON string") as err:
        read_explanations(tmp_path / "run")
    assert "\n" not in str(err.value)
    bad = tmp_path / "run" / "scores" / "fuzz" / f"{MODULE}_latent42.txt"
    bad.write_bytes(b'[{"str_tokens": ["a"]')
    with pytest.raises(SaebenchError, match=r"fuzz/layers.3.mlp_latent42.txt' is not JSON"):
        read_scores(tmp_path / "run", "fuzzing")
    bad.write_bytes(b'[{"str_tokens": ["a"]}]')
    with pytest.raises(SaebenchError, match=r"latent42.txt': example 0 lacks activations, distance"):
        read_scores(tmp_path / "run", "fuzzing")
    with pytest.raises(SaebenchError, match="folder .* does not exist"):
        read_scores(tmp_path, "detection")


def test_bad_writes(tmp_path):
    with pytest.raises(SaebenchError, match="unknown delphi scorer 'fuzz'; known: detection, fuzzing, surprisal"):
        write_scores(tmp_path, "fuzz", MODULE, {})
    with pytest.raises(SaebenchError, match="unknown delphi scorer"):
        read_scores(FIXTURE, "simulation")
    with pytest.raises(SaebenchError, match="example 0 lacks similarity"):
        write_scores(tmp_path, "embedding", MODULE, {0: [{"text": "a", "distance": 0}]})
    with pytest.raises(SaebenchError, match="has a '/'"):
        write_explanations(tmp_path, "a/b", {0: "x"})
    with pytest.raises(SaebenchError, match="not a non-negative int"):
        write_explanations(tmp_path, MODULE, {-1: "x"})
