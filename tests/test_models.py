"""Registry, backbones, exact parameter counts, attention placement, safetensors round trip."""
import re
import subprocess
import sys
import pytest
import torch
from safetensors.torch import load_file, save_file

import lgam
from lgam.attention import ATTENTION
from lgam.errors import UsageError
from lgam.models import FIGURE5_MODELS
from lgam.models.registry import BACKBONES
from lgam.params import PAPER_PARAMS_M, count_macs, count_params, format_markdown, param_table

ALL = lgam.list_models()
VARIANTS = list(FIGURE5_MODELS)


def test_registry_names():
    expected = {b for b in BACKBONES} | {f"{b}_{a}" for b in BACKBONES for a in ATTENTION}
    assert set(ALL) == expected
    assert set(VARIANTS + ["resnet18_lgam_g32"]) <= set(ALL)
    assert lgam.list_models("resnet18_lgam*") == ["resnet18_lgam", "resnet18_lgam_g32"]
    assert lgam.list_models(["resnet18", "resnet34_s*"]) == ["resnet18", "resnet34_se", "resnet34_sge"]


def test_create_model_takes_timms_pretrained_false_and_says_there_are_no_weights():
    assert count_params(lgam.create_model("resnet18", pretrained=False)) == count_params(
        lgam.create_model("resnet18"))
    with pytest.raises(UsageError, match=r"no pretrained weights.*model, entry = lgam.checkpoints.load_checkpoint"):
        lgam.create_model("resnet18", pretrained=True)


