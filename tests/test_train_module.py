"""The training module (tailor.loss.CausalLMLoss) under DistributedDataParallel: the seam for torchrun."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from conftest import prefixed_batch, tiny_llama
from torch.nn.parallel import DistributedDataParallel

from tailor.lora import LoraConfig, add_lora, lora_layers
from tailor.loss import CausalLMLoss, supervised_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _lora_model() -> torch.nn.Module:
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for layer in lora_layers(model).values():  # non-zero B: the adapters change the output
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return model


def _loss_and_grads(module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int, dict]:
    loss_sum, n = module(batch)
    (loss_sum / n).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}
    return loss_sum.detach(), int(n), grads


@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "plain"])
def test_ddp_wrapped_module_equals_unwrapped(gloo_world_of_one, share_prefix):
    model = _lora_model()
    batch = prefixed_batch()
    plain_loss, plain_n, plain_grads = _loss_and_grads(CausalLMLoss(copy.deepcopy(model),
                                                                    share_prefix=share_prefix), batch)
    wrapped = DistributedDataParallel(CausalLMLoss(copy.deepcopy(model), share_prefix=share_prefix))
    ddp_loss, ddp_n, ddp_grads = _loss_and_grads(wrapped, batch)

    assert ddp_n == plain_n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(ddp_loss, plain_loss, rtol=0, atol=0)
    assert len(plain_grads) == 2 * len(lora_layers(model)) > 0  # A and B of every adapted layer
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ddp_grads["module." + name], grad, rtol=1e-6, atol=1e-8, msg=name)


def test_module_forward_is_the_supervised_loss():
    model = _lora_model()
    batch = prefixed_batch()
    loss_sum, n = CausalLMLoss(model, chunk_size=7)(batch)
    reference, reference_n = supervised_loss(model, batch, chunk_size=1024)
    assert n.dtype == torch.int64 and int(n) == reference_n
    torch.testing.assert_close(loss_sum, reference, rtol=1e-6, atol=1e-6)
