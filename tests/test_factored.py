"""The factored (LoGra-style) per-layer projection against exact per-example gradients."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import loop_gradients, make_cnn, make_data, make_mlp
from torch import nn

from fasttrak.gradients import is_covered, layer_spec
from fasttrak.projection.factored import Factored, FactoredProjector
from fasttrak.tasks.classification import ImageClassification

TASK = ImageClassification()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _loop_oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]):
    """Per-example margin gradients (float64), one autograd.grad call per example; works for
    integer (token) inputs too."""
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1] if not x.is_floating_point() else x[i : i + 1].double()
        logits = model(xi)[0]
        others = torch.cat([logits[: y[i]], logits[y[i] + 1 :]])
        f = logits[y[i]] - torch.logsumexp(others, 0)
        grads = torch.autograd.grad(f, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _expected(projector: FactoredProjector, model: nn.Module, grads, names: list[str]):
    """Explicit Kronecker matrices applied to exact gradients reordered to [W | b] layout."""
    named = dict(model.named_parameters())
    blocks, off = {}, 0
    for n in names:
        blocks[n] = grads[:, off : off + named[n].numel()]
        off += named[n].numel()
    size = grads.shape[0]
    out = []
    for ly in projector.layers:
        if ly.kind == "embedding":
            hom = blocks[ly.weight]  # (vocab, dim) row-major
        else:
            cols = []
            if ly.weight is not None:
                cols.append(blocks[ly.weight].reshape(size, ly.d_out, -1))
            if ly.bias is not None:
                cols.append(blocks[ly.bias].reshape(size, ly.d_out, 1))
            hom = torch.cat(cols, dim=2).reshape(size, -1)
        out.append(hom.double() @ projector.kron(ly.name).double())
    return torch.cat(out, dim=1)


def _check(model, x, y, config, selected, proj_dim=16, oracle=None):
    model.eval()
    projector = config.build_factored(model, selected, proj_dim, seed=3, model_id=1, device="cpu")
    feats = projector.batch_features(_state(model), TASK, (x, y))
    names = projector.params
    grads = (oracle or _loop_oracle)(model, x, y, names)
    expected = _expected(projector, model, grads, names)
    assert feats.dtype == torch.float32
    assert feats.shape == (x.shape[0], projector.k)
    torch.testing.assert_close(feats.double(), expected, rtol=1e-4, atol=1e-5)
    return projector, feats


def test_mlp_exact_with_bias_homogeneous():
    model = make_mlp(d_in=5, hidden=7, classes=3)
    x, y = make_data(6, d_in=5)
    selected = [n for n, _ in model.named_parameters()]
    config = Factored(k_in=3, k_out=2)
    projector, _ = _check(model, x, y, config, selected, oracle=loop_gradients)
    assert projector.k == 2 * 3 * 2
    assert projector.layers[0].d_in == 6  # 5 inputs + the homogeneous bias coordinate
    # default dims: k_in = k_out = round(sqrt(proj_dim / layers))
    projector, _ = _check(model, x, y, Factored(), selected, proj_dim=32)
    assert projector.k == 2 * 4 * 4
    assert Factored().output_dim_for(model, selected, 32) == 32


def test_partial_layer_selection_and_no_param_grads():
    model = make_mlp(d_in=5, hidden=7, classes=3)
    x, y = make_data(5, d_in=5)
    # first layer weight only, last layer bias only
    _check(model, x, y, Factored(k_in=3, k_out=4), ["0.weight", "2.bias"])
    assert all(p.grad is None for p in model.parameters())


def test_inplace_relu_and_weight_sharing():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            return self.b(self.act(self.a(self.act(self.a(x)))))  # `a` is applied twice

    torch.manual_seed(0)
    model = Net()
    x, y = make_data(5, d_in=4)
    _check(model, x, y, Factored(k_in=3, k_out=3), [n for n, _ in model.named_parameters()])


def test_cnn_exact_excluding_batchnorm():
    model = make_cnn()
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    selected = [n for n, _ in model.named_parameters()]
    config = Factored(k_in=3, k_out=2, others="exclude")
    projector, feats = _check(model, x, y, config, selected)
    assert projector.params == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    assert config.excluded(model, selected) == ["bn.weight", "bn.bias"]
    # the same via params= and others="error"
    narrow = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    p2 = Factored(k_in=3, k_out=2).build_factored(
        model, narrow, 16, seed=3, model_id=1, device="cpu"
    )
    torch.testing.assert_close(p2.batch_features(_state(model), TASK, (x, y)), feats)


def test_conv_stride_dilation_reflect_padding():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 3, (3, 2), stride=2, dilation=(1, 2), padding=1)
            self.c2 = nn.Conv2d(3, 2, 3, padding="same", padding_mode="reflect", bias=False)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 2, 7, 7, generator=torch.Generator().manual_seed(2))
    assert model(x).shape == (3, 3)
    y = torch.tensor([2, 0, 1])
    _check(model, x, y, Factored(k_in=4, k_out=3), [n for n, _ in model.named_parameters()])


class TokenModel(nn.Module):
    """Embedding -> per-token Linear -> tanh -> per-token Linear -> sum over tokens."""

    def __init__(self, vocab: int = 11, dim: int = 4, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.proj = nn.Linear(dim, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, tokens):
        return self.head(torch.tanh(self.proj(self.emb(tokens)))).sum(dim=1)


def test_sequence_model_with_embedding_and_padding_idx():
    torch.manual_seed(0)
    model = TokenModel()
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 11, (5, 6), generator=gen)
    tokens[:, -2:] = 0  # padding
    tokens[0, 0] = tokens[0, 1] = 7  # repeated token in one example
    y = torch.randint(0, 3, (5,), generator=gen)
    selected = [n for n, _ in model.named_parameters()]
    projector, feats = _check(model, tokens, y, Factored(k_in=3, k_out=2), selected)
    assert projector.layers[0].kind == "embedding"
    assert (projector.layers[0].d_in, projector.layers[0].d_out) == (11, 4)
    # padding tokens contribute nothing: changing the padding row's projection is invisible
    projector.p_in["emb"][0] = 100.0
    projector._engine = None
    torch.testing.assert_close(projector.batch_features(_state(model), TASK, (tokens, y)), feats)


def test_determinism_batch_sizes_builds_seeds():
    model = make_mlp(d_in=5, hidden=7, classes=3).eval()
    x, y = make_data(6, d_in=5)
    selected = [n for n, _ in model.named_parameters()]
    config = Factored(k_in=3, k_out=3)

    def feats(seed=0, model_id=0, rows=slice(None)):
        pr = config.build_factored(model, selected, 16, seed=seed, model_id=model_id, device="cpu")
        return pr.batch_features(_state(model), TASK, (x[rows], y[rows]))

    full = feats()
    torch.testing.assert_close(torch.cat([feats(rows=slice(0, 2)), feats(rows=slice(2, 6))]), full)
    assert torch.equal(feats(), full)
    assert not torch.allclose(feats(seed=1), full)
    assert not torch.allclose(feats(model_id=1), full)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu():
    model = make_cnn().eval()
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    sel = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    config = Factored(k_in=4, k_out=3)
    cpu = config.build_factored(model, sel, 16, 0, 0, "cpu").batch_features(
        _state(model), TASK, (x, y)
    )
    gpu_model = copy.deepcopy(model).cuda()
    gpu = config.build_factored(gpu_model, sel, 16, 0, 0, "cuda")
    assert torch.equal(
        gpu.p_in["fc"].cpu(), config.build_factored(model, sel, 16, 0, 0, "cpu").p_in["fc"]
    )
    out = gpu.batch_features(_state(gpu_model), TASK, (x.cuda(), y.cuda()))
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_kronecker_map_preserves_norms_in_expectation():
    model = nn.Linear(6, 5)
    v = torch.randn(5 * 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    config = Factored(k_in=4, k_out=3)
    norms = torch.stack(
        [
            (v @ config.build_factored(model, ["weight", "bias"], 1, s, 0, "cpu").kron("").double())
            .pow(2)
            .sum()
            for s in range(300)
        ]
    )
    se = norms.std() / norms.numel() ** 0.5
    assert abs(norms.mean() - v.pow(2).sum()) < 4 * se


def test_errors():
    model = make_cnn()
    selected = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"bn\.weight.*params=.*others='exclude'"):
        Factored().layers(model, selected)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="groups=1"):
        Factored().build_factored(grouped, ["0.weight"], 4, 0, 0, "cpu")
    with pytest.raises(ValueError, match="nothing to project"):
        Factored(others="exclude").layers(model, ["bn.weight"])
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        Factored().build_factored(
            nn.Embedding(5, 2, scale_grad_by_freq=True), ["weight"], 4, 0, 0, "cpu"
        )
    with pytest.raises(ValueError, match="k_in"):
        Factored(k_in=0)
    # The one projector protocol, fully: no method of it raises for the factored kind.
    from fasttrak.gradients import GradientMethod
    from fasttrak.projection import Featurizer, ProjectorConfig

    config, linear = Factored(), nn.Linear(3, 2)
    assert isinstance(config, ProjectorConfig)
    layout = config.layout(linear, ["weight", "bias"], 8)
    built = config.featurizer(linear, layout, 0, 0, torch.device("cpu"), GradientMethod())
    assert isinstance(built, Featurizer) and built.k == layout.k == 9  # 3 x 3


def test_layers_without_a_factored_rule_are_outside_covered_layers():
    """A grouped convolution and an embedding with scale_grad_by_freq / max_norm / sparse take
    the hook engine's local rule: others="exclude" drops them, others="error" names them."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Conv2d(4, 2, 3, padding="same"), nn.Flatten()
    )
    assert [is_covered(m) for m in model] == [False, True, False]
    assert not is_covered(nn.Embedding(5, 2, max_norm=1.0)) and is_covered(nn.Embedding(5, 2))
    selected = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"groups=1.*\['0\.weight', '0\.bias'\]"):
        Factored().layers(model, selected)
    assert Factored(others="exclude").layers(model, selected) == ["1"]
    assert Factored(others="exclude").excluded(model, selected) == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match="groups=1"):
        layer_spec(model, "0", selected)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_same_padding_conv_features_equal_projected_hook_gradients(mode):
    from fasttrak.checkpoints import load_state
    from fasttrak.gradients import HookGradients

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode=mode),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 3),
    ).eval()
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    names = ["0.weight", "0.bias"]
    projector = Factored(k_in=3, k_out=2).build_factored(model, names, 6, 0, 0, "cpu")
    state = load_state(model, None)
    feats = projector.batch_features(state, TASK, (x, y))
    grads = torch.cat(HookGradients(model, TASK, names).parts(state, (x, y)), dim=1)
    expected = _expected(projector, model, grads, names)
    torch.testing.assert_close(feats.double(), expected, rtol=1e-4, atol=1e-5)


