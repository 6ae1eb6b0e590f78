"""Self-influence: the diagonal of the train-vs-train scores, streamed by row chunk."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_data, make_mlp

import fasttrak as ft
from fasttrak import kernel
from fasttrak.errors import ConfigError, DataError
from fasttrak.estimator import kernel_factor
from fasttrak.influence import self_influence
from fasttrak.store import complete_records

N, MODELS = 40, 3


def featurized(tmp_path, name="store", chunk_rows=None, feature_dtype="float16", **options):
    x, y = make_data(N)
    states = [make_mlp(seed=s).state_dict() for s in range(MODELS)]
    trak = ft.TRAK(
        make_mlp(),
        projector="dense",
        proj_dim=16,
        store=tmp_path / name,
        feature_dtype=feature_dtype,
        chunk_rows=chunk_rows,
        progress=False,
        **options,
    )
    trak.featurize((x, y), checkpoints=states)
    return trak, (x, y)


def oracle(trak):
    """self_i from the stored features in float64 with the closed-form block solves."""
    est = trak.estimator
    total, q_sum = np.zeros(N), np.zeros(N)
    for m in trak.store.model_ids():
        stored = trak.store.model(m)
        phi = stored.features().astype(np.float64)
        q = stored.q().astype(np.float64)
        q_sum += q
        weights = np.ones(N)
        if est.kernel == "gauss_newton":
            weights = kernel.gauss_newton_weights(q, k=trak.k) ** est.weight_power
        weighted = phi * np.sqrt(weights)[:, None]
        for part in kernel.block_slices(trak.k, est.blocks):
            g = weighted[:, part].T @ weighted[:, part]
            s = g.shape[0]
            rank = min(N, s, trak.store.num_params)
            if est.ridge == "auto":  # 0.14 x the eigenvalue of rank round(3% of min(n, p))
                e = np.sort(np.linalg.eigvalsh(g))[::-1]
                j = min(rank, max(1, round(0.03 * min(N, trak.store.num_params))))
                lam = max(0.14 * e[j - 1], 1e-3 * np.trace(g) / rank)
            else:
                lam = est.ridge * np.trace(g) / rank
            inv_phi = np.linalg.solve(g + lam * np.eye(s), phi[:, part].T)
            total += np.einsum("ij,ji->i", phi[:, part], inv_phi) / est.blocks
    return q_sum / MODELS * total / MODELS


# The scores' targets are featurized afresh in float32, while self-influence reads both
# sides from the store: with float16 storage the two differ by float16 rounding (~1e-4).
@pytest.mark.parametrize("dtype, rtol", [("float32", 2e-5), ("float16", 1e-3)])
@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("kind", ["plain", "gauss_newton"])
def test_equals_the_diagonal_of_the_dense_scores(tmp_path, kind, blocks, dtype, rtol):
    """k = 16 in 3 blocks (5, 6, 5): the padded last factor too; 3 models."""
    trak, (x, y) = featurized(tmp_path, kernel=kind, kernel_blocks=blocks, feature_dtype=dtype)
    assert trak.estimator.blocks == blocks
    got = trak.self_influence()
    assert got.shape == (N,) and got.dtype == np.float32
    dense = np.asarray(trak.score((x, y)))
    np.testing.assert_allclose(got, np.diag(dense), rtol=rtol)
    assert (got > 0).all()  # K⁻¹ is positive definite and Q > 0


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize(
    "kind, power", [("plain", 0.75), ("gauss_newton", 0.75), ("gauss_newton", 1.0)]
)
def test_agrees_with_a_float64_oracle(tmp_path, kind, power, blocks):
    """From the same stored float16 features: float64 throughout but the feature reads."""
    trak, _ = featurized(
        tmp_path, kernel=kind, kernel_blocks=blocks, precision="float64", weight_power=power
    )
    np.testing.assert_allclose(trak.self_influence(), oracle(trak), rtol=1e-5)


def test_other_estimator_than_the_constructors(tmp_path):
    trak, (x, y) = featurized(tmp_path, feature_dtype="float32")
    other = ft.Estimator(kernel="plain", kernel_blocks=2, ridge=0.5)
    dense = np.asarray(trak.score((x, y), estimator=other))
    np.testing.assert_allclose(trak.self_influence(estimator=other), np.diag(dense), rtol=2e-5)
    assert not np.allclose(trak.self_influence(), np.diag(dense), rtol=1e-3)


def test_chunked_store_gives_the_same_as_one_chunk(tmp_path):
    one, _ = featurized(tmp_path, "one", kernel_blocks=3)
    chunked, _ = featurized(tmp_path, "chunked", chunk_rows=7, kernel_blocks=3)
    assert one.store.num_chunks == 1 and chunked.store.num_chunks == 6  # 5 of 7 rows, one of 5
    np.testing.assert_allclose(chunked.self_influence(), one.self_influence(), rtol=1e-5)


def test_a_subset_of_models_and_the_function_itself(tmp_path):
    trak, (x, y) = featurized(tmp_path, kernel_blocks=3, feature_dtype="float32")
    dense = np.diag(np.asarray(trak.score((x, y), model_ids=[1, 2])))
    np.testing.assert_allclose(trak.self_influence(model_ids=[1, 2]), dense, rtol=2e-5)
    # fasttrak.influence.self_influence as TRAK.self_influence calls it
    stored = trak.store.model(1)
    records = complete_records(stored)
    with pytest.raises(ConfigError, match="for_models"):  # the "auto" ridge needs M
        kernel_factor(stored, records, trak.estimator, {})
    alone = trak.estimator.for_models(1)
    factor = kernel_factor(stored, records, alone, {})
    got = self_influence([(stored, records)], [factor], alone)
    dense = np.asarray(trak.score((x, y), model_ids=[1]))
    np.testing.assert_allclose(got, np.diag(dense), rtol=2e-5)
    with pytest.raises(DataError, match="shape"):
        self_influence([(stored, records)], [factor[:2]], alone)
    with pytest.raises(ConfigError, match="one kernel factor per model"):
        self_influence([(stored, records)], [], alone)


def test_a_dataset_passed_as_model_ids_says_the_data_comes_from_the_store(tmp_path):
    trak, (x, y) = featurized(tmp_path, kernel="plain", kernel_blocks=1, feature_dtype="float32")
    with pytest.raises(ft.ConfigTypeError, match="read from the store"):
        trak.self_influence((x, y))
