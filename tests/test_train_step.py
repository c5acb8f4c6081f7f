"""The training step never waits for the device: no read-back (.item(), bool(), nonzero, ...) and no tensor
made from Python data inside a step, for every method with the label oracle, from both data paths.

On the CPU this watches the ops that would synchronise a GPU; with CUDA, the driver's own check runs too."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hnmix.config import PretrainConfig
from hnmix.core import dist as distributed
from hnmix.data.order import RunBatches
from hnmix.train.data import TrainingData
from hnmix.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ops that read a device value back, or copy host data to the device (torch.tensor(..., device=cuda))
SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "lift_fresh", "aten.equal", "is_nonzero")
METHODS = {"moco": {}, "mochi": {"mochi": {"n_hard": 8, "s": 4, "s_prime": 2}},
           "synco": {"synco": {"n_hard": 8, "counts": [1, 1, 1, 1, 1, 1], "start_epoch": 0}},
           "ring": {"ring": {"outer": 0.5, "inner": 0.25}}}


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in SYNCING):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def make_trainer(tmp_path, method, pipeline, device="cpu"):
    cfg = PretrainConfig(data="demo", arch="test_resnet", image_size=16, batch_size=8, queue_size=32, dim=16,
                         workers=0, method=method, oracle_labels=True, pipeline=pipeline, device=device,
                         output=str(tmp_path / "run"), **METHODS[method])
    info = distributed.setup(device)
    data = TrainingData(cfg, info)
    trainer = Trainer(cfg, info, steps_per_epoch=10)
    trainer.prepare_steps()
    return trainer, data.batches(RunBatches(len(data), 8, 0, 1, 0, epochs=1, total_steps=8))


@pytest.fixture
def no_python_readbacks(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("host read-back in the step")

    def patch():
        for name in ("tolist", "numpy", "item"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
    return patch


@pytest.mark.parametrize("method", sorted(METHODS))
def test_device_data_steps_make_no_host_syncs(tmp_path, monkeypatch, method, no_python_readbacks):
    monkeypatch.setenv("HNMIX_CACHE_DIR", str(tmp_path / "cache"))
    trainer, batches = make_trainer(tmp_path, method, "resident")
    im_q, im_k, labels, _ = next(batches)
    trainer.train_step(im_q, im_k, labels, 100, 10)  # first step: constants are made once, here
    no_python_readbacks()
    with HostSyncs() as watch:
        for _ in range(4):  # past the queue filling (K = 32 = 4 batches of 8)
            im_q, im_k, labels, _ = next(batches)
            out, _ = trainer.train_step(im_q, im_k, labels, 100, 10)
    assert watch.found == []
    monkeypatch.undo()
    assert torch.isfinite(out.loss) and (method != "mochi" or torch.isfinite(out.stats[3]))


def test_loader_steps_make_no_host_syncs(tmp_path, no_python_readbacks):
    trainer, batches = make_trainer(tmp_path, "mochi", "pil")
    steps = [next(batches) for _ in range(4)]  # the loader's collation is host work by design
    trainer.train_step(*steps[0][:3], 100, 10)
    no_python_readbacks()
    with HostSyncs() as watch:
        for im_q, im_k, labels, _ in steps[1:]:
            trainer.train_step(im_q, im_k, labels, 100, 10)
    assert watch.found == []


def test_the_detector_sees_a_read_back():
    with HostSyncs() as watch:
        bool(torch.ones(2).sum() > 1)
        torch.tensor([1.0, 2.0])
    assert any("_local_scalar_dense" in f for f in watch.found) and any("lift_fresh" in f for f in watch.found)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_do_not_synchronise(tmp_path, monkeypatch):
    monkeypatch.setenv("HNMIX_CACHE_DIR", str(tmp_path / "cache"))
    trainer, batches = make_trainer(tmp_path, "mochi", "resident", device="cuda")
    trainer.train_step(*next(batches)[:3], 100, 10)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step(*next(batches)[:3], 100, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_encoders_give_the_eager_step(tmp_path):
    # inductor on the CPU; a one-conv backbone keeps the compilation to seconds
    import copy

    from torch import nn

    from hnmix.models.moco import MoCo

    class OneConv(nn.Sequential):
        num_features = 8

    torch.manual_seed(0)
    eager = MoCo(OneConv(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                 dim=4, K=16, T=0.2, shuffle_keys=False)
    compiled = copy.deepcopy(eager)
    compiled.encoder_q.compile()
    compiled.encoder_k.compile()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for _ in range(2):
        x_q, x_k = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
        outs = [model(x_q, x_k) for model in (eager, compiled)]
        for model, out in zip((eager, compiled), outs, strict=True):
            out.loss.backward()
            model.enqueue(out.keys, out.key_labels)
        torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=1e-5, rtol=1e-5)
        for p_eager, p_compiled in zip(eager.encoder_q.parameters(), compiled.encoder_q.parameters(), strict=True):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compiled.queue, eager.queue, atol=1e-5, rtol=1e-5)


def test_compile_option_compiles_both_encoders_in_place(tmp_path):
    cfg = PretrainConfig(data="demo", arch="test_resnet", image_size=16, batch_size=8, queue_size=32, dim=16,
                         workers=0, pipeline="pil", compile=True, output=str(tmp_path / "run"))
    trainer = Trainer(cfg, distributed.setup("cpu"), steps_per_epoch=10)
    keys = list(trainer.model.state_dict())
    trainer.prepare_steps()
    assert trainer.model.encoder_q._compiled_call_impl is not None
    assert trainer.model.encoder_k._compiled_call_impl is not None
    assert list(trainer.model.state_dict()) == keys  # checkpoints and backbone.pt keep their keys