def test_large_layer_memory_without_vmap():
    """Linear(2000, 2000) (p = 4M) at B = 8: a (B, p) float32 tensor would be 128 MB."""
    script = textwrap.dedent(
        """
        import resource, torch
        import torch.func
        def boom(*a, **k):
            raise AssertionError("vmap called")
        torch.func.vmap = boom
        import fasttrak.gradients.vmap as vm
        vm.vmap = boom
        from torch import nn
        from fasttrak.projection.factored import Factored
        from fasttrak.tasks.classification import ImageClassification
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2000, 2000), nn.Tanh(), nn.Linear(2000, 3)).eval()
        state = {**dict(model.named_parameters())}
        pr = Factored(k_in=8, k_out=8).build_factored(model, list(state), 128, 0, 0, "cpu")
        x, y = torch.randn(8, 2000), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        pr.batch_features(state, ImageClassification(), (x[:1], y[:1]))  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        feats = pr.batch_features(state, ImageClassification(), (x, y))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert feats.shape == (8, 128) and torch.isfinite(feats).all()
        print((after - before) / 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 100  # MB of peak RSS growth


# ---------------------------------------------------------------- through ft.TRAK


def test_trak_with_factored_projection_end_to_end(tmp_path):
    import numpy as np
    from conftest import make_data, make_mlp

    import fasttrak as ft

    model = make_mlp()
    x, y = make_data(40)
    trak = ft.TRAK(model, projector="factored", proj_dim=64, store=tmp_path, progress=False)
    trak.featurize((x, y))
    factored = np.asarray(trak.score((x[:3], y[:3])))
    exact = ft.TRAK(model, projector="identity", progress=False)
    exact.featurize((x, y))
    reference = np.asarray(exact.score((x[:3], y[:3])))
    # Measured 0.97 on 2026-11-28 (k = 2 layers x 6 x 6 = 72 vs p = 43).
    assert np.corrcoef(factored.ravel(), reference.ravel())[0, 1] > 0.9
    assert trak.store.meta["projector"]["kind"] == "factored"
    with pytest.raises(ft.StoreMismatchError, match="projector"):
        ft.TRAK(model, projector=ft.projection.Factored(k_in=3, k_out=3), store=tmp_path)


def test_trak_factored_reports_excluded_parameters():
    from conftest import make_cnn

    import fasttrak as ft

    model = make_cnn()
    with pytest.raises(ValueError, match="bn.weight"):
        ft.TRAK(model, projector="factored", progress=False)
    trak = ft.TRAK(model, projector=ft.projection.Factored(others="exclude"), progress=False)
    assert trak.excluded == ["bn.weight", "bn.bias"]
    assert "bn.weight" not in trak.params
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    trak.featurize((x, y))
    assert trak.store.model(0).features().shape == (10, trak.k)
