"""The support registry (``normlayers.support``): complete, its probes right, and its declared compile/export true.

The docs' support matrix is generated from this registry; these tests are what makes its "compile" and "export"
columns claims that were checked, and its probed columns consistent with the layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlayers
from normlayers import support
from normlayers.testing import assert_close


def test_every_public_layer_has_an_entry():
    layers = {name for name in normlayers.__all__
              if isinstance(getattr(normlayers, name), type) and issubclass(getattr(normlayers, name), nn.Module)}
    assert layers == set(support.LAYERS)


def test_probe_records_the_triton_ops_and_nothing_for_torch_only_layers():
    evo = support.probe(support.LAYERS["EvoNorm2dB0"])
    # the fused layer: moments, the finalize kernel, the elementwise pass (issue 16), and their backward ops
    assert evo["triton_fwd"] == ("plane_moments", "evo_norm_b_finalize", "plane_max_div_affine")
    assert set(evo["triton_bwd"]) == {"plane_max_div_affine_bwd", "evo_norm_b_finalize_bwd", "plane_moments_bwd"}
    assert evo["sync_stats"] and not evo["fold"]
    ws = support.probe(support.LAYERS["WSConv2d"])
    assert ws["triton_fwd"] == ws["triton_bwd"] == () and ws["fold"] and not ws["sync_stats"]
    assert support.probe(support.LAYERS["RegionNorm2d"])["sync_stats"]
    for name in ("LayerNorm2d", "RMSNorm2d"):  # one op pair for both, per-sample statistics, nothing to fold
        channel = support.probe(support.LAYERS[name])
        assert (channel["triton_fwd"], channel["triton_bwd"]) == (("channel_norm_fwd",), ("channel_norm_bwd",))
        assert not channel["sync_stats"] and not channel["fold"]


def test_matrix_has_a_row_per_layer():
    rows = support.support_matrix_markdown().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == list(support.LAYERS)


@pytest.mark.parametrize("name", [n for n, e in support.LAYERS.items() if e.compile])
def test_declared_compile_fullgraph_holds(name):
    torch._dynamo.reset()
    module, (x, *rest) = support.LAYERS[name].make()

    def step(mod, inp):
        leaf = inp.clone().requires_grad_()
        out = mod(leaf, *rest)
        out.square().sum().backward()
        return [out.detach(), leaf.grad, *(p.grad for p in mod.parameters())]

    with normlayers.backend("triton"):
        eager = step(copy.deepcopy(module), x)
        compiled_module = copy.deepcopy(module)
        compiled = step(torch.compile(compiled_module, fullgraph=True, backend="aot_eager"), x)
    for a, b in zip(eager, compiled):
        assert_close(a, b)


@pytest.mark.parametrize("name", [n for n, e in support.LAYERS.items() if e.export])
def test_declared_export_holds(name):
    module, inputs = support.LAYERS[name].make()
    with normlayers.backend("triton"):
        exported = torch.export.export(module.eval(), inputs)
        assert_close(exported.module()(*inputs), module(*inputs))
