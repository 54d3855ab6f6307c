import numpy as np
import pytest

from minift.nn import (
    Linear,
    Module,
    ModuleList,
    Parameter,
    RMSNorm,
    freeze,
    freeze_layers,
    train_only_last_layers,
    trainable_report,
    unfreeze,
)


class Tiny(Module):
    def __init__(self):
        super().__init__()
        self.layers = ModuleList([Linear(3, 4), Linear(4, 2, bias=True)])
        self.norm = RMSNorm(2)


def test_named_parameters_have_dotted_names_in_registration_order():
    names = [n for n, _ in Tiny().named_parameters()]
    assert names == ["layers.0.weight", "layers.1.weight", "layers.1.bias", "norm.weight"]


def test_tied_parameter_is_listed_once():
    m = Tiny()
    m.extra = m.layers[0].weight
    assert len(m.parameters()) == 4
    assert m.num_parameters() == 12 + 8 + 2 + 2


def test_num_parameters_trainable_only_and_report_format():
    m = Tiny()
    freeze(m, r"^layers\.0\.")
    assert m.num_parameters(trainable_only=True) == 8 + 2 + 2
    assert trainable_report(m) == "trainable params: 12 || all params: 24 || trainable%: 50.0000"


def test_freeze_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze(Tiny(), "q_proj")


def test_unfreeze_restores_trainability():
    m = Tiny()
    freeze(m)
    assert m.num_parameters(trainable_only=True) == 0
    unfreeze(m, "norm")
    assert [n for n, _ in m.named_parameters(trainable_only=True)] == ["norm.weight"]


def test_freezing_drops_an_existing_gradient():
    p = Parameter(np.ones(3))
    p.grad = np.ones(3)
    p.requires_grad_(False)
    assert p.grad is None


def test_state_dict_round_trip_and_shape_errors():
    a, b = Tiny(), Tiny()
    for p in a.parameters():
        p.data = np.random.default_rng(1).normal(size=p.shape).astype(np.float32)
    b.load_state_dict(a.state_dict())
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and np.array_equal(pa.data, pb.data)
    bad = dict(a.state_dict(), **{"norm.weight": np.ones(5, np.float32)})
    with pytest.raises(ValueError, match=r"norm.weight has shape \(5,\)"):
        b.load_state_dict(bad)
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({"norm.weight": np.ones(2, np.float32)})


def test_set_submodule_replaces_a_layer():
    m = Tiny()
    new = Linear(3, 4, bias=True)
    m.set_submodule("layers.0", new)
    assert m.layers[0] is new
    assert "layers.0.bias" in dict(m.named_parameters())
    with pytest.raises(AttributeError):
        m.set_submodule("layers.7", new)


def test_module_without_super_init_is_a_clear_error():
    class Broken(Module):
        def __init__(self):
            self.w = Parameter(np.ones(2))

    with pytest.raises(RuntimeError, match="super"):
        Broken()


def test_freeze_layers_and_last_layer_tuning_names():
    from minift.models import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(n_layers=4, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24))
    frozen = freeze_layers(model, 2)
    assert "model.embed_tokens.weight" in frozen
    assert all(".layers.0." in n or ".layers.1." in n or "embed" in n for n in frozen)
    assert any(".layers.1." in n for n in frozen) and not any(".layers.2." in n for n in frozen)
    with pytest.raises(ValueError, match="first_n"):
        freeze_layers(model, 5)
    kept = train_only_last_layers(model, 1)
    assert set(kept) == {n for n, _ in model.named_parameters(trainable_only=True)}
    assert all(".layers.3." in n or n == "model.norm.weight" for n in kept)
