"""Settings: precedence, YAML round trip, and the early checks."""

import pytest

from hnmix.config import PretrainConfig
from hnmix.core.settings import load_config
from hnmix.errors import HnmixError


def test_defaults_are_the_moco_v2_recipe():
    c = PretrainConfig()
    assert (c.lr, c.batch_size, c.queue_size, c.momentum, c.temperature, c.dim, c.mlp, c.cos, c.epochs,
            c.sgd_momentum, c.wd) == (0.03, 256, 65536, 0.999, 0.2, 128, True, True, 200, 0.9, 1e-4)


def test_precedence_yaml_then_flags_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\nepochs: 5\narch: resnet18\n")
    c = load_config(PretrainConfig, f, {"epochs": 7, "lr": None}, ["arch=resnet34", "schedule=[1, 2]"])
    assert (c.lr, c.epochs, c.arch, c.schedule) == (0.1, 7, "resnet34", [1, 2])
    c.save_yaml(tmp_path / "saved.yaml")
    assert load_config(PretrainConfig, tmp_path / "saved.yaml") == c


@pytest.mark.parametrize(("overrides", "message"), [
    ({"queue_size": 1000, "batch_size": 256}, "multiple of the global batch"),
    ({"method": "mochi", "n_hard": 70000}, "cannot exceed the queue size"),
    ({"method": "mochi", "n_hard": 1, "s": 4}, "need N >= 2"),
    ({"method": "mochi", "n_hard": 1, "s": 0, "s_prime": 3}, "need N >= 2"),
    ({"arch": "resnet_does_not_exist"}, "unknown timm architecture"),
    ({"data": "/no/such/folder"}, "does not exist"),
    ({"bn": "split:0"}, "is not one of"),
    ({"resume": "/no/such.pt"}, "checkpoint not found"),
])
def test_invalid_settings_fail_with_one_clear_line(overrides, message):
    with pytest.raises(HnmixError, match=message) as e:
        load_config(PretrainConfig, None, overrides)
    assert "\n" not in str(e.value)


def test_unknown_keys_suggest_the_right_one(tmp_path):
    with pytest.raises(HnmixError, match="did you mean 'queue_size'"):
        load_config(PretrainConfig, None, None, ["queue_sise=5"])
    f = tmp_path / "c.yaml"
    f.write_text("- not a mapping\n")
    with pytest.raises(HnmixError, match="mapping"):
        load_config(PretrainConfig, f)


def test_yaml_on_and_off_mean_the_choices_not_booleans(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data_on_gpu: off\n")  # hnmix 0.1's name and values: DataLoader workers
    assert load_config(PretrainConfig, f).pipeline == "pil"
    assert load_config(PretrainConfig, None, None, ["data_on_gpu=on"]).pipeline == "resident"


def test_bn_is_parsed_once_into_a_typed_spec():
    from hnmix.config import BatchNorm

    assert PretrainConfig(bn="split:4", batch_size=256).batch_norm == BatchNorm("split", 4)
    assert [str(BatchNorm.parse(t)) for t in ("auto", "shuffle", "split:2", "sync", "plain")] == \
        ["auto", "shuffle", "split:2", "sync", "plain"]
    auto = BatchNorm("auto")  # one process: the most sub-batches (<= 8) of >= 32; several: shuffle BN
    assert [auto.resolve(1, n) for n in (256, 96, 16)] == [BatchNorm("split", 8), BatchNorm("split", 3),
                                                          BatchNorm("split", 1)]
    assert auto.resolve(2, 128) == BatchNorm("shuffle") == BatchNorm("shuffle").resolve(1, 256)
    assert [b.shuffles_keys for b in (BatchNorm("shuffle"), BatchNorm("split", 2), BatchNorm("split", 1),
                                      BatchNorm("sync"), BatchNorm("plain"))] == [True, True, False, False, False]
    for bad in ("split:", "split:01", "split:x", "shuffled"):
        with pytest.raises(ValueError, match="is not one of"):
            BatchNorm.parse(bad)
