"""lgam gates: per-stage statistics of the attention modules' own gates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lgam
from _helpers import synthetic_image
from lgam.attention import attention_gates
from lgam.attention.lgam import lgam_reference
from lgam.cli import main as lgam_main
from lgam.data import IMAGENET_MEAN, IMAGENET_STD, DecodedSplit, resize_normalize
from lgam.gatestats import SATURATED, _Moments, branch_statistics, format_branch_table, format_gate_table, gate_statistics


def _split(n: int = 6, size: int = 48) -> DecodedSplit:
    imgs = torch.stack([torch.from_numpy(np.array(synthetic_image(i, (size, size)))).permute(2, 0, 1)
                        for i in range(n)])
    return DecodedSplit(imgs, torch.zeros(n, dtype=torch.long), ["a"], ["a"])


def _model(name: str) -> torch.nn.Module:
    m = lgam.create_model(name, num_classes=3)
    with torch.no_grad():  # BN statistics of real activations
        m(torch.randn(8, 3, 64, 64))
    return m.eval()


def test_statistics_count_every_position_of_every_module():
    model, split = _model("resnet18_lgam"), _split()
    stats = gate_statistics(model, split, 64, IMAGENET_MEAN, IMAGENET_STD, batch_size=4)
    assert sorted(stats) == [1, 2, 3, 4] and all(list(s) == ["channel", "spatial"] for s in stats.values())
    assert all(s["spatial"]["modules"] == 2 for s in stats.values())
    x = resize_normalize(split.images, 64, IMAGENET_MEAN, IMAGENET_STD)
    gates = attention_gates(model, x)
    for stage in (1, 4):
        g = torch.cat([m["spatial"].flatten() for m in gates[stage].values()]).double()
        s = stats[stage]["spatial"]
        assert s["at_half"] == pytest.approx(float((g == 0.5).double().mean()))
        assert s["open"] == pytest.approx(float((g >= 0.99).double().mean()))
        assert s["mean"] == pytest.approx(float(g.mean()), rel=1e-6)
    assert all(0 <= s["spatial"]["at_half"] <= 1 for s in stats.values())


def test_across_image_std_and_dead_units_of_channel_gates():
    """SE's channel gates: the std over images of each channel's gate, averaged; a channel whose
    gate is the same for every image is dead (here: forced by a zero excitation row)."""
    model, split = _model("resnet18_se"), _split(7)
    with torch.no_grad():
        model.layer2[0].attention.fc[2].weight[:5] = 0  # 5 of 128 channels: sigmoid(0), whatever the image
    stats = gate_statistics(model, split, 48, IMAGENET_MEAN, IMAGENET_STD, batch_size=3)
    assert sorted(stats) == [1, 2, 3, 4] and all(list(s) == ["channel"] for s in stats.values())
    x = resize_normalize(split.images, 48, IMAGENET_MEAN, IMAGENET_STD)
    gates = attention_gates(model, x)
    per_unit = torch.cat([m["channel"].double().std(0, correction=0) for m in gates[2].values()])
    s = stats[2]["channel"]
    assert s["img_std"] == pytest.approx(float(per_unit.mean()), rel=1e-6)
    assert s["dead"] == pytest.approx(float((per_unit < 0.01).double().mean()))
    assert s["dead"] >= 5 / 256 and s["modules"] == 2


def test_sge_groups_are_measured_as_applied_not_only_as_their_mean():
    """Two SGE groups with opposite gamma: each group's gate varies with the image, their mean
    does not (as far as the two cancel); the ``groups`` kind sees what the module multiplies by."""
    model, split = _model("resnet18_sge"), _split(6)
    sge = model.layer4[1].attention
    with torch.no_grad():
        sge.weight.zero_()
        sge.weight[0, 0], sge.weight[0, 1] = 3.0, -3.0
    stats = gate_statistics(model, split, 48, IMAGENET_MEAN, IMAGENET_STD, batch_size=4)
    assert all(list(s) == ["spatial", "groups"] for s in stats.values())
    x = resize_normalize(split.images, 48, IMAGENET_MEAN, IMAGENET_STD)
    groups = {name: g["groups"] for name, g in attention_gates(model, x)[4].items()}
    per_unit = torch.cat([g.double().flatten(1).std(0, correction=0) for g in groups.values()])
    s = stats[4]["groups"]
    assert s["img_std"] == pytest.approx(float(per_unit.mean()), rel=1e-6)
    assert s["modules"] == 2 and s["dead"] < 1
    assert stats[4]["groups"]["img_std"] > stats[4]["spatial"]["img_std"]


def test_models_without_gates_have_none_and_bam_sits_between_stages():
    split = _split(2)
    assert gate_statistics(_model("resnet18"), split, 32, IMAGENET_MEAN, IMAGENET_STD) == {}
    bam = gate_statistics(_model("resnet18_bam"), split, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert sorted(bam) == [1, 2, 3]  # between the stages
    cbam = gate_statistics(_model("resnet18_cbam"), split, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert list(cbam[4]) == ["channel", "spatial"]


def test_cli_table(app_checkpoints, tmp_path, capsys):
    val = tmp_path / "val"
    for k, cls in enumerate(["n01", "n02"]):
        (val / cls).mkdir(parents=True)
        for i in range(2):
            synthetic_image(10 * k + i, (40, 32)).save(val / cls / f"{i}.png")
    out = tmp_path / "gates.md"
    assert lgam_main(["gates", "--checkpoints", str(app_checkpoints), "--data", str(tmp_path),
                      "--limit", "4", "--out", str(out), "--models", "resnet18_lgam",
                      "resnet18_se"]) == 0
    table = out.read_text()
    assert "| resnet18_lgam | 4 | spatial | 2 |" in table and "| resnet18_se | 4 | channel | 2 |" in table
    assert "Val images: 4" in capsys.readouterr().out
    branches = table.split("Residual branches")[1]
    assert "layer1.0, layer1.1, layer2.0" in branches
    assert [line.split(" | ")[0] for line in branches.splitlines() if line.startswith("| resnet18")] == [
        "| resnet18_lgam", "| resnet18_se"]
    assert all(len(line.split(" | ")[1].split(" / ")) == 8 for line in branches.splitlines()
               if line.startswith("| resnet18"))  # one ratio per block
    # by default plain ResNet18 is the branches' reference, and has no gate rows
    assert lgam_main(["gates", "--checkpoints", str(app_checkpoints), "--data", str(tmp_path),
                      "--limit", "4", "--out", str(out)]) == 0
    gates, branches = out.read_text().split("Residual branches")
    assert "| resnet18 |" not in gates and "| resnet18 | " in branches and "| resnet18_bam | " in branches


def _rms(t: torch.Tensor) -> float:
    return float(t.double().square().mean().sqrt())


@pytest.mark.parametrize("name", ["resnet18", "resnet18_se", "resnet18_sge", "resnet18_cbam", "resnet18_bam"])
def test_branch_rms_is_what_each_block_adds_and_its_identity(name):
    """Against a forward written out by hand, over uneven batches (6 images, batches of 4), for
    every module that leaves the residual sum to its block (its hook reads the block's own call)."""
    model, split = _model(name), _split(6)
    stats = branch_statistics(model, split, 32, IMAGENET_MEAN, IMAGENET_STD, batch_size=4)
    assert list(stats) == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    block, inputs = model.layer2[0], []
    hook = block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))  # after BAM's, if any
    with torch.no_grad():
        x = resize_normalize(split.images, 32, IMAGENET_MEAN, IMAGENET_STD)
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        model(x)
        hook.remove()
        y1 = inputs[0]
        bn_out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(y1)))))
        expected = {"identity": _rms(block.downsample(y1)), "attention_in": _rms(bn_out),
                    "attention_out": _rms(block.attention(bn_out)), "branch": _rms(block.attention(bn_out))}
    assert stats["layer2.0"] == pytest.approx(expected, rel=1e-5)
    assert stats["layer1.0"]["identity"] == pytest.approx(_rms(stem), rel=1e-5)  # no downsample
    if name == "resnet18_se":
        assert stats["layer1.0"]["attention_out"] < stats["layer1.0"]["attention_in"]  # its gates are < 1


