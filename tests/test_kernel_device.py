"""The kernel's linear algebra on the TRAK object's device: finalize (gram, ridge, Cholesky),
the targets' solves, the scores' chunk products and self-influence.

On the CPU, an explicit ``device=torch.device("cpu")`` gives the bits of the default path
(fasttrak before devices). The device path itself is checked on CPU tensors too (by taking
it with ``kernel.cpu_path`` replaced), so that CI covers its code; the CUDA tests (marked
``cuda``, skipped without a GPU) compare a CUDA TRAK with a CPU TRAK on the same stored
features: float32 products differ by rounding only (measured ~1e-7 relative on these
kernels), so they must agree within 1e-5 relative (of the largest entry), with TF32
switched on by the test to show that fasttrak turns it off for its products.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp

import fasttrak as ft
from fasttrak import kernel
from fasttrak.errors import ConfigError, NumericalError
from fasttrak.estimator import gram_groups, kernel_factor, local_partial_grams, solve_targets
from fasttrak.influence import self_influence
from fasttrak.scoring import Scores, _visible
from fasttrak.store import complete_records

CPU = torch.device("cpu")
GPU = "cuda"  # the device of the CUDA tests
N, K, MODELS, CHUNK = 256, 32, 2, 64
RTOL = 1e-5  # GPU against CPU, same features: float32 rounding is ~1e-7 here

ESTIMATORS = [  # "auto" needs the ensemble size when kernel_factor is called directly
    ft.Estimator("gauss_newton", kernel_blocks=1, ensemble_size=MODELS),
    ft.Estimator("gauss_newton", kernel_blocks=4, ensemble_size=MODELS),
    ft.Estimator("plain", ridge=0.1, kernel_blocks=3),  # blocks of 11, 11, 10: padded
    ft.Estimator("gauss_newton", kernel_blocks=2, precision="float64", ensemble_size=MODELS),
    ft.Estimator("gauss_newton", kernel_blocks=2, ensemble_size=1),  # the single-model scale
]


def states():
    return [make_mlp(seed=s).state_dict() for s in range(MODELS)]


def featurized(store=None, model=None, device="cpu"):
    """A TRAK on ``device`` whose store holds CPU-made features of N rows for MODELS models
    (featurized here on the CPU when the store is new)."""
    trak = ft.TRAK(
        make_mlp() if model is None else model,
        projector="dense",
        proj_dim=K,
        store=store,
        chunk_rows=CHUNK,
        device=device,
        progress=False,
    )
    if not trak.store.model_ids():
        trak.featurize(make_data(N), checkpoints=states())
    return trak


def targets():
    return make_data(7, seed=5)


def parts(trak):
    stored = [trak.store.model(m) for m in trak.store.model_ids()]
    return [(model, complete_records(model)) for model in stored]


def close(got, want, rtol):
    """Equal within ``rtol`` of each entry or of the largest entry (normwise)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


@pytest.fixture
def tf32_allowed():
    """``torch.backends.cuda.matmul.allow_tf32 = True`` for the test, restored after (the
    legacy setting, then each backend's, as fasttrak's guard restores them)."""
    legacy = torch.get_float32_matmul_precision()
    saved = [(owner, owner.fp32_precision) for owner in kernel._matmul_precision_attributes()]
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        for owner, value in saved:
            owner.fp32_precision = value


# ---------------------------------------------------------------- CPU: the same bits
def test_an_explicit_cpu_device_gives_the_bits_of_the_default_path():
    gen = np.random.default_rng(0)
    blocks = [gen.standard_normal((30, 12)).astype(np.float32) for _ in range(3)]
    for precision, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        old = torch.zeros((12, 12), dtype=torch.float64)  # the loop before devices
        for block in blocks:
            phi = torch.from_numpy(block).to(dtype)
            old += (phi.T @ phi).double()
        default = kernel.gram(blocks, 12, precision)
        np.testing.assert_array_equal(default, old.numpy())
        np.testing.assert_array_equal(kernel.gram(blocks, 12, precision, device=CPU), default)
    g = kernel.gram(blocks, 12)
    for ridge in ("auto", 0.1):
        assert kernel.ridge_value(g, ridge, 90, 50, device=CPU) == kernel.ridge_value(
            g, ridge, 90, 50
        )
    assert kernel.auto_ridge(g, 90, 50, device="cpu") == kernel.auto_ridge(g, 90, 50)
    np.testing.assert_array_equal(
        kernel.cholesky_factor(g, 0.1, 90, device=CPU), kernel.cholesky_factor(g, 0.1, 90)
    )
    rhs = torch.from_numpy(gen.standard_normal((12, 4)))
    for blocks_ in (1, 3, 5):
        factor = kernel.block_diagonal_factor(g, "auto", 90, blocks_)
        np.testing.assert_array_equal(
            kernel.block_diagonal_factor(g, "auto", 90, blocks_, device=CPU), factor
        )
        assert torch.equal(kernel.solve(factor, rhs, device=CPU), kernel.solve(factor, rhs))


