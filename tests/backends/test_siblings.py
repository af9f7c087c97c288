"""Linears that read one input run as one (:mod:`quadllm.backends.siblings`): each sibling gets the
output it computes alone, whatever the call order, and the fused layer follows weight changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import quantize_tiny, random_ids

from quadllm.backends import place
from quadllm.backends.int4 import int4pack_available
from quadllm.backends.siblings import SiblingGroup, fusable
from quadllm.nn.modules import QuadLinear

BACKENDS = ["cpu-int8"] + (["cpu-int4"] if int4pack_available() else [])
DIMS = dict(hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=128)


def _groups(model) -> list[SiblingGroup]:
    seen: dict[int, SiblingGroup] = {}
    for m in model.modules():
        if isinstance(m, QuadLinear) and m.kernel is not None and m.kernel.siblings is not None:
            seen[id(m.kernel.siblings)] = m.kernel.siblings
    return list(seen.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,cfg", [
    ("llama", dict(method="quad", rank=16, mode="w4a4")),
    ("qwen2", dict(method="quad", rank=16, mode="w4a4a8", o_rank=4)),  # q/k/v biases, gate/up none
    ("llama", dict(method="quad", rank=16, mode="w4a4", act_sym=False)),
    ("mistral", dict(method="quarot", mode="w4a8")),
])
def test_fused_model_gives_the_unfused_logits(backend, arch, cfg):
    """Prefill (cpu-int4's INT8 path) and short inputs (its INT4 path): the same logits as each
    linear alone; each layer's q/k/v and gate/up form one group."""
    model = quantize_tiny(arch, weights="rtn", model_kwargs=DIMS, **cfg)
    ids = {"decode": random_ids(2, 3, seed=4), "prefill": random_ids(1, 40, seed=5)}
    place(model, backend, fuse=False)
    assert not _groups(model)
    with torch.no_grad():
        ref = {k: model(v).logits for k, v in ids.items()}
    place(model, backend)
    groups = _groups(model)
    assert [len(g.members) for g in groups] == [3, 2] * model.config.num_hidden_layers
    with torch.no_grad():
        for k, v in ids.items():
            got = model(v).logits
            assert torch.allclose(got, ref[k], rtol=1e-5, atol=1e-5), k
    assert all(g.pending is None for g in groups)  # every sibling took its output


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_call_order_and_a_different_input(backend):
    model = quantize_tiny("qwen2", weights="rtn", method="quad", rank=16, model_kwargs=DIMS)
    attn = model.model.layers[0].self_attn
    lins = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(3, lins[0].in_features, generator=torch.Generator().manual_seed(0))
    place(model, backend, fuse=False)
    with torch.no_grad():
        alone = [lin(x) for lin in lins]
        other = attn.k_proj(x + 1)
    place(model, backend)
    group = attn.q_proj.kernel.siblings
    with torch.no_grad():
        assert torch.allclose(attn.v_proj(x), alone[2], rtol=1e-5, atol=1e-6)  # computes all three
        assert group.pending is not None and group.pending[0] is x and sorted(group.pending[1]) == [0, 1]
        # another input: computed now, never the kept output of x (whose kept outputs it replaces)
        assert torch.allclose(attn.k_proj(x + 1), other, rtol=1e-5, atol=1e-6)
        assert torch.allclose(attn.q_proj(x), alone[0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(attn.k_proj(x), alone[1], rtol=1e-5, atol=1e-6)
        assert sorted(group.pending[1]) == [2]
        assert torch.allclose(attn.v_proj(x), alone[2], rtol=1e-5, atol=1e-6)
    assert group.pending is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fused_layer_follows_changed_weights(backend):
    """Fine-tuning changes outlier columns and scales in place: the fused layer is rebuilt."""
    model = quantize_tiny("llama", weights="rtn", method="quad", rank=16, model_kwargs=DIMS)
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, mlp.up_proj.in_features, generator=torch.Generator().manual_seed(1))
    place(model, backend)
    with torch.no_grad():
        before = mlp.up_proj(x)
        mlp.gate_proj(x)
        mlp.up_proj.w_outlier.mul_(2)
        mlp.up_proj.scales.mul_(0.5)
        after = mlp.up_proj(x)
        mlp.gate_proj(x)
        place(model, backend, fuse=False)
        assert torch.allclose(after, mlp.up_proj(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after)


def test_what_cannot_run_as_one():
    model = quantize_tiny("llama", weights="rtn", method="quad", rank=16, model_kwargs=DIMS)
    attn = model.model.layers[0].self_attn
    lins = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert fusable(lins) == "not all on one kernel"  # still on the fake backend
    place(model, "cpu-int8", fuse=False)
    assert fusable(lins) is None and fusable(lins[:1]) == "a single linear"
    attn.k_proj.act = dataclasses.replace(attn.k_proj.act, clip_ratio=0.5)  # its own clip ratio
    assert fusable(lins) == "different act"
    with pytest.raises(ValueError, match="different act"):
        SiblingGroup(lins)
    place(model, "cpu-int8")  # the attention's group is left out, the MLP's kept
    assert attn.q_proj.kernel.siblings is None and model.model.layers[0].mlp.up_proj.kernel.siblings is not None
    assert len(_groups(model)) == 2 * model.config.num_hidden_layers - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_read_and_held_are_counted_once(backend):
    """A decode step reads the fused layers instead of the members' own layouts: the same bytes up to
    the INT4 op's padding, counted by the first member; the members keep no layout of their own."""
    from quadllm.evaluation.speed import decode_weight_bytes

    model = quantize_tiny("llama", weights="rtn", method="quad", rank=16, model_kwargs=DIMS)
    place(model, backend, fuse=False)
    alone = decode_weight_bytes(model)
    place(model, backend)
    with torch.no_grad():
        model(random_ids(1, 3))
    fused = decode_weight_bytes(model)
    assert abs(fused - alone) <= 0.02 * alone
    for g in _groups(model):
        kernels = [m.kernel for m in g.members]
        assert kernels[0].extra_bytes() == g.extra_bytes() > 0
        assert all(k.extra_bytes() == 0 for k in kernels[1:])