def test_the_submodules_the_docs_name_are_reached_from_import_lgam():
    """The pretrained=True message says lgam.checkpoints.load_checkpoint: after a bare ``import
    lgam`` that was an AttributeError (only .attention and .models were imported)."""
    code = ("import sys, lgam; assert 'lgam.checkpoints' not in sys.modules; "
            "assert callable(lgam.checkpoints.load_checkpoint) and callable(lgam.cam.fast_gradcam); "
            "assert {'engine', 'data', 'checkpoints'} <= set(dir(lgam)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-1500:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lgam.nope  # noqa: B018


def test_a_registered_builder_without_a_stem_builds_and_rebuilds():
    """create_model recorded cfg['stem'] for every model: a KeyError for a builder that has none."""
    from lgam.models import registry

    class Tiny(torch.nn.Module):
        def __init__(self, num_classes: int = 10, width: int = 4) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(width, num_classes)

    registry.register_model("tiny_test_net", Tiny, width=3)
    try:
        m = lgam.create_model("tiny_test_net", num_classes=2)
        assert m.fc.in_features == 3 and m.model_kwargs == {"num_classes": 2}
        assert lgam.create_model(m.model_name, **m.model_kwargs).fc.out_features == 2
    finally:
        registry._MODELS.pop("tiny_test_net"), registry._DEFAULTS.pop("tiny_test_net")


def test_an_attention_given_to_a_backbone_goes_where_its_registered_name_puts_it():
    """``create_model("resnet18", attention="bam")`` once put BAM inside all eight blocks."""
    given, registered = (lgam.create_model("resnet18", attention="bam", num_classes=5),
                         lgam.create_model("resnet18_bam", num_classes=5))
    assert count_params(given) == count_params(registered)
    assert [type(m).__name__ for m in given.stage_attention] == [
        type(m).__name__ for m in registered.stage_attention]
    assert count_params(lgam.create_model("resnet18", attention="se")) == count_params(
        lgam.create_model("resnet18_se"))


def test_a_backbone_given_an_attention_is_named_as_its_registered_variant(tmp_path):
    """Named ``resnet18`` it once saved over the plain model's checkpoint (and the app showed BAM's
    heatmap as ResNet18's)."""
    from lgam.checkpoints import load_checkpoint, save_checkpoint

    bam = lgam.create_model("resnet18", num_classes=3, attention="bam")
    assert bam.model_name == "resnet18_bam" and "attention" not in bam.model_kwargs
    rebuilt = lgam.create_model(bam.model_name, **bam.model_kwargs)
    assert count_params(rebuilt) == count_params(bam)
    save_checkpoint(bam, tmp_path, classes=["a", "b", "c"])
    assert [p.name for p in tmp_path.glob("resnet18-*")] == []
    assert type(load_checkpoint(tmp_path, "resnet18_bam")[0].stage_attention[0]).__name__ == "BAM"
    assert lgam.create_model("resnet18", attention=None).model_name == "resnet18"
    assert lgam.create_model("resnet18_se", attention="se").model_name == "resnet18_se"


def test_a_model_registered_without_variants_still_takes_attention(monkeypatch):
    """A user's register_model(...) whose builder takes attention=: not renamed to an unregistered
    '<name>_se'."""
    from lgam.models import registry
    from lgam.models.resnet import ResNet

    monkeypatch.setitem(registry._MODELS, "tiny_resnet", ResNet)
    monkeypatch.setitem(registry._DEFAULTS, "tiny_resnet", {"layers": [1, 1, 1, 1], "stem": "cifar"})
    model = lgam.create_model("tiny_resnet", num_classes=3, attention="se")
    assert model.model_name == "tiny_resnet" and model.model_kwargs["attention"] == "se"
    assert type(model.layer1[0].attention).__name__ == "SE"


@pytest.mark.parametrize("name,kwargs,message", [
    ("resnet18_lgam", {"attention": "se"}, "'resnet18_lgam' has 'lgam' attention, not 'se': build 'resnet18_se'"),
    ("resnet18_lgam", {"attention": None}, "not None: build 'resnet18' instead"),
    ("resnet18", {"attention_kwargs": {"groups": 4}}, "'resnet18' has no attention module"),
    ("resnet18", {"attention": "eca"}, "unknown attention 'eca'"),
])
def test_contradictory_attention_arguments_are_refused(name, kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        lgam.create_model(name, **kwargs)


# feature-map stride at layer4: ResNets downsample in four stages, WRN/ResNeXt in three
STRIDE = {("resnet", "cifar"): 8, ("resnet", "imagenet"): 32, ("other", "cifar"): 4,
          ("other", "imagenet"): 16}


@pytest.mark.parametrize("stem, size", [("cifar", 32), ("imagenet", 64)])
@pytest.mark.parametrize("name", ALL)
def test_every_model_and_stem_gives_logits(name, stem, size):
    feat = size // STRIDE["resnet" if name.startswith("resnet") else "other", stem]
    model = lgam.create_model(name, num_classes=7, stem=stem)
    y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    f = model.eval().forward_features(torch.randn(1, 3, size, size))
    assert f.shape[-2:] == (feat, feat)
    assert model.model_name == name and model.model_kwargs["stem"] == stem


# parameter counts of the reference implementations of each module on ResNet18 (the counts the
# paper's tables match): CIFAR-10, CIFAR-100, ImageNet-20 heads
EXACT = {
    "resnet18": (11_173_962, 11_220_132, 11_186_772),
    "resnet18_se": (11_261_002, 11_307_172, 11_273_812),
    "resnet18_sge": (11_174_986, 11_221_156, 11_187_796),
    "resnet18_cbam": (11_261_802, 11_307_972, 11_274_612),  # + 2 per spatial BN (official code)
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_parameter_counts(name):
    heads = [(10, "cifar"), (100, "cifar"), (20, "imagenet")]
    got = tuple(count_params(lgam.create_model(name, num_classes=n, stem=s)) for n, s in heads)
    assert got == EXACT[name]


def test_lgam_bam_parameter_counts():
    base = EXACT["resnet18"][1]
    # LGAM G=4, r=16: per block sum over groups of (2*C'*h + h + 3*C'); two blocks per stage
    assert count_params(lgam.create_model("resnet18_lgam", 100, "cifar")) - base == 27_640
    # G=32, r=2 reproduces every "+0.03M" of the paper's Tables 3-4 to the second decimal
    assert count_params(lgam.create_model("resnet18_lgam_g32", 100, "cifar")) - base == 28_480
    for (nc, stem), paper in zip([(10, "cifar"), (100, "cifar"), (20, "imagenet")],
                                 PAPER_PARAMS_M["resnet18_lgam"]):
        n = count_params(lgam.create_model("resnet18_lgam_g32", nc, stem))
        assert round(n / 1e6, 2) == paper
    assert count_params(lgam.create_model("resnet18_bam", 100, "cifar")) - base == 22_991


def test_attention_placement():
    m = lgam.create_model("resnet18_cbam")
    blocks = [b for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer]
    assert all(isinstance(b.attention, lgam.CBAM) for b in blocks) and len(blocks) == 8
    assert m.stage_attention is None
    bam = lgam.create_model("resnet18_bam")
    assert all(isinstance(b.attention, torch.nn.Identity) for layer in (bam.layer1,) for b in layer)
    assert [type(a).__name__ for a in bam.stage_attention] == ["BAM", "BAM", "BAM", "Identity"]


def test_attention_acts_after_bn2_before_the_identity_add():
    m = lgam.create_model("resnet18_se").eval()
    block = m.layer1[0]
    seen = {}
    block.bn2.register_forward_hook(lambda mod, i, o: seen.setdefault("bn2", o))
    block.attention.register_forward_hook(lambda mod, i, o: seen.setdefault("att_in", i[0]))
    x = torch.randn(1, 64, 8, 8)
    out = block(x)
    assert torch.equal(seen["att_in"], seen["bn2"])
    torch.testing.assert_close(out, torch.relu(block.attention(seen["bn2"]) + x))


def test_wrn_sge_uses_groups_that_divide_its_widths():
    m = lgam.create_model("wrn16_10_sge", num_classes=10)
    assert {b.attention.groups for layer in (m.layer1, m.layer2, m.layer3) for b in layer} == {32}
    # other attention arguments merge with the registered ones (they once replaced them: 64 groups)
    m = lgam.create_model("wrn16_10_sge", num_classes=10, attention_kwargs={"eps": 1e-3})
    assert {(b.attention.groups, b.attention.eps) for b in m.layer1} == {(32, 1e-3)}


def test_attention_kwargs_reach_the_modules():
    m = lgam.create_model("resnet18_lgam", attention_kwargs={"groups": 8, "reduction": 2})
    assert m.layer1[0].attention.groups == 8
    m2 = lgam.create_model(m.model_name, **m.model_kwargs)
    assert count_params(m2) == count_params(m)


@pytest.mark.parametrize("name", VARIANTS + ["resnet18_lgam_g32"])
def test_state_dict_round_trip_through_safetensors(name, tmp_path):
    model = lgam.create_model(name, num_classes=20)
    model.train()
    model(torch.randn(4, 3, 64, 64))  # move BN statistics off their defaults
    model.eval()
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    other = lgam.create_model(name, num_classes=20).eval()
    other.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_every_resnet18_variant_trains(name):
    """Loss halves in 20 small steps. Float64 and a small learning rate: an initialised LGAM
    network has large activations (x4 per module, see docs/lgam-numerics.md) and at lr >= 0.005 its first
    steps overshoot to losses of 10-100, after which float32 rounding alone picks the trajectory."""
    torch.manual_seed(0)
    model = lgam.create_model(name, num_classes=4, stem="cifar").double()
    x, y = torch.randn(8, 3, 16, 16).double(), torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    first = None
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: lgam.create_model("resnet19"), "unknown model 'resnet19'"),
        (lambda: lgam.create_model("resnet18", stem="tiny"), "stem must be one of"),
        (lambda: lgam.create_model("resnet18", num_classes=-1), "num_classes must be an integer >= 0"),
        (lambda: lgam.create_model("resnet18_lgam", attention_kwargs={"groups": 3}),
         "not divisible by groups=3"),
        (lambda: lgam.models.WideResNet(depth=15), "WRN depth must be 6n\\+4"),
        (lambda: lgam.models.ResNeXt(depth=30), "ResNeXt depth must be 9n\\+2"),
        # another architecture under a registered name (its checkpoint would overwrite the real one's)
        (lambda: lgam.create_model("resnet18", layers=[3, 4, 6, 3]), "'resnet18' is layers=\\[2, 2, 2, 2\\]"),
        (lambda: lgam.create_model("resnet18", layers=(2, 2, 3, 2)), "'resnet18' is layers="),
        (lambda: lgam.create_model("resnext29_32x4d", cardinality=8, base_width=64),
         "is cardinality=32, base_width=4: another value builds another architecture"),
        (lambda: lgam.create_model("wrn16_10", depth=28), "'wrn16_10' is depth=16"),
        # the way out it names exists (lgam.register_model did not)
        (lambda: lgam.create_model("wrn16_10", depth=28), r"register one \(lgam\.models\.register_model\("),
        (lambda: lgam.create_model("resnet18", attention="se", placement="stage"), "is placement='block'"),
        # a keyword nothing takes: a bare TypeError from the class before
        (lambda: lgam.create_model("resnet18", depht=3), "takes no depht; it accepts: .*skip_init"),
        # create_model's own keywords first; the architecture's fixed ones (placement) not offered
        (lambda: lgam.create_model("resnet18_se", depht=3),  # its placement is fixed: not offered
         r"it accepts: num_classes, stem, attention, pretrained, attention_kwargs, skip_init$"),
        (lambda: lgam.create_model(None), "a model name is a string such as 'resnet18_lgam'"),
        (lambda: lgam.list_models(123), "list_models takes a name pattern"),
        (lambda: lgam.create_model("resnet18_se", attention_kwargs={"groups": 8}),
         "the 'se' module takes no groups; it accepts: reduction"),
        (lambda: lgam.create_model("ResNet18"), "unknown model 'ResNet18'.*'resnet18'"),
        (lambda: lgam.create_model("resnet50"), "unknown model 'resnet50'.*'resnet34'"),
    ],
)
def test_bad_model_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


