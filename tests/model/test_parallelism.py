"""Sharing a model over devices and processes: accelerate's device maps and disk offload, FSDP's wrap unit."""

import importlib.util
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from retnet_hf import RetNetForCausalLM
from retnet_hf.model.modeling_retnet import RetNetDecoderLayer

from conftest import (
    random_ids,
    tiny_model,
)


# --------------------------------------------------------------------------------------------------------------
# 5. accelerate: device_map="auto", disk offload, infer_auto_device_map
# --------------------------------------------------------------------------------------------------------------

needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="device maps and offloading need accelerate"
)


def split_layers(device_map: dict) -> list:
    """Entries of a device map that place a part of a decoder layer (`model.layers.N.<something>`)."""
    return [name for name in device_map if re.match(r"^model\.layers\.\d+\.", name)]


def layer_devices(device_map: dict, num_layers: int) -> list:
    """The device of each decoder layer, resolved through the map's prefixes."""
    devices = []
    for index in range(num_layers):
        name = f"model.layers.{index}"
        owners = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
        assert owners, f"{name} is not placed by {device_map}"
        devices.append(device_map[max(owners, key=len)])
    return devices


@pytest.fixture
def four_layer_folder(tmp_path):
    model = tiny_model(decoder_layers=4)
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


@needs_accelerate
def test_device_map_auto_on_cpu(four_layer_folder):
    model, folder = four_layer_folder
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="auto")
    assert type(loaded) is RetNetForCausalLM
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(loaded.generate(ids, max_new_tokens=4, do_sample=False), expected)


@needs_accelerate
@pytest.mark.parametrize(
    "device_map",
    [
        {
            "model.embed_tokens": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.layers.2": "cpu",
            "model.layers.3": "disk",
            "model.layer_norm": "cpu",
            "model.retnet_rel_pos": "cpu",
            "lm_head": "disk",
        },
        {
            "model.embed_tokens": "disk",
            "model.layers": "disk",
            "model.layer_norm": "disk",
            "model.retnet_rel_pos": "disk",
            "lm_head": "cpu",
        },
        "auto_small_memory",
    ],
    ids=["layers_alternate", "all_but_head_on_disk", "auto_max_memory"],
)
def test_disk_offload_same_logits_and_generate(four_layer_folder, tmp_path, device_map):
    model, folder = four_layer_folder
    kwargs = {"device_map": device_map, "offload_folder": tmp_path / "offload"}
    if device_map == "auto_small_memory":  # layers 0, 1 fit in memory (~51 KB each), the rest goes to disk
        kwargs = {"device_map": "auto", "max_memory": {"cpu": 200_000}, "offload_folder": tmp_path / "offload"}
    loaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert "disk" in loaded.hf_device_map.values(), loaded.hf_device_map
    assert not split_layers(loaded.hf_device_map), loaded.hf_device_map
    assert any(p.device.type == "meta" for p in loaded.parameters())  # offloaded weights are really off the model
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(loaded.generate(ids, max_new_tokens=5, do_sample=False), expected)
        torch.manual_seed(0)
        sampled = loaded.generate(ids, max_new_tokens=3, do_sample=True)
    assert sampled.shape == (2, ids.shape[1] + 3)


@needs_accelerate
@pytest.mark.parametrize(
    "device_map",
    [
        {
            "model.embed_tokens": "cpu",
            "model.layers": "cpu",
            "model.layer_norm": "cpu",
            "model.retnet_rel_pos": "disk",
            "lm_head": "cpu",
        },
        {"": "disk"},
    ],
    ids=["rel_pos_on_disk", "everything_on_disk"],
)
def test_disk_offload_with_offloaded_buffers(four_layer_folder, tmp_path, device_map):
    """`offload_buffers=True` moves buffers off the model too: the decays must still reach the layers."""
    model, folder = four_layer_folder
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, offload_folder=tmp_path / "offload", offload_buffers=True
    )
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        expected = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(loaded.generate(ids, max_new_tokens=3, do_sample=False), expected)