def test_lgam_branch_is_its_output_not_the_block_output_it_fuses():
    """LGAM fuses the residual: the block calls it with the identity and gets ReLU(A'' + identity).
    The branch is A'' alone, eqs (1)-(7) on the BN output."""
    model, split = _model("resnet18_lgam"), _split(4)
    stats = branch_statistics(model, split, 32, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        x = resize_normalize(split.images, 32, IMAGENET_MEAN, IMAGENET_STD)
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        block = model.layer1[0]
        bn_out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
        a2 = lgam_reference(block.attention, bn_out)
    assert stats["layer1.0"]["branch"] == pytest.approx(_rms(a2), rel=1e-4)
    assert stats["layer1.0"]["branch"] != pytest.approx(_rms(torch.relu(a2 + stem)), rel=1e-2)


def test_branch_includes_skipinit_gain_and_preactivation_blocks_have_none():
    model = lgam.create_model("resnet18_se", num_classes=3, skip_init=True).eval()
    split = _split(2)
    stats = branch_statistics(model, split, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert all(b["branch"] == 0 and b["attention_out"] > 0 for b in stats.values())  # the gain starts at 0
    with torch.no_grad():
        model.layer3[1].skip_gain.fill_(-0.5)
    b = branch_statistics(model, split, 32, IMAGENET_MEAN, IMAGENET_STD)["layer3.1"]
    assert b["branch"] == pytest.approx(0.5 * b["attention_out"])
    assert branch_statistics(lgam.create_model("wrn16_10", num_classes=3).eval(), split, 32,
                             IMAGENET_MEAN, IMAGENET_STD) == {}
    table = format_branch_table({"resnet18_se": stats, "wrn16_10": {}})
    assert "| wrn16_10 | — | — |" in table
    assert "| resnet18_se | 0.00 / 0.00" in table


def test_table_header_says_the_inclusive_thresholds_the_counts_use():
    """A gate exactly at 0.99 / 0.01 counts as open / closed: the header says >= / <=, not > / <."""
    moments = _Moments()
    moments.add(torch.tensor([[SATURATED, 1 - SATURATED, 0.5, 0.7]]))
    assert moments.counts.tolist() == [1, 1, 1]
    header = format_gate_table({}, 0).splitlines()[0]
    assert "≥ 0.99 (%)" in header and "≤ 0.01 (%)" in header
