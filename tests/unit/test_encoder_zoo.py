"""ito, sparse_coding and mlp encoders: known answers, references from scikit-learn, bad input."""

import pytest
import torch

from saebench.encoders.base import (
    BuildContext,
    SparseCodes,
    TensorTrainingSet,
    dense,
    unknown_text,
)
from saebench.encoders.dictionary import split_inner
from saebench.errors import SaebenchError


def problem(n_atoms=128, d=64, k=4, n=32, seed=0):
    """An incoherent unit-norm dictionary and exactly k-sparse non-negative codes (noise free)."""
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(n_atoms, d, generator=gen)
    D = D / D.norm(dim=1, keepdim=True)
    S = torch.zeros(n, n_atoms)
    idx = torch.rand(n, n_atoms, generator=gen).argsort(1)[:, :k]
    S.scatter_(1, idx, 0.5 + torch.rand(n, k, generator=gen))
    return D, S, S @ D


def given(D, X, **defaults):
    """A build context without a model: the task's known dictionary D and training set X."""
    return BuildContext(None, None, None, progress=False, width=D.shape[1], dictionary=D, d_latent=D.shape[0],
                        training=TensorTrainingSet(X, {"test": True}), option_defaults={"*": defaults})


@pytest.mark.parametrize("method", ["omp", "gp", "mp"])
def test_pursuits_recover_exactly_sparse_codes(method):
    from sklearn.linear_model import orthogonal_mp

    D, S, X = problem()
    enc = given(D, X).build(f"ito?method={method}&k=4")
    codes = dense(enc.encode(X, unknown_text(len(X))))
    if method == "omp":  # the reference: scikit-learn's OMP, one signal at a time
        reference = torch.tensor(orthogonal_mp(D.T.double().numpy(), X.T.double().numpy(), n_nonzero_coefs=4)).T
        torch.testing.assert_close(codes.double(), reference, atol=1e-4, rtol=0)
        torch.testing.assert_close(codes, S, atol=1e-4, rtol=0)
    else:  # MP and GP converge towards the truth on an incoherent dictionary; their support is exact here
        assert ((codes != 0) == (S != 0)).float().mean() > 0.99
    assert (codes != 0).sum(1).max() <= 4
    torch.testing.assert_close(enc.decode(enc.encode(X, unknown_text(len(X)))), codes @ D, atol=1e-5, rtol=0)


def test_pursuit_on_an_orthonormal_dictionary_is_exact_for_every_method():
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    S = torch.zeros(8, 16)
    S[:, :3] = torch.rand(8, 3) + 0.1
    X = S @ Q
    for method in ("mp", "omp", "gp"):
        codes = dense(given(Q, X).build(f"ito?method={method}&k=3").encode(X, unknown_text(8)))
        torch.testing.assert_close(codes, S, atol=1e-5, rtol=0)


def test_fista_matches_scikit_learns_non_negative_lasso():
    from sklearn.linear_model import Lasso

    D, _, X = problem(n_atoms=32, d=16, k=3, n=4, seed=2)
    l1 = 0.05
    enc = given(D, X).build(f"sparse_coding?method=fista&l1={l1}&iters=3000")
    codes = dense(enc.encode(X, unknown_text(len(X))))
    # saebench: mean_dims(r^2) + l1 mean_latents(s) = (2/d) (0.5|r|^2 + lam |s|_1), lam = l1 d / (2 N);
    # scikit-learn: (1 / (2 d)) |r|^2 + alpha |s|_1, the same minimiser when alpha = lam / d
    alpha = l1 * 16 / (2 * 32) / 16
    for x, code in zip(X, codes):
        ref = Lasso(alpha=alpha, positive=True, fit_intercept=False, tol=1e-10, max_iter=100_000)
        ref.fit(D.T.double().numpy(), x.double().numpy())
        torch.testing.assert_close(code.double(), torch.tensor(ref.coef_), atol=2e-3, rtol=0)


def test_ista_and_topk_sparse_coding():
    D, S, X = problem(n_atoms=64, d=32, k=3, n=16, seed=3)
    ista = dense(given(D, X).build("sparse_coding?method=ista&l1=0.001&iters=500").encode(X, unknown_text(16)))
    assert ((ista @ D - X) ** 2).mean() < 1e-3
    top = given(D, X).build("sparse_coding?method=topk&k=3&iters=300")
    codes = dense(top.encode(X, unknown_text(16)))
    assert (codes != 0).sum(1).max() <= 3 and (codes >= 0).all()
    torch.testing.assert_close(codes, S, atol=1e-3, rtol=0)


def test_learned_dictionary_and_mlp_fit_are_deterministic_given_the_seed():
    D, _, X = problem(n_atoms=16, d=8, k=2, n=256, seed=4)
    build = BuildContext(None, None, None, progress=False, width=8, d_latent=16,
                         training=TensorTrainingSet(X, {"test": 4}), fit_seed=7)
    first = [build.build(s) for s in ("mlp?steps=50", "sparse_coding?steps=20")]
    again = BuildContext(None, None, None, progress=False, width=8, d_latent=16,
                         training=TensorTrainingSet(X, {"test": 4}), fit_seed=7)
    for enc, spec in zip(first, ("mlp?steps=50", "sparse_coding?steps=20")):
        other = again.build(spec)
        torch.testing.assert_close(enc.W_dec, other.W_dec)
        torch.testing.assert_close(dense(enc.encode(X, unknown_text(256))), dense(other.encode(X, unknown_text(256))))
        assert enc.training_flops > 0 and enc.encode_flops > 0
        torch.testing.assert_close(enc.W_dec.norm(dim=1), torch.ones(16))  # learned atoms have unit norm