def test_a_cpu_trak_runs_on_the_cpu_and_gives_the_bits_of_explicit_cpu_calls():
    trak = featurized()
    assert trak.linalg_device == CPU
    est = ft.Estimator("gauss_newton", kernel_blocks=2, ensemble_size=MODELS)
    trak.finalize(estimator=est)
    models = parts(trak)
    factors = []
    for model, records in models:
        chosen = est.resolved(model)
        groups = gram_groups(model.num_chunks)
        default = list(local_partial_grams(model, records, chosen, groups))
        explicit = list(local_partial_grams(model, records, chosen, groups, CPU))
        for a, b in zip(default, explicit, strict=True):
            np.testing.assert_array_equal(a, b)
        factor = kernel_factor(model, records, est, {})  # cached by finalize
        np.testing.assert_array_equal(kernel_factor(model, records, est, {}, device=CPU), factor)
        gram = sum(default, np.zeros((K, K)))
        built = kernel.block_diagonal_factor(
            gram, chosen.ridge, model.num_rows, 2, "gauss_newton", model.store.num_params
        )
        np.testing.assert_array_equal(built, factor)
        factors.append(factor)
    influence = self_influence(models, factors, est)
    np.testing.assert_array_equal(self_influence(models, factors, est, device=CPU), influence)
    np.testing.assert_array_equal(trak.self_influence(estimator=est), influence)
    scores = trak.score(targets(), checkpoints=states(), estimator=est)
    assert scores.device == CPU
    explicit = Scores(scores._models, scores._solved, device=CPU)
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(scores))
    phi = torch.randn(5, K, dtype=torch.float64)
    assert torch.equal(solve_targets(factors[0], phi, CPU), solve_targets(factors[0], phi))


# ---------------------------------------------------------------- the device path, on CPU
@pytest.fixture
def device_path(monkeypatch):
    """Every kernel step takes its device path (float64 tensors on the device), here on
    CPU tensors: the same code a CUDA device runs, less the copies and TF32."""
    monkeypatch.setattr(kernel, "cpu_path", lambda device: False)


@pytest.mark.parametrize(
    "est", ESTIMATORS, ids=lambda e: f"{e.kernel}-{e.kernel_blocks}-M{e.ensemble_size}"
)
def test_the_device_path_equals_the_cpu_path_on_cpu_tensors(est, monkeypatch):
    trak = featurized()
    models = parts(trak)
    want_factors = [kernel_factor(m, r, est, {}, device=CPU) for m, r in models]
    want_influence = self_influence(models, want_factors, est)
    want_scores = np.asarray(trak.score(targets(), checkpoints=states(), estimator=est))
    other = featurized()  # its own store: nothing cached
    monkeypatch.setattr(kernel, "cpu_path", lambda device: False)
    other.finalize(estimator=est)
    got_models = parts(other)
    got_factors = [kernel_factor(m, r, est, {}) for m, r in got_models]
    for got, want in zip(got_factors, want_factors, strict=True):
        close(got, want, 1e-9)
    close(other.self_influence(estimator=est), want_influence, 1e-9)
    scores = other.score(targets(), checkpoints=states(), estimator=est)
    close(np.asarray(scores), want_scores, 1e-6)


def test_the_device_path_raises_for_a_bad_kernel(device_path):
    with pytest.raises(NumericalError, match="NaN/inf"):
        kernel.block_diagonal_factor(np.full((4, 4), np.nan), 0.1, 10, 2)
    with pytest.raises(NumericalError, match="zero"):
        kernel.cholesky_factor(np.zeros((4, 4)), 0.1, 10, "plain")
    with pytest.raises(NumericalError, match="zero"):  # one block of a nonzero kernel
        kernel.block_diagonal_factor(np.diag([1.0, 1.0, 0.0, 0.0]), 0.1, 10, 2)
    with pytest.raises(kernel.NotPositiveDefiniteError):
        kernel.cholesky_factor(np.array([[1.0, 2.0], [2.0, 1.0]]), 0.0, 5)
    with pytest.raises(ConfigError, match="ridge"):
        kernel.ridge_value(np.eye(3), -1.0, 5)