#: MACs each module adds to ResNet18 at 224 px (20 classes): its convolutions and matrix
#: multiplies (SGE has none; LGAM's group MLPs through its op's registered formula)
MODULE_MACS = {"resnet18_se": 87_040, "resnet18_sge": 0, "resnet18_cbam": 990_420,
               "resnet18_bam": 5_150_656, "resnet18_lgam": 21_760}


def test_macs_are_torchvisions_and_each_modules_own():
    """The bound was 1.8186 +- 0.005 GMACs around a wrong value (1.8141 is right): it would not
    have seen LGAM's 21,760 MACs vanish, nor most of BAM's."""
    import torchvision

    assert count_macs(lgam.create_model("resnet18", num_classes=1000), 224) == 1_814_073_344
    assert count_macs(torchvision.models.resnet18(), 224) == 1_814_073_344
    plain = count_macs(lgam.create_model("resnet18", 20), 224)
    for name, macs in MODULE_MACS.items():
        assert count_macs(lgam.create_model(name, 20), 224) - plain == macs, name


def test_a_registered_architecture_given_again_is_accepted():
    """The check compared with !=: layers=(2, 2, 2, 2), resnet18's own, was refused as a tuple."""
    assert lgam.create_model("resnet18", layers=(2, 2, 2, 2), num_classes=3).model_name == "resnet18"
    assert lgam.create_model("resnet18_se", placement="block", num_classes=3).model_name == "resnet18_se"