def test_ito_from_the_encoders_own_code_keeps_its_support():
    D, S, X = problem(n_atoms=32, d=16, k=3, n=16, seed=5)
    build = given(D, X, steps="200")
    sae = build.build("linear_sae")
    refit = build.build("ito?method=omp&k=3&init=encoder")
    assert refit.inner is sae  # built once, shared
    mine = dense(sae.encode(X, unknown_text(16)))
    codes = dense(refit.encode(X, unknown_text(16)))
    top = mine.topk(3, dim=1).indices
    assert ((codes != 0).float().scatter(1, top, 0) == 0).all()  # no latent outside the encoder's top 3


def _objective(codes, D, X, l1):
    """Gradient ITO's loss per token: mean_dims (x - s D)^2 + l1 * mean_latents |s|."""
    return ((codes @ D - X) ** 2).mean(1) + l1 * codes.abs().mean(1)


def test_gradient_ito_starts_from_the_sae_and_never_raises_its_loss():
    D, _, X = problem(n_atoms=32, d=16, k=3, n=64, seed=6)
    build = given(D, X, steps="100")
    sae = build.build("linear_sae")
    start = dense(sae.encode(X, unknown_text(64)))
    before = _objective(start, D, X, 0.01)
    losses = [before]
    for iters in (1, 2, 5, 20, 200):
        ito = build.build(f"ito?method=gradient&iters={iters}")
        assert ito.inner is sae and ito.spec.params["init"] == "encoder" and "k" not in ito.spec.params
        assert ito.encode_flops == sae.encode_flops + 4 * 32 * 16 * iters  # per iteration x iterations (G.4)
        codes = dense(ito.encode(X, unknown_text(64)))
        assert (codes >= 0).all()
        losses.append(_objective(codes, D, X, 0.01))
    for earlier, later in zip(losses, losses[1:]):
        assert (later <= earlier + 1e-6).all()  # per token, every step lowers or keeps the loss
    assert losses[-1].mean() < 0.5 * before.mean()
    assert ((codes @ D - X) ** 2).mean() < ((start @ D - X) ** 2).mean()  # and the reconstruction error


def test_gradient_ito_from_zero_is_ista_and_pursuits_keep_their_spec():
    D, _, X = problem(n_atoms=32, d=16, k=3, n=8, seed=7)
    build = given(D, X, steps="20")
    ito = build.build("ito?method=gradient&init=zero&iters=50&l1=0.05")
    ista = build.build("sparse_coding?method=ista&iters=50&l1=0.05")
    torch.testing.assert_close(dense(ito.encode(X, unknown_text(8))), dense(ista.encode(X, unknown_text(8))))
    omp = build.build("ito?method=omp&k=3")
    assert set(omp.spec.params) == {"method", "k", "init", "inner"} and omp.spec.params["init"] == "zero"


def test_mlp_codes_loss_is_in_the_spec_only_with_known_codes():
    D, S, X = problem(n_atoms=16, d=8, k=2, n=64, seed=8)
    with_codes = BuildContext(None, None, None, progress=False, width=8, d_latent=16,
                              training=TensorTrainingSet(X, {"test": 8}, S))
    enc = with_codes.build("mlp?codes_loss=cosine&steps=30&hidden=16")
    assert enc.spec.params["codes_loss"] == "cosine"
    assert (dense(enc.encode(X, unknown_text(64))) >= 0).all()
    without = BuildContext(None, None, None, progress=False, width=8, d_latent=16, training=TensorTrainingSet(X, {}))
    assert "codes_loss" not in without.build("mlp?steps=5&hidden=16").spec.params


def test_sparse_codes_with_a_repeated_index_add_up():
    codes = SparseCodes(torch.tensor([[1, 1, 2]]), torch.tensor([[0.5, 0.25, 1.0]]), 4)
    torch.testing.assert_close(dense(codes), torch.tensor([[0.0, 0.75, 1.0, 0.0]]))


def test_inner_spec_syntax():
    assert split_inner("sae:default?k=16") == ("sae:default", {"k": "16"})
    assert split_inner("(sae:default?context_len=1024)?k=16") == ("sae:default?context_len=1024", {"k": "16"})
    assert split_inner("?k=3") == (None, {"k": "3"})
    with pytest.raises(SaebenchError, match="unbalanced parentheses"):
        split_inner("(sae:default")


def test_bad_encoder_options_are_one_clear_error():
    D, _, X = problem(n_atoms=16, d=8, k=2, n=32)
    build = given(D, X)
    with pytest.raises(SaebenchError, match="k=40 is larger than"):
        build.build("ito?k=40&method=mp")
    with pytest.raises(SaebenchError, match="method='lars'"):
        build.build("ito?method=lars&k=2")
    with pytest.raises(SaebenchError, match="ito has no option 'kk'"):
        build.build("ito?kk=2")
    with pytest.raises(SaebenchError, match=r"lr in \(0, 1\] \(units of 1/L\)"):
        build.build("ito?method=gradient&lr=2")
    with pytest.raises(SaebenchError, match="iters must be at least 1"):
        build.build("ito?method=gradient&iters=0")
    with pytest.raises(SaebenchError, match="codes_loss='l2': use mse or cosine"):
        build.build("mlp?codes_loss=l2")
    with pytest.raises(SaebenchError, match="hidden='a,b' must be positive widths"):
        build.build("mlp?hidden=a,b")
    with pytest.raises(SaebenchError, match="needs k"):
        BuildContext(None, None, None, width=8, training=TensorTrainingSet(X, {})).build("sparse_coding?method=topk")