# ---------------------------------------------------------------- devices and the TF32 guard
def test_devices_other_than_cpu_and_cuda_run_the_kernel_on_the_cpu_or_are_refused():
    assert kernel.linalg_device("mps") == CPU
    assert kernel.linalg_device("cuda:1") == torch.device("cuda:1")
    assert kernel.linalg_device(torch.device("cpu")) == CPU
    with pytest.raises(ConfigError, match="CPU or a CUDA device"):
        kernel.gram([np.ones((2, 2), np.float32)], 2, device="mps")
    with pytest.raises(ConfigError, match="CPU or a CUDA device"):
        Scores([], [], device="meta")


def test_the_tf32_guard_turns_tf32_off_inside_and_restores_the_settings(tf32_allowed):
    assert torch.backends.cuda.matmul.allow_tf32
    with kernel.full_precision_matmul("cpu"):  # the CPU path is left alone
        assert torch.backends.cuda.matmul.allow_tf32
    with kernel.full_precision_matmul("cuda"):  # only flags: runs without a GPU
        assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
    with pytest.raises(RuntimeError, match="inside"):
        with kernel.full_precision_matmul(torch.device("cuda")):
            raise RuntimeError("inside")
    assert torch.backends.cuda.matmul.allow_tf32


def test_pickled_scores_keep_their_device_where_it_is_visible(tmp_path):
    trak = featurized(tmp_path / "store")
    scores = trak.score(targets(), checkpoints=states())
    again = pickle.loads(pickle.dumps(scores))
    assert again.device == CPU
    np.testing.assert_array_equal(np.asarray(again), np.asarray(scores))
    assert _visible("cpu") == CPU
    assert _visible("cuda:99") == CPU  # no such GPU here: the CPU


# ---------------------------------------------------------------- CUDA against the CPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gram_is_full_float32_with_tf32_allowed(tf32_allowed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 512, generator=gen)
    want = (x.double().T @ x.double()).numpy()
    got = kernel.gram(list(x.numpy().reshape(4, 1024, 512)), 512, "float32", device=GPU)
    assert torch.backends.cuda.matmul.allow_tf32  # restored
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert error < 1e-6, error  # float32: ~1e-7; TF32 (10-bit mantissa): ~1e-4
    on_gpu = x.to(GPU)
    raw = (on_gpu.T @ on_gpu).double().cpu().numpy()  # with TF32, as the user set it
    tf32_error = np.linalg.norm(raw - want) / np.linalg.norm(want)
    if tf32_error > 1e-5:  # TF32 took effect on this GPU: the guard beat it
        assert error < tf32_error / 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tf32", [False, True], ids=["tf32-off", "tf32-on"])
@pytest.mark.parametrize(
    "est", ESTIMATORS, ids=lambda e: f"{e.kernel}-{e.kernel_blocks}-M{e.ensemble_size}"
)
def test_cuda_trak_equals_cpu_trak_on_the_same_features(est, tf32, tmp_path, request):
    cpu = featurized(tmp_path / "cpu")
    featurized(tmp_path / "gpu")  # the same features, on the CPU, in another store
    gpu = featurized(tmp_path / "gpu", model=make_mlp().to(GPU), device=GPU)
    assert gpu.linalg_device == torch.device(GPU)
    for (a, ra), (b, rb) in zip(parts(cpu), parts(gpu), strict=True):
        np.testing.assert_array_equal(a.read_all("features", ra), b.read_all("features", rb))
    if tf32:
        request.getfixturevalue("tf32_allowed")
    cpu.finalize(estimator=est)
    gpu.finalize(estimator=est)
    assert torch.backends.cuda.matmul.allow_tf32 == tf32  # the user's setting, restored
    for (a, ra), (b, rb) in zip(parts(cpu), parts(gpu), strict=True):
        close(kernel_factor(b, rb, est, {}), kernel_factor(a, ra, est, {}), RTOL)
    close(gpu.self_influence(estimator=est), cpu.self_influence(estimator=est), RTOL)
    want = cpu.score(targets(), checkpoints=states(), estimator=est)
    # The chunk products on the GPU, from the CPU's solved targets (the same inputs):
    on_gpu = Scores(want._models, want._solved, device=GPU)
    close(np.asarray(on_gpu), np.asarray(want), RTOL)
    # The targets' solves on the GPU, from the same target features:
    factor = kernel_factor(*parts(cpu)[0], est, {})
    phi = torch.randn(7, K, generator=torch.Generator().manual_seed(1))
    close(solve_targets(factor, phi, GPU).numpy(), solve_targets(factor, phi).numpy(), 1e-9)
    if not tf32:  # the whole score call: targets featurized on the GPU too (TF32 off)
        got = gpu.score(targets(), checkpoints=states(), estimator=est)
        assert got.device == torch.device(GPU)
        close(np.asarray(got), np.asarray(want), 1e-4)  # the GPU's target features: ~1e-6
    assert torch.backends.cuda.matmul.allow_tf32 == tf32
