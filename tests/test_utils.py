"""compressor.utils: dotted names in a module tree, and one meaning of include/exclude globs for every method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor import masks as M
from compressor.kernels import swap_sparse_kernels, unswap_sparse_kernels
from compressor.sara import core as sara
from compressor.utils.names import find_module, join_name, module_name_of, owner, set_module, split_name
from compressor.utils.selectors import matches, selected


class Net(nn.Module):
    """Layers named enc.0, enc.1 (in a ModuleList) and head, plus a free parameter on the root."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
        self.head = nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        for lin in self.enc:
            x = torch.relu(lin(x))
        return self.head(x) * self.scale


def test_names_split_join_and_owner():
    assert split_name("enc.0.weight") == ("enc.0", "weight") and split_name("scale") == ("", "scale")
    assert join_name("enc.0", "weight") == "enc.0.weight" and join_name("", "scale") == "scale"
    assert module_name_of("enc.1.bias") == "enc.1" and module_name_of("scale") == ""
    net = Net()
    mod, attr = owner(net, "enc.1.bias")
    assert mod is net.enc[1] and attr == "bias"
    mod, attr = owner(net, "scale")
    assert mod is net and attr == "scale"
    with pytest.raises(AttributeError):
        owner(net, "dec.0.weight")


def test_find_and_set_module():
    net = Net()
    assert find_module(net, "") is net
    assert find_module(net, "enc.1") is net.enc[1]
    assert find_module(net, "enc.2") is None  # index past the end
    assert find_module(net, "enc.0.weight") is None  # a tensor, not a module
    assert find_module(net, "nope") is None
    new = nn.Linear(16, 16)
    set_module(net, "enc.1", new)
    assert net.enc[1] is new and dict(net.named_modules())["enc.1"] is new
    set_module(net, "head", nn.Identity())
    assert isinstance(net.head, nn.Identity)
    with pytest.raises(AttributeError):
        set_module(net, "dec.0", new)


def test_selector_meaning():
    assert matches("enc.0.weight", ["enc.0"])  # the module's name
    assert matches("enc.0.weight", ["*.weight"])  # the parameter's name
    assert not matches("enc.0.weight", ["enc"])  # a glob, not a prefix
    assert not matches("enc.0.weight", None) and not matches("enc.0.weight", [])
    assert selected("head.bias") and selected("head.bias", [], [])
    assert selected("enc.1.weight", ["enc.*"], ["head"])
    assert not selected("enc.1.weight", ["enc.*"], ["enc.1"])
    assert not selected("head.weight", ["enc.*"])


# (include, exclude, the layers a person reading the recipe expects)
CASES = [
    (["enc.*"], ["enc.1"], {"enc.0"}),
    (["*.weight"], None, {"enc.0", "enc.1", "head"}),
    (["head"], None, {"head"}),
    (None, ["enc.0", "head.weight"], {"enc.1"}),
]


@pytest.mark.parametrize(("include", "exclude", "expected"), CASES)
def test_same_include_selects_same_layers_in_every_method(include, exclude, expected):
    """The same recipe include/exclude picks the same layers in magnitude pruning, SaRA and the sparse-kernel
    swap (before, SaRA and the swap matched parameter names / module names only, so they disagreed)."""
    net = Net()
    magnitude = {module_name_of(n) for n in M.prunable_weights(net, include, exclude)}
    # SaRA considers every tensor (biases, free parameters too): compare the Linear weights it would train
    linears = {n for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    sara_layers = {module_name_of(n) for n, _ in sara.candidate_params(net, include, exclude or ())
                   if n in {join_name(lin, "weight") for lin in linears}}
    with torch.no_grad():
        for lin in linears:
            w = net.get_submodule(lin).weight
            w[torch.rand_like(w) < 0.9] = 0
    rep = swap_sparse_kernels(net, (torch.randn(4, 16),), min_sparsity=0.0, mode="csr", measure=False,
                              include=include, exclude=exclude)
    unswap_sparse_kernels(net)
    swapped = {r.name for r in rep.layers}
    assert magnitude == expected
    assert sara_layers == expected
    assert swapped == expected
