"""replace_norms keeps every constructor argument of the norms the default mapping swaps.

For each source class of ``DEFAULT_MAPPING`` (``nn.LayerNorm``, ``nn.RMSNorm``, and the ``*RMSNorm`` pattern: Hugging
Face's Llama-style and Gemma-style RMSNorms), the arguments away from their defaults: eps, ``elementwise_affine=False``,
``bias=False`` and a normalized_shape of more than one dim, where the source class has them. The oracle is the source
module itself (torch's or transformers' own math): a copy of it, kept aside before the swap, must give the same
outputs and gradients as the new module. The swaps run with ``verify=False``, so these tests pin the conversion, not
the probe that ``replace_norms`` runs as a safety net; inputs have a variance of about 0.1, where an eps of 0.1 moves
the output by ~40%, and a dropped or defaulted argument cannot hide.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlayers

EPS = 0.1  # comparable to the inputs' variance, so an eps lost in the conversion changes the outputs visibly


def _randomized(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def _assert_same_function(new: nn.Module, old: nn.Module, shape: tuple[int, ...]) -> None:
    """Same outputs, input gradients and parameter gradients on a random input with trailing dims ``shape``."""
    x = (0.3 * torch.randn(2, 3, *shape)).requires_grad_()
    y_new, y_old = new(x), old(x)
    torch.testing.assert_close(y_new, y_old)
    old_params = dict(old.named_parameters())
    new_params = dict(new.named_parameters())
    assert set(new_params) == set(old_params)
    names = sorted(old_params)
    g = torch.randn_like(y_old)
    grads_new = torch.autograd.grad(y_new, [x, *(new_params[n] for n in names)], g)
    grads_old = torch.autograd.grad(y_old, [x, *(old_params[n] for n in names)], g)
    for name, a, b in zip(["input", *names], grads_new, grads_old):
        torch.testing.assert_close(a, b, msg=name)


def _replaced(old: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the module replace_norms returns for ``old``, an untouched copy of ``old``); parameters are adopted."""
    oracle = copy.deepcopy(old)
    params = dict(old.named_parameters())
    new = normlayers.replace_norms(old, verify=False)
    assert all(p is params[name] for name, p in new.named_parameters()), "parameters must be adopted, not copied"
    return new, oracle


# (source class, target class, constructor arguments away from the defaults); nn.RMSNorm has no bias argument.
TORCH_CASES = [(nn.LayerNorm, normlayers.LayerNorm, kwargs) for kwargs in (
    dict(eps=EPS),
    dict(elementwise_affine=False),
    dict(bias=False),
    dict(eps=EPS, bias=False),
    dict(eps=EPS, elementwise_affine=False, bias=False),
)] + [(nn.RMSNorm, normlayers.RMSNorm, kwargs) for kwargs in (
    dict(eps=EPS),
    dict(eps=None),  # nn.RMSNorm's default: torch.finfo(input.dtype).eps at call time
    dict(elementwise_affine=False),
    dict(eps=EPS, elementwise_affine=False),
)]


def _case_id(case) -> str:
    source, _, kwargs = case
    return f"{source.__name__}(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"


@pytest.mark.parametrize("shape", [(8,), (3, 5)], ids=["1dim", "2dim"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[_case_id(case) for case in TORCH_CASES])
def test_torch_norm_arguments_survive(shape, case):
    source, target, kwargs = case
    torch.manual_seed(0)
    new, oracle = _replaced(_randomized(source(shape, **kwargs)))
    assert type(new) is target
    assert new.normalized_shape == oracle.normalized_shape == shape
    assert new.eps == oracle.eps and new.elementwise_affine == oracle.elementwise_affine
    for name in ("weight", "bias"):
        assert (getattr(new, name, None) is None) == (getattr(oracle, name, None) is None), name
    _assert_same_function(new, oracle, shape)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_hf_rms_norm_eps_survives(name):
    # Hugging Face's RMSNorms take only (hidden_size, eps): always a weight, no bias, one normalized dim; so eps is
    # the one argument to carry (Llama stores it as `variance_epsilon`, Gemma as `eps`).
    pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(2)
    new, oracle = _replaced(_randomized({"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm}[name](8, eps=EPS)))
    assert type(new) is normlayers.RMSNorm and new.eps == EPS and new.normalized_shape == (8,)
    _assert_same_function(new, oracle, (8,))