def test_macs_of_a_bfloat16_model():
    """The input was always float32: a bf16 model failed with a dtype mismatch."""
    model = lgam.create_model("resnet18", num_classes=20).to(torch.bfloat16)
    assert count_macs(model, 64) == count_macs(lgam.create_model("resnet18", num_classes=20), 64)


@pytest.mark.parametrize("name, reference", [("resnet18", "resnet18"), ("resnet34", "resnet34")])
def test_resnets_are_torchvisions(name, reference):
    import torchvision

    ours = lgam.create_model(name, num_classes=1000).state_dict()
    theirs = getattr(torchvision.models, reference)().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert count_params(lgam.create_model(name)) == {"resnet18": 11_689_512, "resnet34": 21_797_672}[name]


def test_wrn_and_resnext_have_their_papers_sizes():
    """WRN-16-10 17.1M (Zagoruyko & Komodakis); ResNeXt-29 8x64d 34.4M and 16x64d 68.1M (Xie et
    al.), all at CIFAR-10; our registered ResNeXt-29 is 32x4d."""
    assert count_params(lgam.create_model("wrn16_10", num_classes=10)) == 17_116_634
    assert count_params(lgam.create_model("resnext29_32x4d", num_classes=10)) == 4_775_754
    for cardinality, want in ((8, 34_426_698), (16, 68_155_210)):
        model = lgam.models.ResNeXt(depth=29, cardinality=cardinality, base_width=64, num_classes=10)
        assert count_params(model) == want