@needs_accelerate
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "max_memory",
    [
        {"cpu": 200_000, "disk": 10**9},
        {"cpu": 130_000, "disk": 10**9},
        {0: 90_000, 1: 90_000, "cpu": 10**9},  # fake accelerators: only the sizes are read
        {0: 130_000, "cpu": 90_000, "disk": 10**9},
    ],
)
def test_infer_auto_device_map_never_splits_a_layer(max_memory):
    from accelerate import infer_auto_device_map

    model = tiny_model(decoder_layers=4)
    assert set(model._no_split_modules) == {"RetNetDecoderLayer"}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
    assert not split_layers(device_map), device_map
    devices = layer_devices(device_map, 4)
    assert len(set(devices)) >= 2, f"the memory limits should spread the layers over devices: {device_map}"
    # the same limits without the no-split list do cut a layer: the check above is not vacuous
    assert split_layers(infer_auto_device_map(model, max_memory=max_memory))


# --------------------------------------------------------------------------------------------------------------
# 6. FSDP: the decoder layer is the wrapping unit
# --------------------------------------------------------------------------------------------------------------


def test_fsdp_auto_wrap_policy_wraps_each_decoder_layer():
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.trainer_pt_utils import get_module_class_from_name

    model = tiny_model(decoder_layers=3)
    # what Trainer does with fsdp_config["transformer_layer_cls_to_wrap"] (default: model._no_split_modules)
    names = list(model._no_split_modules)
    assert names == ["RetNetDecoderLayer"]
    layer_class = get_module_class_from_name(model, names[0])
    assert layer_class is RetNetDecoderLayer
    assert get_module_class_from_name(model, "NoSuchLayer") is None

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_class})
    wrapped = [
        name
        for name, module in model.named_modules()
        if policy(module=module, recurse=False, nonwrapped_numel=sum(p.numel() for p in module.parameters()))
    ]
    assert wrapped == [f"model.layers.{i}" for i in range(3)]
    # recursing into every module is allowed (so the layers are reached)
    assert all(policy(module=module, recurse=True, nonwrapped_numel=0) for module in model.modules())
    # every parameter outside the layers is left to the root unit: embeddings, final norm, head
    outside = {name for name, _ in model.named_parameters() if not name.startswith("model.layers.")}
    assert outside == {"model.embed_tokens.weight", "model.layer_norm.weight", "lm_head.weight"}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")
def test_fsdp_wraps_each_decoder_layer_and_gives_the_same_gradients(tmp_path):
    """A real FSDP (FullyShardedDataParallel) wrap with that policy, in this process (gloo, world size 1, CPU):
    one unit per decoder layer plus the root, and the same loss and gradients as the unwrapped model (fp64)."""
    import functools

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.trainer_pt_utils import get_module_class_from_name

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed without a process group already running")
    model = tiny_model(torch.float64, decoder_layers=3, share_decoder_input_output_embed=True).train()
    reference = tiny_model(torch.float64, decoder_layers=3, share_decoder_input_output_embed=True).train()
    layer_class = get_module_class_from_name(model, sorted(model._no_split_modules)[0])
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_class})
    ids = random_ids(length=13)
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True
        )
        units = [module for module in wrapped.modules() if isinstance(module, FullyShardedDataParallel)]
        assert units[0] is wrapped
        assert [type(unit.module) for unit in units[1:]] == [RetNetDecoderLayer] * 3
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {name.replace("_fsdp_wrapped_module.", ""): p.grad for name, p in wrapped.named_parameters()}
    finally:
        dist.destroy_process_group()
    expected_loss = reference(input_ids=ids, labels=ids).loss
    expected_loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), atol=1e-12, rtol=0)
    expected = dict(reference.named_parameters())
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name].grad, atol=1e-12, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
