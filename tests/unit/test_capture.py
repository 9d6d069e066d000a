"""Training sets follow the run: its --corpus (training split), its --batch-size, and the records say so."""

from dataclasses import replace

import torch

from saebench import capture, corpus
from saebench.runner import RunConfig, evaluate
from saebench.tasks import context


def test_training_sets_follow_the_runs_corpus_and_batch_size(tiny_llama, tmp_path, monkeypatch):
    drawn, batch_sizes = [], []
    real_draw, real_collect = corpus.token_contexts, capture.collect_activations

    def draw(tokenizer, spec, *args):
        drawn.append((spec.name, spec.split))
        return real_draw(tokenizer, replace(spec, name="wiki"), *args)  # the embedded text stands in for the hub's

    def collect(model, hookpoint, tokens, batch_size, *args, **kwargs):
        batch_sizes.append(batch_size)
        return real_collect(model, hookpoint, tokens, batch_size, *args, **kwargs)

    monkeypatch.setattr(capture, "token_contexts", draw)
    monkeypatch.setattr(context, "token_contexts", draw)
    monkeypatch.setattr(capture, "collect_activations", collect)
    config = RunConfig(corpus="hf:someone/text", batch_size=3, limit=64, context_len=16, output_dir=tmp_path,
                       progress=False)
    rec = evaluate(tiny_llama, ["mlp?hidden=none&steps=5&train_tokens=300"], ["ce_kl"], config)[0]
    assert ("hf:someone/text", "train") in drawn and ("hf:someone/text", "eval") in drawn
    assert batch_sizes == [3]
    fit = rec.extra["encoder_data"]["fit"]
    assert fit["corpus"] == "hf:someone/text:train" and fit["tokens"] == 300 and fit["hookpoint"] == "layers.1.resid_pre"


def test_a_latent_samples_positions_leave_out_the_sinks():
    """Firing frequencies divide by the positions a latent can fire on: position 0 and BOS tokens are left out
    of the sample's activations, so of its denominator too."""
    from saebench.capture import LatentSample

    tokens = torch.tensor([[1, 5, 6, 7], [1, 8, 1, 9]])  # 1 is BOS: sinks at (0,0), (1,0), (1,2)
    sample = LatentSample(tokens, torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(3, dtype=torch.long))
    assert sample.positions(bos_id=1) == 5