def test_param_table_and_cli(capsys):
    rows = param_table(["resnet18", "resnet18_lgam_g32"], macs=False)
    assert rows[0].params["cifar100"] == 11_220_132 and rows[0].diff_m("cifar100") == pytest.approx(0, abs=5e-4)
    assert rows[1].diff_m("imagenet20") == pytest.approx(0.0, abs=0.005)
    table = format_markdown(rows)
    assert "| resnet18 | 11,173,962 | 11.17M | +0.004 |" in table
    from lgam.cli import main
    assert main(["params", "--models", "resnet18_se", "--no-macs"]) == 0
    assert "| resnet18_se | 11,261,002 | 11.26M |" in capsys.readouterr().out


def test_zero_init_residual_starts_every_block_as_the_identity():
    from lgam.models import BasicBlock, zero_init_residual

    model = lgam.create_model("resnet18_lgam", num_classes=5).train()
    assert zero_init_residual(model) == 8  # one bn2 per BasicBlock
    assert zero_init_residual(lgam.create_model("resnext29_32x4d_lgam", num_classes=5)) == 9
    block = model.layer2[1]
    assert isinstance(block, BasicBlock) and block.downsample is None
    x = torch.rand(4, 128, 8, 8)  # a post-ReLU input
    torch.testing.assert_close(block(x), x)  # LGAM of a zero branch is zero (eq (7): A' M + A)
    from lgam.recipes import RECIPES

    assert not RECIPES["cpu"].zero_init_residual and not RECIPES["paper"].zero_init_residual


@pytest.mark.parametrize("identity", ["zero_init_residual", "skip_init"])
def test_identity_blocks_tame_lgams_gradient_at_init(identity):
    """Why the cpu recipe starts every block as the identity: from the standard init the gradient
    of resnet18_lgam is hundreds of times that of resnet18; from identity blocks (a zeroed bn2, or
    SkipInit's zero gain, which the recipe uses) it is not."""
    from lgam.models import zero_init_residual

    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 5, (16,))

    def grad_norm(name, how=None):
        torch.manual_seed(0)
        m = lgam.create_model(name, num_classes=5, **({"skip_init": True} if how == "skip_init" else {})).train()
        if how == "zero_init_residual":
            zero_init_residual(m)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()]).norm().item()

    plain = grad_norm("resnet18")
    assert grad_norm("resnet18_lgam") > 50 * plain
    assert grad_norm("resnet18_lgam", identity) < 3 * plain


@pytest.mark.parametrize("name", ["resnet18_se", "resnet18_lgam", "resnet18_cbam", "resnext29_32x4d_sge",
                                  "wrn16_10_se"])
def test_skip_init_starts_blocks_as_the_identity_with_attention_fed_its_real_input(name):
    """SkipInit (the cpu recipe's ``skip_init``): every block starts as the identity, yet its
    attention module sees the branch's normal, non-zero output; zero_init_residual feeds it zeros."""
    from lgam.models import zero_init_residual

    seen = {}

    def attention_inputs(model):
        seen.clear()
        for block_name, m in model.named_modules():
            if block_name.split(".")[-1] == "attention":
                m.register_forward_hook(lambda mod, args, out, k=block_name: seen.__setitem__(k, args[0]))

    torch.manual_seed(0)
    model = lgam.create_model(name, num_classes=5, skip_init=True).train()
    gains = [m.skip_gain for m in model.modules() if getattr(m, "skip_gain", None) is not None]
    assert gains and all(float(g.detach()) == 0.0 for g in gains)
    block = model.layer1[-1]
    x = torch.rand(4, block.conv1.in_channels, 8, 8)
    attention_inputs(block)
    out = block(x)
    expected = x if name.startswith("wrn") else torch.relu(x)  # pre-activation WRN: no ReLU after the add
    torch.testing.assert_close(out, expected)
    assert seen and all(v.abs().amax() > 0.1 for v in seen.values())
    out.square().sum().backward()
    assert block.skip_gain.grad is not None and float(block.skip_gain.grad.abs()) > 0

    if not name.startswith("wrn"):  # the contrast: a zeroed BN scale hands attention all zeros
        plain = lgam.create_model(name, num_classes=5).train()
        zero_init_residual(plain)
        attention_inputs(plain.layer1[-1])
        plain.layer1[-1](x)
        assert all(float(v.detach().abs().amax()) == 0.0 for v in seen.values())


