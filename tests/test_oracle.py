"""The whole estimator against its float64 closed form, with no projection (k = p)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import loop_gradients, make_data, make_mlp

import fasttrak as ft
from fasttrak.gradients import select_parameters
from fasttrak.store import complete_records


def closed_form(models, x_train, y_train, x_target, y_target, ridge):
    """score(t, i) = mean_m Q_m,i · mean_m φ_m(t)ᵀ (Φ_mᵀ Φ_m + λ_m I)⁻¹ φ_m(i), in float64."""
    n = x_train.shape[0]
    total = np.zeros((x_target.shape[0], n))
    q = np.zeros(n)
    for model in models:
        names = select_parameters(model)
        phi = loop_gradients(model, x_train, y_train, names).numpy()
        phi_t = loop_gradients(model, x_target, y_target, names).numpy()
        gram = phi.T @ phi
        lam = ridge * np.trace(gram) / min(n, gram.shape[0])
        total += phi_t @ np.linalg.solve(gram + lam * np.eye(gram.shape[0]), phi.T)
        with torch.no_grad():
            logits = model.double()(x_train.double())
            p = torch.softmax(logits, 1)[torch.arange(n), y_train].numpy()
            model.float()
        q += 1 - p
    return (q / len(models))[None, :] * total / len(models), phi


@pytest.mark.parametrize(
    ("num_models", "chunk_rows"),
    [(1, 16), (3, 16), (1, 2)],  # 2 rows per chunk: 20 chunks, two groups of partial grams
)
def test_scores_equal_float64_closed_form(num_models, chunk_rows):
    models = [make_mlp(seed=s) for s in range(num_models)]
    x, y = make_data(40, seed=1)
    xt, yt = make_data(6, seed=2)
    ridge = 1e-3
    trak = ft.TRAK(
        make_mlp(),
        projector="identity",
        kernel="plain",
        ridge=ridge,
        precision="float64",
        chunk_rows=chunk_rows,
        batch_size=7,
        progress=False,
    )
    trak.featurize((x, y), checkpoints=[m.state_dict() for m in models])
    scores = np.asarray(trak.score((xt, yt)))
    expected, phi_last = closed_form(models, x, y, xt, yt, ridge)
    assert scores.shape == (6, 40) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=2e-4, atol=2e-6 * np.abs(expected).max())

    # The stored features and kernel of the last model are the exact ones too.
    ck = trak.store.model(num_models - 1)
    np.testing.assert_allclose(ck.features(), phi_last, rtol=1e-5, atol=1e-6)
    gram = ck.read_kernel("gram", trak.estimator.resolved(ck).gram_settings(), complete_records(ck))
    np.testing.assert_allclose(gram, phi_last.T @ phi_last, rtol=1e-5, atol=1e-6)


def test_zero_ridge_on_a_singular_kernel_says_to_raise_it():
    """Margin gradients of the last-layer bias sum to zero, so Φᵀ Φ is singular."""
    model = make_mlp()
    x, y = make_data(120, seed=3)
    trak = ft.TRAK(model, projector="identity", ridge=0.0, precision="float64", progress=False)
    trak.featurize((x, y))
    with pytest.raises(np.linalg.LinAlgError, match="larger relative ridge"):
        trak.score((x[:2], y[:2]))


def test_topk_agrees_with_dense_sort():
    model = make_mlp()
    x, y = make_data(50, seed=5)
    trak = ft.TRAK(model, proj_dim=16, chunk_rows=8, progress=False)
    trak.featurize((x, y))
    scores = trak.score((x[:5], y[:5]))
    top = scores.topk(4)  # streamed over blocks, before the dense matrix exists
    dense = np.asarray(scores)
    np.testing.assert_array_equal(top.proponents, np.argsort(-dense, axis=1)[:, :4])
    np.testing.assert_array_equal(top.opponents, np.argsort(dense, axis=1)[:, :4])
    np.testing.assert_allclose(top.proponent_scores, -np.sort(-dense, axis=1)[:, :4])
    np.testing.assert_allclose(top.opponent_scores, np.sort(dense, axis=1)[:, :4])
    with pytest.raises(ValueError, match="k must be"):
        scores.topk(51)


def test_scores_save_writes_the_dense_matrix(tmp_path):
    model = make_mlp()
    x, y = make_data(30, seed=6)
    trak = ft.TRAK(model, proj_dim=8, chunk_rows=7, progress=False)
    trak.featurize((x, y))
    scores = trak.score((x[:3], y[:3]))
    saved = scores.save(tmp_path / "scores.zarr")
    np.testing.assert_allclose(saved[:], np.asarray(scores))


def closed_form_options(model, x, y, xt, yt, ridge, weighting, blocks, power=1.0):
    """float64 oracle of the Gauss-Newton kernel, R = (p (1 - p))^power, and of the
    block-diagonal kernels (one model, k = p)."""
    names = select_parameters(model)
    phi = loop_gradients(model, x, y, names).numpy()
    phi_t = loop_gradients(model, xt, yt, names).numpy()
    with torch.no_grad():
        p = torch.softmax(model.double()(x.double()), 1)[torch.arange(len(y)), y].numpy()
        model.float()
    weights = (p * (1 - p)) ** power if weighting == "gauss_newton" else np.ones_like(p)
    gram = phi.T @ (weights[:, None] * phi)
    k, n = gram.shape[0], len(y)
    edges = np.linspace(0, k, blocks + 1).round().astype(int)
    total = np.zeros((len(yt), n))
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        g = gram[a:b, a:b]
        lam = ridge * np.trace(g) / min(n, b - a)
        total += phi_t[:, a:b] @ np.linalg.solve(g + lam * np.eye(b - a), phi[:, a:b].T)
    return (1 - p)[None, :] * total / blocks


@pytest.mark.parametrize(
    "weighting, blocks, power",
    [
        ("gauss_newton", 1, 0.75),  # the default kernel
        ("gauss_newton", 1, 1.0),  # the Gauss-Newton Hessian itself
        ("gauss_newton", 1, 0.3),
        ("plain", 3, 0.75),  # the power is the Gauss-Newton kernel's only
        ("gauss_newton", 4, 0.75),
        ("gauss_newton", 4, 1.0),
    ],
)
def test_kernel_options_equal_their_closed_form(weighting, blocks, power):
    model = make_mlp(seed=4)
    x, y = make_data(50, seed=8)
    xt, yt = make_data(5, seed=9)
    trak = ft.TRAK(
        model,
        projector="identity",
        ridge=0.05,
        precision="float64",
        kernel=weighting,
        kernel_blocks=blocks,
        weight_power=power,
        progress=False,
    )
    trak.featurize((x, y))
    scores = np.asarray(trak.score((xt, yt)))
    expected = closed_form_options(model, x, y, xt, yt, 0.05, weighting, blocks, power)
    np.testing.assert_allclose(scores, expected, rtol=2e-4, atol=2e-6 * np.abs(expected).max())


def test_each_weight_power_keys_its_own_gram(tmp_path):
    """A gram cached for one γ is never reused for another: the powers share the stored
    features, each builds (and caches) its own kernel, and γ = 1 keeps the key that grams
    cached before the power existed have."""
    model = make_mlp()
    x, y = make_data(40)
    trak = ft.TRAK(model, proj_dim=16, store=tmp_path, precision="float64", progress=False)
    trak.featurize((x, y))
    ck = trak.store.model(0)
    records = complete_records(ck)
    scores = {}
    for power in (1.0, 0.75, 0.5):
        estimator = ft.Estimator(weight_power=power)
        scores[power] = np.asarray(trak.score((x[:3], y[:3]), estimator=estimator))
        settings = estimator.resolved(ck).gram_settings()
        assert ck.read_kernel("gram", settings, records) is not None
        assert ("power" in settings) == (power != 1.0)
    assert not np.allclose(scores[1.0], scores[0.75])
    assert not np.allclose(scores[0.75], scores[0.5])
    again = ft.TRAK(model, proj_dim=16, store=tmp_path, weight_power=0.5, progress=False)
    np.testing.assert_allclose(
        np.asarray(again.score((x[:3], y[:3]), checkpoints=[model])), scores[0.5]
    )


@pytest.mark.parametrize("power", [0, -0.5, 1.5, float("nan"), float("inf"), "0.75", True, None])
def test_a_weight_power_outside_0_1_names_the_range(power):
    with pytest.raises(ft.ConfigError, match=r"weight_power must be a number in \(0, 1\]"):
        ft.Estimator(weight_power=power)


def test_kernel_options_share_one_store(tmp_path):
    """Switching kernel options re-solves from the stored features; nothing is recomputed."""
    model = make_mlp()
    x, y = make_data(40)
    plain = ft.TRAK(model, proj_dim=16, store=tmp_path, progress=False)
    plain.featurize((x, y))
    a = np.asarray(plain.score((x[:3], y[:3])))
    other = ft.TRAK(
        model, proj_dim=16, store=tmp_path, kernel="gauss_newton", kernel_blocks=2, progress=False
    )
    b = np.asarray(other.score((x[:3], y[:3]), checkpoints=[model.state_dict()]))
    assert not np.allclose(a, b)
    ck = other.store.model(0)
    assert (
        ck.read_kernel("gram", other.estimator.resolved(ck).gram_settings(), complete_records(ck))
        is not None
    )
    again = ft.TRAK(model, proj_dim=16, store=tmp_path, progress=False)
    np.testing.assert_allclose(np.asarray(again.score((x[:3], y[:3]), checkpoints=[model])), a)


def test_bad_kernel_options():
    from fasttrak.kernel import gauss_newton_weights

    with pytest.raises(ValueError, match="kernel must be one of"):
        ft.TRAK(make_mlp(), kernel="hessian")
    with pytest.raises(ValueError, match="ridge must be 'auto' or a finite number >= 0"):
        ft.TRAK(make_mlp(), ridge=-1.0)
    with pytest.raises(ValueError, match="kernel='plain'"):
        gauss_newton_weights(np.array([0.2, 1.5]))
    with pytest.raises(ValueError, match="kernel_blocks"):
        ft.TRAK(make_mlp(), proj_dim=8, kernel_blocks=9)


def test_soft_threshold():
    scores = np.array([[3.0, -2.0, 0.5, -0.1], [1.0, 1.0, -4.0, 0.0]])
    kept = ft.soft_threshold(scores, keep=0.5)
    tau = np.quantile(np.abs(scores), 0.5, axis=1, keepdims=True)
    np.testing.assert_allclose(kept, np.sign(scores) * np.maximum(np.abs(scores) - tau, 0))
    np.testing.assert_allclose(ft.soft_threshold(scores, keep=1.0), scores)
    with pytest.raises(ValueError, match="fraction"):
        ft.soft_threshold(scores, keep=0)


def test_scoring_a_subset_of_the_stored_models():
    models = [make_mlp(seed=s) for s in range(3)]
    x, y = make_data(40, seed=1)
    xt, yt = make_data(4, seed=2)
    trak = ft.TRAK(
        make_mlp(),
        projector="identity",
        kernel="plain",
        ridge=1e-3,
        precision="float64",
        progress=False,
    )
    trak.featurize((x, y), checkpoints=[m.state_dict() for m in models])
    subset = np.asarray(trak.score((xt, yt), model_ids=[0, 2]))
    expected, _ = closed_form([models[0], models[2]], x, y, xt, yt, 1e-3)
    np.testing.assert_allclose(subset, expected, rtol=2e-4, atol=2e-6 * np.abs(expected).max())
    by_checkpoints = trak.score((xt, yt), checkpoints=[models[0], models[2]], model_ids=[0, 2])
    np.testing.assert_allclose(np.asarray(by_checkpoints), subset)
    with pytest.raises(ValueError, match="distinct stored model ids"):
        trak.score((xt, yt), model_ids=[0, 5])


@pytest.mark.parametrize("kernel", ["plain", "gauss_newton"])
@pytest.mark.parametrize("ridge", [1e-6, 1e-9])
def test_fewer_rows_than_k_match_the_dual_float64_form_at_tiny_ridges(kernel, ridge):
    """k = p = 483 > n = 24: the kernel is λ I on the directions no training feature spans, so
    a small ridge puts |φ|/λ into K⁻¹ φ(target); the scores must still equal the float64 dual
    form S = Φ_t Φᵀ (R Φ Φᵀ + λ I)⁻¹ ⊙ Q̄ (n × n, exact up to float64 rounding)."""
    model = make_mlp(seed=3, d_in=20, hidden=20, classes=3)
    x, y = make_data(24, d_in=20, seed=4)
    xt, yt = make_data(5, d_in=20, seed=5)
    trak = ft.TRAK(
        make_mlp(d_in=20, hidden=20, classes=3),
        projector="identity",
        kernel=kernel,
        ridge=ridge,
        precision="float64",
        progress=False,
    )
    trak.featurize((x, y), checkpoints=[model.state_dict()])
    scores = np.asarray(trak.score((xt, yt), checkpoints=[model.state_dict()]), np.float64)
    ck = trak.store.model(0)
    records = complete_records(ck)
    phi = ck.features().astype(np.float64)  # (n, k), k > n
    phi_t = loop_gradients(model, xt, yt, select_parameters(model)).double().numpy()
    q = ck.q().astype(np.float64)
    from fasttrak.estimator import kernel_weights

    weights = kernel_weights(ck, records, trak.estimator)
    r = np.ones_like(q) if weights is None else weights.astype(np.float64) ** 2
    assert phi.shape[1] > phi.shape[0]
    dual = phi @ phi.T
    lam = ridge * np.trace(r[:, None] * dual) / phi.shape[0]  # ridge relative to trace / n
    expected = np.linalg.solve(dual * r[None, :] + lam * np.eye(len(q)), (phi_t @ phi.T).T).T
    expected *= q[None, :]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _gram_with_spectrum(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    gen = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(gen.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (basis * eigenvalues) @ basis.T


@pytest.mark.parametrize(
    ("n", "k", "p", "j"),
    [
        (1000, 200, None, 30),  # 3% of min(n, p) = 30 (not of k)
        (1000, 200, 4000, 30),
        (100, 200, None, 3),  # n < k: 3% of n
        (1000, 200, 62, 2),  # p < k: round(1.86)
        (10, 200, None, 1),  # at least the first eigenvalue
        (100_000, 200, None, 200),  # at most the last of min(n, k, p) (here: the floor)
    ],
)
def test_auto_ridge_is_a_fraction_of_the_eigenvalue_at_three_percent_of_the_rank(n, k, p, j):
    from fasttrak import kernel

    eigenvalues = np.geomspace(1e3, 1e-3, k)  # distinct, descending
    gram = _gram_with_spectrum(eigenvalues)
    got = kernel.ridge_value(gram, "auto", n, p)
    floor = 1e-3 * eigenvalues.sum() / min(n, k, p or k)
    np.testing.assert_allclose(got, max(0.14 * eigenvalues[j - 1], floor), rtol=1e-8)
    # Scale-free: features scaled by c scale G, and so λ, by c².
    np.testing.assert_allclose(kernel.ridge_value(9.0 * gram, "auto", n, p), 9.0 * got, rtol=1e-8)


def test_auto_ridge_of_a_kernel_of_rank_below_j_is_floored_at_the_mean_eigenvalue_scale():
    from fasttrak import kernel

    gram = np.full((64, 64), 2.0)  # rank 1: every training feature equal
    lam = kernel.ridge_value(gram, "auto", 1000)
    np.testing.assert_allclose(lam, 1e-3 * np.trace(gram) / 64)
    assert kernel.block_diagonal_factor(gram, "auto", 1000).shape == (1, 64, 64)


@pytest.mark.parametrize("n, p", [(1000, None), (40, 500), (1000, 62)])
def test_single_model_auto_ridge_scales_with_the_relative_effective_rank(n, p):
    """max(1, s / 0.1)^1.5 times the ensemble's λ, s = trace² / ‖G‖²_F / min(n, k, p): a flat
    spectrum (s = 1) gets 10^1.5 times it, a steep one (s < 0.1) the same λ."""
    from fasttrak import kernel

    k = 64
    rank = min(n, k, p or k)
    flat = _gram_with_spectrum(np.r_[np.ones(rank), np.zeros(k - rank)])
    steep = _gram_with_spectrum(np.geomspace(1e3, 1e-3, k))
    for gram in (flat, steep):
        alone = kernel.ridge_value(gram, "auto", n, p, single_model=True)
        ensemble = kernel.ridge_value(gram, "auto", n, p)
        s = np.trace(gram) ** 2 / np.sum(gram**2) / rank
        factor = max(1.0, s / 0.1) ** 1.5
        np.testing.assert_allclose(alone / ensemble, factor, rtol=1e-8)
        np.testing.assert_allclose(alone, closed_form_auto_ridge(gram, n, p or n, True), rtol=1e-8)
        assert kernel.ridge_value(gram, 0.3, n, p, single_model=True) == kernel.ridge_value(
            gram, 0.3, n, p
        )  # a numeric ridge does not depend on the ensemble
    s_flat = np.trace(flat) ** 2 / np.sum(flat**2) / rank
    np.testing.assert_allclose(s_flat, 1.0, rtol=1e-8)
    assert kernel.single_model_factor(1.0, 1.0 / 0.05, 1) == 1.0  # s = 0.05: unchanged
    assert kernel.single_model_factor(0.0, 0.0, 4) == 1.0  # a zero kernel: nothing to judge
    assert kernel.ridge_value(np.zeros((4, 4)), "auto", 10, single_model=True) == 0.0


def closed_form_auto_ridge(gram, n, p, single_model):
    """λ of the "auto" ridge in numpy: c · e_j, j = 3% of min(n, p) within [1, min(n, k, p)],
    at least 1e-3 · trace / min(n, k, p); c = 0.14, times max(1, s / 0.1)^1.5 for a model
    scored alone, s = trace² / ‖G‖²_F / min(n, k, p)."""
    rank = min(n, gram.shape[0], p)
    e = np.sort(np.linalg.eigvalsh(gram))[::-1]
    j = min(rank, max(1, round(0.03 * min(n, p))))
    scale = 0.14
    if single_model:
        s = np.trace(gram) ** 2 / np.sum(gram**2) / rank
        scale *= max(1.0, s / 0.1) ** 1.5
    return max(scale * e[j - 1], 1e-3 * np.trace(gram) / rank)


@pytest.mark.parametrize("models", [1, 2])
@pytest.mark.parametrize("blocks", [1, 3])
def test_auto_ridge_scores_equal_their_closed_form_per_block(blocks, models):
    """The default ridge through the whole pipeline, against numpy: per block and model,
    λ_b from the block's own spectrum, j = 3% of min(n, p) within [1, min(n, k / B, p)], and
    the single-model scale when one model is scored (here s > 0.1, so it acts)."""
    x, y = make_data(50, seed=8)
    xt, yt = make_data(5, seed=9)
    checkpoints = [make_mlp(seed=4 + m).state_dict() for m in range(models)]
    trak = ft.TRAK(
        make_mlp(seed=4), proj_dim=32, precision="float64", kernel_blocks=blocks, progress=False
    )
    assert trak.estimator.ridge == "auto"
    trak.featurize((x, y), checkpoints=checkpoints)
    scores = np.asarray(trak.score((xt, yt)), dtype=np.float64)
    p = trak.store.num_params
    power = ft.kernel.DEFAULT_WEIGHT_POWER
    total, q_sum, boosted = np.zeros((5, 50)), np.zeros(50), []
    for m in range(models):
        stored = trak.store.model(m)
        phi, q = stored.features().astype(np.float64), stored.q().astype(np.float64)
        q_sum += q
        weighted = phi * (ft.kernel.gauss_newton_weights(q, k=32) ** (power / 2))[:, None]
        target = trak.features((xt, yt), checkpoint=checkpoints[m], model_id=m).phi
        target = target.astype(np.float64)
        for part in ft.kernel.block_slices(32, blocks):
            g = weighted[:, part].T @ weighted[:, part]
            lam = closed_form_auto_ridge(g, 50, p, single_model=models == 1)
            boosted.append(lam / closed_form_auto_ridge(g, 50, p, single_model=False))
            solved = np.linalg.solve(g + lam * np.eye(g.shape[0]), phi[:, part].T)
            total += target[:, part] @ solved / blocks
    expected = q_sum[None, :] / models * total / models
    if models == 1:
        assert min(boosted) > 1.5  # the single-model scale is exercised, not a no-op
    np.testing.assert_allclose(scores, expected, rtol=2e-4, atol=2e-6 * np.abs(expected).max())


def test_auto_and_relative_ridges_keep_separate_factors_in_one_store(tmp_path):
    model = make_mlp(seed=4)
    x, y = make_data(40, seed=8)
    trak = ft.TRAK(model, proj_dim=16, store=tmp_path / "s", progress=False)
    trak.featurize((x, y))
    auto = np.asarray(trak.score((x[:3], y[:3])))
    relative = np.asarray(trak.score((x[:3], y[:3]), estimator=ft.Estimator(ridge=0.1)))
    again = np.asarray(trak.score((x[:3], y[:3])))
    assert not np.allclose(auto, relative)
    np.testing.assert_array_equal(auto, again)
