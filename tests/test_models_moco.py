"""The MoCo model's queue, pointer, momentum update, split BN and key shuffle against direct computations."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hnmix.models.backbone import SplitBatchNorm2d, apply_cifar_stem, convert_split_bn, create_backbone
from hnmix.models.moco import MoCo
from hnmix.negatives import Negatives


def tiny_moco(K=12, shuffle_keys=False, split=1, m=0.9):
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet")
    if split > 1:
        convert_split_bn(backbone, split)
    return MoCo(backbone, dim=8, K=K, m=m, T=0.2, mlp=True, shuffle_keys=shuffle_keys)


def test_queue_and_pointer_are_persistent_and_unit():
    model = tiny_moco()
    sd = model.state_dict()
    assert "queue" in sd and "queue_ptr" in sd
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(12))


def test_enqueue_writes_at_pointer_and_wraps():
    model = tiny_moco(K=12)
    for step in range(5):  # 5 batches of 4 into a queue of 12: the pointer wraps twice
        keys = torch.full((4, 8), float(step))
        before = model.queue.clone()
        ptr = int(model.queue_ptr)
        model.enqueue(keys)
        rows = [(ptr + r) % 12 for r in range(4)]
        expected = before.clone()
        expected[rows] = keys
        torch.testing.assert_close(model.queue, expected)
        assert int(model.queue_ptr) == (ptr + 4) % 12


def test_momentum_update_matches_formula():
    model = tiny_moco(m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    k_before = copy.deepcopy(model.encoder_k.state_dict())
    q_params = dict(model.encoder_q.named_parameters())
    model.momentum_update()
    for name, p in model.encoder_k.named_parameters():
        torch.testing.assert_close(p, 0.9 * k_before[name] + 0.1 * q_params[name].detach())
    for name, b in model.encoder_k.named_buffers():  # BN statistics are not averaged (as in MoCo)
        torch.testing.assert_close(b, k_before[name])


def test_split_bn_equals_bn_on_each_contiguous_chunk():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.weight.data.uniform_()
    bn.bias.data.uniform_()
    split = SplitBatchNorm2d(3, 4)
    split.load_state_dict(bn.state_dict())
    x = torch.randn(16, 3, 5, 5)
    ref_bns = [copy.deepcopy(bn) for _ in range(4)]
    ref = torch.cat([ref_bns[g](x[4 * g:4 * g + 4]) for g in range(4)])
    torch.testing.assert_close(split(x), ref)
    torch.testing.assert_close(split.running_mean, torch.stack([b.running_mean for b in ref_bns]).mean(0))
    split.eval()
    torch.testing.assert_close(split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight,
                                                      split.bias, False, 0.0, split.eps))


def test_split_bn_keeps_state_dict_keys():
    a, b = create_backbone("test_resnet"), convert_split_bn(create_backbone("test_resnet"), 2)
    assert list(a.state_dict()) == list(b.state_dict())


def test_key_shuffle_returns_keys_in_batch_order():
    # with eval-mode BN the shuffle must be invisible: same keys as an unshuffled forward
    model = tiny_moco(shuffle_keys=True).eval()
    x = torch.randn(8, 3, 16, 16)
    k, k_all = model.encode_keys(x, torch.Generator().manual_seed(0))
    ref = F.normalize(model.encoder_k(x), dim=1)
    torch.testing.assert_close(k, ref)
    torch.testing.assert_close(k_all, ref)


def test_forward_logits_layout_and_enqueue():
    model = tiny_moco(K=16, shuffle_keys=True, split=2)
    x_q, x_k = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    queue_before = model.queue.clone()
    out = model(x_q, x_k, shuffle_generator=torch.Generator().manual_seed(0))  # the step's forward
    assert out.logits.shape == (4, 1 + 16)
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    expected = F.cross_entropy(out.logits / 0.2, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits[:, 1:], (F.normalize(model.encoder_q(x_q), dim=1) @ queue_before.T).detach(),
                               atol=1e-5, rtol=1e-5)
    out.loss.backward()
    model.enqueue(out.keys, out.key_labels)  # as MocoStep: after the backward
    assert int(model.queue_ptr) == 4 and not torch.equal(model.queue[:4], queue_before[:4])
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_cifar_stem_keeps_resolution_and_rejects_other_stems():
    m = timm.create_model("resnet18", num_classes=0)
    apply_cifar_stem(m, "resnet18")
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert m.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4  # 32 / 8, no stem downsampling
    import pytest

    from hnmix.errors import HnmixError

    with pytest.raises(HnmixError, match="cifar-stem"):
        create_backbone("resnet18d", cifar_stem=True)


def test_residual_init_is_torchvisions_by_default_timms_on_request_and_reaches_the_model():
    import torchvision
    from rich.console import Console

    from hnmix.config import BatchNorm, PretrainConfig
    from hnmix.train.build import build_model

    def last_bn_weights(model):
        return torch.cat([block.bn3.weight.detach() for block in model.modules() if hasattr(block, "bn3")])

    reference = last_bn_weights(torchvision.models.resnet50())  # official MoCo's backbone, its own init
    torch.manual_seed(0)
    default_init = create_backbone("resnet50")
    torch.manual_seed(0)
    timm_init = create_backbone("resnet50", zero_init_residual=True)
    assert torch.equal(last_bn_weights(default_init), reference)
    assert (last_bn_weights(timm_init) == 0).all()
    for (key, a), b in zip(timm_init.state_dict().items(), default_init.state_dict().values(), strict=True):
        assert torch.equal(a, b) or key.endswith("bn3.weight"), key  # the same draws otherwise
    create_backbone("vit_tiny_patch16_224", zero_init_residual=True)  # a family without the option
    assert PretrainConfig(data="demo").zero_init_residual is False  # MoCo-v2 parity is the default
    cfg = PretrainConfig(data="demo", arch="resnet50", batch_size=8, queue_size=32)
    model = build_model(cfg, BatchNorm("plain"), 1, Console(quiet=True).print)
    assert torch.equal(last_bn_weights(model.encoder_q), reference)
    cfg = cfg.model_copy(update={"zero_init_residual": True})
    assert (last_bn_weights(build_model(cfg, BatchNorm("plain"), 1, Console(quiet=True).print).encoder_q) == 0).all()


def test_logits_and_loss_stay_fp32_under_bf16_autocast():
    # the backbone runs in bf16, but q @ queue.T must not: bf16 logits would be off by ~0.004 / T
    model = tiny_moco(K=64)
    x_q, x_k = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    queue_before = model.queue.clone()
    seen = {}

    def spy(q, queue, l_neg, *, generator, epoch):
        seen.update(q=q.dtype, l_neg=l_neg.dtype)
        return Negatives(extra=torch.full((4, 1), float("-inf")))  # a masked synthetic logit

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_q, x_k, strategy=spy)
    model.enqueue(out.keys, out.key_labels)
    assert out.logits.dtype == out.loss.dtype == torch.float32 and seen == {"q": torch.float32, "l_neg": torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.encoder_q(x_q)
    q = F.normalize(features.float(), dim=1)  # normalised in fp32: bf16 norms are off by ~0.3 %
    torch.testing.assert_close(out.logits[:, 1:65], (q @ queue_before.T).detach(), atol=1e-6, rtol=0)
    enqueued = model.queue[:4]
    torch.testing.assert_close(enqueued.norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    assert torch.isnan(out.stats[3])  # the synthetic-logit mean skips -inf entries (here: all of them)


def stats_trainer(tmp_path, strategy, oracle):
    from hnmix.config import PretrainConfig
    from hnmix.core import dist
    from hnmix.train.trainer import Trainer

    cfg = PretrainConfig(data="demo", arch="test_resnet", image_size=16, batch_size=8, queue_size=32, dim=16,
                         workers=0, oracle_labels=oracle, device="cpu", output=str(tmp_path / "run"))
    return Trainer(cfg, dist.setup("cpu"), steps_per_epoch=10, strategy=strategy)


@pytest.mark.parametrize("parts", ["ring", "oracle", "mochi", "ring+oracle+mochi"])
def test_training_stats_equal_a_naive_computation(tmp_path, parts):
    """acc: the positive against the kept queue negatives only (MoCo's proxy accuracy); acc_syn: with the
    synthetic negatives too; logit_neg: the mean of the kept queue logits; neg_kept: their share."""
    from hnmix.models.moco import STAT_NAMES
    from hnmix.negatives import mochi, ring_mask

    seen = {}

    def spy(q, queue, l_neg, *, generator, epoch):
        keep = ring_mask(l_neg, outer=0.5, inner=0.125) if "ring" in parts else None
        extra = None
        if "mochi" in parts:  # MoCHi's mixes, and a logit of 1 (the largest cosine) beating every other positive
            winner = torch.where(torch.arange(len(q)) % 2 == 0, 1.0, -1.0)[:, None] * (q * q).sum(1, keepdim=True)
            extra = torch.cat([mochi(q, queue, l_neg, n_hard=8, s=4, s_prime=2, generator=generator), winner], 1)
        seen.update(keep=keep, extra=extra)
        return Negatives(extra=extra, keep=keep)

    trainer = stats_trainer(tmp_path, spy, oracle="oracle" in parts)
    torch.manual_seed(1)
    labels = torch.arange(8) % 3
    for _ in range(5):  # past the queue filling: labelled keys in every row (K = 32 = 4 batches of 8)
        x = torch.randn(8, 3, 16, 16)
        queue_labels = trainer.model.queue_labels.clone()
        out, _ = trainer.train_step(x, x + 0.1 * torch.randn_like(x), labels, 100, 10)
    stats = dict(zip(STAT_NAMES, out.stats.tolist(), strict=True))

    logits = out.logits.double()
    pos, negs = logits[:, 0], logits[:, 1:33]
    keep = torch.ones(8, 32, dtype=torch.bool)
    if "oracle" in parts:
        keep &= queue_labels[None, :] != labels[:, None]
    if seen["keep"] is not None:
        keep &= seen["keep"]
    assert 0 < keep.sum() and (keep.sum() < keep.numel()) == (parts != "mochi")  # a mask that masks
    rows = [negs[b][keep[b]] for b in range(8)]
    acc = sum(float(pos[b] >= rows[b].max()) for b in range(8)) / 8
    assert stats["acc"] == pytest.approx(acc)
    assert stats["logit_pos"] == pytest.approx(pos.mean().item(), abs=1e-6)
    assert stats["logit_neg"] == pytest.approx(torch.cat(rows).mean().item(), abs=1e-6)
    assert stats["neg_kept"] == pytest.approx(keep.double().mean().item())
    if seen["extra"] is None:
        assert math.isnan(stats["acc_syn"]) and math.isnan(stats["logit_syn"])
        return
    extra = logits[:, 33:]
    assert extra.shape[1] == 4 + 2 + 1 and acc > 0
    acc_syn = sum(float(pos[b] >= max(rows[b].max(), extra[b].max())) for b in range(8)) / 8
    assert acc_syn < acc  # the winning column takes every other row
    assert stats["acc_syn"] == pytest.approx(acc_syn)