def test_skip_init_is_part_of_the_architecture():
    model = lgam.create_model("resnet18_lgam", num_classes=5, skip_init=True)
    assert model.model_kwargs["skip_init"] is True  # so a checkpoint rebuilds it
    names = [n for n, _ in model.named_parameters() if n.endswith("skip_gain")]
    assert len(names) == 8 and "layer4.1.skip_gain" in names
    assert not any(n.endswith("skip_gain") for n, _ in lgam.create_model("resnet18", 5).named_parameters())
    from lgam.recipes import RECIPES, TrainError, make_recipe

    with pytest.raises(TrainError, match="choose one"):
        make_recipe("cpu", ["skip_init=true"])  # the cpu preset sets the branches' scale already
    assert make_recipe("cpu", ["branch_rms=0", "skip_init=true"]).skip_init
    assert RECIPES["cpu"].branch_rms == 0.5 and not RECIPES["cpu"].skip_init


@pytest.mark.parametrize("name", ["resnet18_se", "resnet18_lgam", "resnext29_32x4d_sge"])
def test_residual_bn_scale_feeds_attention_a_scaled_copy_of_its_standard_input(name):
    """``residual_bn_scale`` (:func:`lgam.models.init_residual_bn`): the branch's last BN starts at
    that scale, so the attention module sees exactly ``scale`` times its standard-init input —
    small, and not all-zero as under zero_init_residual."""
    from lgam.models import init_residual_bn
    from lgam.recipes import make_recipe
    from lgam.train import init_blocks

    seen = []

    def run(model):
        seen.clear()
        block = model.layer1[-1]
        block.attention.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
        block(torch.rand(4, block.conv1.in_channels, 8, 8, generator=torch.Generator().manual_seed(1)))
        return seen[0]

    torch.manual_seed(0)
    standard = lgam.create_model(name, num_classes=5).train()
    torch.manual_seed(0)
    scaled = lgam.create_model(name, num_classes=5).train()
    init_blocks(scaled, make_recipe("cpu", ["branch_rms=0", "residual_bn_scale=0.1"]))
    full, small = run(standard), run(scaled)
    assert full.abs().amax() > 0.5
    torch.testing.assert_close(small, 0.1 * full)
    n = init_residual_bn(standard, 0.25)
    assert n == (8 if name.startswith("resnet18") else 9)
    assert all(float(m.weight.detach().min()) == float(m.weight.detach().max()) == 0.25
               for blk in standard.modules() if getattr(type(blk), "residual_bn", None)
               for m in [getattr(blk, type(blk).residual_bn)])


def test_residual_bn_scale_is_checked():
    from lgam.recipes import TrainError, make_recipe

    with pytest.raises(TrainError, match="choose one"):
        make_recipe("paper", ["zero_init_residual=true", "residual_bn_scale=0.1"])
    with pytest.raises(TrainError, match="choose one"):
        make_recipe("paper", ["skip_init=true", "residual_bn_scale=0.1"])
    with pytest.raises(TrainError, match=">= 0"):
        make_recipe("paper", ["residual_bn_scale=-1"])
    assert make_recipe("paper").residual_bn_scale == 1.0  # the standard init


def test_match_branch_rms_refuses_branches_that_output_zero():
    """After zero_init_residual the last BNs' weights are 0: scaling 0 kept them 0, and the
    function returned RMS 0 as if it had matched."""
    from lgam.errors import UsageError
    from lgam.models import match_branch_rms, zero_init_residual

    model = lgam.create_model("resnet18_se", num_classes=5)
    zero_init_residual(model)
    with pytest.raises(UsageError, match=r"residual branches \[0, 1, 2, 3, 4, 5, 6, 7\] output 0"):
        match_branch_rms(model, torch.randn(4, 3, 32, 32), 0.5)


