import pytest
import torch
from diffusers import UNet2DConditionModel

from hybridiff.errors import HybridiffError
from hybridiff.graph.adapters import UNetAdapter
from hybridiff.graph.pipeline import trace_pipeline
from hybridiff.graph.trace import graph_fingerprint
from hybridiff.models import load_pipeline


def test_traced_graph_equals_unet(traced, unet_call):
    args, kwargs = unet_call
    with torch.inference_mode():
        expected = traced.pipe.unet(*args, **kwargs)[0]
        got = traced.graph(**traced.adapter.inputs_from_call(*args, **kwargs))
    assert got.shape == expected.shape == (2, 4, 32, 32)
    assert torch.equal(got, expected)


def test_graph_is_block_granular(traced):
    modules = [n.target for n in traced.graph.graph.nodes if n.op == "call_module"]
    assert "unet.mid_block" in modules
    assert {f"unet.down_blocks.{i}" for i in range(3)} <= set(modules)
    assert {f"unet.up_blocks.{i}" for i in range(3)} <= set(modules)


def test_fingerprint_ignores_weights_but_not_architecture(traced):
    other_weights = trace_pipeline(load_pipeline("builtin:tiny-sdxl"))
    with torch.no_grad():
        for p in other_weights.pipe.unet.parameters():
            p.add_(1.0)
    assert graph_fingerprint(other_weights.adapter.trace()) == traced.fingerprint

    config = dict(traced.pipe.unet.config)
    config["block_out_channels"] = [32, 64, 64]
    smaller = UNet2DConditionModel.from_config(config)
    assert graph_fingerprint(UNetAdapter(smaller).trace()) != traced.fingerprint


def test_unsupported_unet_config_is_named():
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), norm_num_groups=8, cross_attention_dim=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        class_embed_type="timestep",
    )
    with pytest.raises(HybridiffError, match="class_embed_type='timestep'"):
        UNetAdapter(unet)
