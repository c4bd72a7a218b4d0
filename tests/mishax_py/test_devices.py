"""mishax_py.devices: the device a model computes on and weights read directly, with and without accelerate.

The whole-API acceptance on dispatched models is ``tests/mishax_py/test_dispatch.py``; here each helper
on its own: a plain module, a module whose weights accelerate offloads (``cpu_offload`` and
``disk_offload``: the parameters on ``meta``, loaded by the hook), and a module on ``meta`` that nothing
can load.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, disk_offload
from torch import nn
from transformers import Gemma2ForCausalLM

from mishax_py.devices import execution_device, input_device, materialised_weight, model_dtype, transformable
from tests.helpers import make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_a_plain_module():
    lin = nn.Linear(3, 2).to(torch.float64)
    assert execution_device(lin) == input_device(lin) == torch.device("cpu")
    assert model_dtype(lin) == torch.float64
    assert materialised_weight(lin) is not lin.weight and materialised_weight(lin).data_ptr() == lin.weight.data_ptr()
    assert not materialised_weight(lin).requires_grad  # detached, no copy
    assert model_dtype(nn.ReLU()) == torch.get_default_dtype() and execution_device(nn.ReLU()).type == "cpu"


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_an_offloaded_model(tmp_path, offload):
    """Offloaded by accelerate, every parameter says ``meta``; the helpers still answer with real devices and
    the weights' data, and the read leaves the module offloaded."""
    ref = make_model(seed=0)
    model = make_model(seed=0)
    if offload == "cpu":
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        disk_offload(model, tmp_path, execution_device=torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert execution_device(model) == input_device(model) == torch.device("cpu")
    assert model_dtype(model) == torch.float32
    for name in ("lm_head", "model.norm", "model.layers.1.mlp.down_proj"):
        module = model.get_submodule(name)
        torch.testing.assert_close(materialised_weight(module), ref.get_submodule(name).weight.detach(), rtol=0, atol=0)
        assert module.weight.device.type == "meta"
    ids = torch.randint(4, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_meta_weights_nothing_can_load():
    with torch.device("meta"):
        lin = nn.Linear(3, 2)
    assert execution_device(lin) == torch.device("cpu")  # no tensor with data, no hook: the CPU
    with pytest.raises(RuntimeError, match=r"Linear\.weight is on the meta device"):
        materialised_weight(lin)
    with pytest.raises(TypeError, match="Linear has no tensor 'gain'"):
        materialised_weight(lin, "gain")


def test_torch_func_transforms_run_an_offloaded_model(tmp_path):
    """accelerate's offload hooks fail under ``torch.func.vjp`` (a weight loaded inside the transform has no
    data pointer for their tied-weights map); inside ``transformable`` the vjp runs, equals the plain
    model's, and afterwards the hooks get their map back and plain forwards still run."""
    ref = make_model(seed=0)
    ref.save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = Gemma2ForCausalLM.from_pretrained(tmp_path, device_map=device_map, offload_folder=tmp_path / "off",
                                              attn_implementation="eager").eval()
    ids = torch.randint(4, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    x0 = torch.zeros(1, 5, 64)

    def f(x):
        return model(input_ids=ids).logits + x

    with torch.no_grad(), pytest.raises(RuntimeError, match="data pointer"):
        torch.func.vjp(f, x0)
    hook = model.model.layers[1].mlp.down_proj._hf_hook
    tied = hook.tied_params_map
    assert tied is not None
    with torch.no_grad(), transformable(model):
        out, vjp = torch.func.vjp(f, x0)
        assert hook.tied_params_map is None
    assert hook.tied_params_map is tied
    torch.testing.assert_close(out, ref(ids).logits.detach())
    # the offloaded modules are back on their own meta tensors (not the transform's dead wrappers): plain
    # forwards after the block work
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    torch.testing.assert_close(model(input_ids=ids).logits, ref(ids).logits)
    torch.testing.assert_close(vjp(torch.ones_like(out))[0], torch.ones_like(out))
    with transformable(nn.Linear(2, 2)):  # nothing dispatched: nothing to do
        pass