@pytest.mark.parametrize("name", ["resnet18", "resnet18_se", "resnet18_cbam", "resnet18_lgam", "resnext29_32x4d_sge"])
def test_match_branch_rms_starts_every_branch_at_the_same_scale(name):
    """``branch_rms``: whatever its attention module does to the scale (SE halves it, CBAM quarters
    it, LGAM multiplies it ~4x), every branch's output after the module starts at the target RMS;
    nothing but the branches' last BN scales changes, and the model's mode is restored."""
    from lgam.models import match_branch_rms
    from lgam.models.branch_init import residual_bns

    torch.manual_seed(0)
    model = lgam.create_model(name, num_classes=5).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    standard = match_branch_rms(model, images, 0.5, steps=0)  # measures only
    assert {k: v for k, v in model.state_dict().items() if not torch.equal(v, before[k])} == {}
    got = match_branch_rms(model, images, 0.5)
    assert len(got) == len(residual_bns(model)) == (8 if name.startswith("resnet18") else 9)
    assert all(abs(r - 0.5) < 0.01 for r in got), got
    assert not model.training
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{n}.{type(b).residual_bn}.weight" for n, b in model.named_modules()
                       if getattr(type(b), "residual_bn", None)}
    if name == "resnet18_se":  # SE's gate starts at 0.5: its own standard init is already there
        assert all(abs(s - 0.5) < 0.01 for s in standard)
    if name == "resnet18_lgam":  # the ladder amplifies: its BN scales end far below 1
        assert min(standard) > 2 and all(float(bn.weight.detach().max()) < 0.25 for _, bn in residual_bns(model))


def test_branch_rms_recipe_needs_images_and_is_exclusive():
    from lgam.recipes import TrainError, make_recipe
    from lgam.train import init_batch, init_blocks

    recipe = make_recipe("cpu")  # branch_rms=0.5
    model = lgam.create_model("resnet18_se", num_classes=5)
    with pytest.raises(TrainError, match="training images"):
        init_blocks(model, recipe)
    with pytest.raises(TrainError, match="choose one"):
        make_recipe("cpu", ["zero_init_residual=true"])  # the cpu preset's own block init is another
    with pytest.raises(TrainError, match=">= 0"):
        make_recipe("paper", ["branch_rms=-0.5"])
    images = torch.randint(0, 256, (300, 3, 40, 40), dtype=torch.uint8)
    batch = init_batch(images, recipe, seed=3)
    assert batch.shape == (recipe.batch_size, 3, recipe.train_size_start, recipe.train_size_start)
    torch.testing.assert_close(batch, init_batch(images, recipe, seed=3))  # the same on every process
    got = init_blocks(model, recipe, batch)
    assert got is not None and all(abs(r - 0.5) < 0.01 for r in got)


@pytest.mark.parametrize("name", ["resnet18_lgam", "wrn16_10_se", "resnext29_32x4d_bam"])
def test_timm_head_api_headless_models_and_a_new_classifier(name, tmp_path):
    """num_classes=0, forward_head(pre_logits=True), get_classifier and reset_classifier as timm's."""
    from lgam.checkpoints import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = lgam.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    headless = lgam.create_model(name, num_classes=0).eval()
    headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    assert feats.shape == (2, model.num_features) and headless.num_classes == 0
    torch.testing.assert_close(headless(x), feats)
    assert model.get_classifier() is model.fc and isinstance(headless.get_classifier(), torch.nn.Identity)
    torch.testing.assert_close(model.get_classifier()(feats), model(x))
    headless.reset_classifier(7)
    assert headless(x).shape == (2, 7) and headless.model_kwargs["num_classes"] == 7
    assert (headless.fc.bias == 0).all() == name.startswith("wrn")  # WRN's head bias starts at 0
    save_checkpoint(headless, tmp_path, classes=list("abcdefg"))
    loaded = load_checkpoint(tmp_path, name)[0]  # float16 weights
    assert loaded.num_classes == 7 and loaded(x).shape == (2, 7)
    torch.testing.assert_close(loaded.fc.weight, headless.fc.weight, atol=1e-3, rtol=1e-3)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), feats)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        model.reset_classifier(-2)
    model.reset_classifier(3, "avg")  # timm's global_pool argument: these models pool by average
    assert model(x).shape == (2, 3)
    with pytest.raises(UsageError, match="global_pool must be None or 'avg'.*forward_features"):
        model.reset_classifier(0, "")
