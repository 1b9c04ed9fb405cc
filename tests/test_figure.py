"""lgam.figure: the Figure-5 grid and the ``lgam figure5`` command."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from _helpers import synthetic_image
from lgam.cli import main as lgam_main
from lgam.figure import figure5, save_figure5


def test_grid_layout(engine, images):
    comps = engine.compare(images[:2], target=2)
    fig = figure5(comps)
    axes = fig.get_axes()
    assert len(axes) == 2 * 7 + 1  # the tiles, then the colour bar
    assert axes[-1].get_xlabel() == "CAM, each map min-max scaled to 0-1"
    titles = [ax.get_title() for ax in axes[:7]]
    assert titles == ["Input", "ResNet18", "SE", "SGE", "CBAM", "BAM", "LGAM"]
    for ax, r in zip(axes[8:14], comps[1].results):
        assert ax.get_xlabel() == f"{r.target_class}\n{r.score:.2f}"
        assert len(ax.get_images()) == 1


def test_labels_name_the_method_and_a_class_agnostic_map_says_so(engine, images):
    """The row said "Grad-CAM" whatever the method, and an EigenCAM tile read as the map of its
    class (EigenCAM's map is the same for every class)."""
    comps = engine.compare(images[0], method="eigencam", gates=True, models=["resnet18", "resnet18_se"])
    axes = figure5(comps, view="both").get_axes()
    assert axes[0].get_xlabel() == "EigenCAM"
    r = comps[0].results[0]
    assert axes[1].get_xlabel() == f"{r.target_class}\n{r.score:.2f}\nmap not class-specific"
    gradcam = engine.compare(images[0], method="gradcam++", models=["resnet18"])
    assert figure5(gradcam, view="both").get_axes()[0].get_xlabel() == "Grad-CAM++"
    assert "\nmap not" not in figure5(gradcam).get_axes()[1].get_xlabel()


def test_unavailable_tile(broken_checkpoints, images):
    from lgam.engine import CamEngine

    comps = CamEngine.from_checkpoints(broken_checkpoints, device="cpu").compare(images[0])
    axes = figure5(comps).get_axes()
    assert axes[3].get_xlabel() == "unavailable" and not axes[3].get_images()


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xm")])
def test_save_formats(engine, images, tmp_path, suffix, magic):
    out = save_figure5(engine.compare(images[0]), tmp_path / f"f{suffix}")
    assert out.read_bytes()[:4] == magic


def test_save_rejects_unknown_suffix(engine, images, tmp_path):
    with pytest.raises(ValueError, match="png"):
        save_figure5(engine.compare(images[0]), tmp_path / "f.jpg")
    with pytest.raises(ValueError, match="at least one image"):
        figure5([])


def test_cli(app_checkpoints, tmp_path, capsys):
    paths = []
    for i in range(3):
        p = tmp_path / f"in{i}.jpg"
        synthetic_image(i, (200, 150)).save(p)
        paths.append(str(p))
    out = tmp_path / "fig5.png"
    rc = lgam_main(["figure5", *paths, "--out", str(out), "--checkpoints", str(app_checkpoints),
                    "--device", "cpu", "--dpi", "60"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "LGAM · " in text
    with Image.open(out) as im:
        w, h = im.size
    assert w > 1.5 * h  # 3 rows x 7 columns
    arr = np.asarray(Image.open(out).convert("RGB"))
    assert arr.std() > 10  # something was drawn
    two = tmp_path / "two.png"
    assert lgam_main(["figure5", paths[0], "--out", str(two), "--checkpoints", str(app_checkpoints),
                      "--device", "cpu", "--dpi", "60", "--models", "resnet18_lgam", "resnet18"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.index("LGAM · ") < line.index("ResNet18 · ") and "SE · " not in line
    with Image.open(two) as im:
        assert im.size[0] < w / 2  # input + 2 columns instead of 7
    assert lgam_main(["figure5", paths[0], "--out", str(two), "--checkpoints", str(app_checkpoints),
                      "--models", "resnet19"]) == 2


def test_cli_errors(app_checkpoints, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    out = tmp_path / "x.png"
    assert lgam_main(["figure5", str(bad), "--out", str(out), "--checkpoints",
                      str(app_checkpoints)]) == 2
    assert "empty" in capsys.readouterr().err
    good = tmp_path / "good.png"
    synthetic_image(0).save(good)
    assert lgam_main(["figure5", str(good), "--out", str(out), "--checkpoints",
                      str(tmp_path / "none")]) == 2  # once 1: every lgam mistake exits 2
    assert capsys.readouterr().err.startswith("error: no manifest.json")
    assert lgam_main(["figure5", str(good), "--out", str(tmp_path / "x.gif"), "--checkpoints",
                      str(app_checkpoints)]) == 2
    assert lgam_main(["figure5", str(good), "--out", str(out), "--checkpoints",
                      str(app_checkpoints), "--target", "nope"]) == 2
    assert "unknown class" in capsys.readouterr().err
    assert not out.exists()


def test_gates_and_both_views(engine, images):
    comps = engine.compare(images[:2], gates=True)
    axes = figure5(comps, view="gates").get_axes()
    assert len(axes) == 2 * 7 + 1
    assert axes[-1].get_xlabel() == "gate value (what the module multiplies by)"
    assert axes[1].get_xlabel() == "no attention module" and not axes[1].get_images()
    assert axes[6].get_xlabel() == "stage 4 · layer4.1" and len(axes[6].get_images()) == 1
    assert axes[5].get_xlabel() == "after stage 3"  # BAM sits between stages
    both = figure5(comps, view="both").get_axes()
    assert len(both) == 4 * 7 + 1  # per image: a CAM row, then a gates row; the colour bar
    assert [both[0].get_xlabel(), both[7].get_xlabel()] == ["Grad-CAM", "gates"]
    with pytest.raises(ValueError, match="view"):
        figure5(comps, view="attention")


def test_tiles_keep_the_photo_aspect(engine):
    wide = Image.new("RGB", (300, 100), (90, 120, 30))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure5(engine.compare(wide))
    FigureCanvasAgg(fig).draw()  # lay out
    ax = fig.get_axes()[1]
    h, w = ax.get_images()[0].get_array().shape[:2]
    assert w / h == pytest.approx(3, rel=0.02)
    bbox = ax.get_window_extent()
    assert bbox.width / bbox.height == pytest.approx(3, rel=0.05)


def test_a_strip_image_gives_a_figure_of_bounded_size(engine, tmp_path):
    """A 1 x 1000 px upload once made a 760-inch row (20 s and a 114,000-px PNG for one model)."""
    from lgam.figure import MAX_TILE_ASPECT

    strip = Image.new("RGB", (1, 1000), (90, 120, 30))
    fig = figure5(engine.compare(strip), tile_inches=1.7)
    assert fig.get_size_inches()[1] <= 1.7 * MAX_TILE_ASPECT + 1.3  # a row, its caption, the colour bar
    out = save_figure5(engine.compare([strip, strip.transpose(Image.Transpose.ROTATE_90)]),
                       tmp_path / "strip.png", dpi=50)
    with Image.open(out) as im:
        assert im.height <= 50 * 2 * (1.7 * MAX_TILE_ASPECT + 1)


def test_cli_view_both(app_checkpoints, tmp_path, monkeypatch):
    """--view both --stage 3 reaches the comparison (gates of stage 3) and the drawing (two rows
    an image): a PNG header check passed with both options dropped."""
    import lgam.engine
    import lgam.figure

    img = tmp_path / "a.png"
    synthetic_image(3).save(img)
    calls = {}

    def spy(name, real):
        def run(*args, **kwargs):
            calls[name] = kwargs
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(lgam.engine.CamEngine, "compare", spy("compare", lgam.engine.CamEngine.compare))
    monkeypatch.setattr(lgam.figure, "figure5", spy("figure5", lgam.figure.figure5))
    heights = {}
    for view in ("cam", "both"):
        out = tmp_path / f"{view}.png"
        calls.clear()
        assert lgam_main(["figure5", str(img), "--out", str(out), "--checkpoints", str(app_checkpoints),
                          "--view", view, "--stage", "3", "--dpi", "60"]) == 0
        assert calls["compare"]["gates"] is (view == "both") and calls["compare"]["stage"] == 3
        assert calls["figure5"]["view"] == view
        with Image.open(out) as im:
            heights[view] = im.height
    assert heights["both"] > 1.6 * heights["cam"]  # a Grad-CAM row and a gates row


def test_squeeze_to_tile_aspect_stretches_only_strips_past_the_bound():
    from lgam.figure import MAX_TILE_ASPECT, squeeze_to_tile_aspect

    photo = Image.new("RGB", (400, 100))  # exactly 4:1: kept, the same object
    assert squeeze_to_tile_aspect(photo) is photo
    assert squeeze_to_tile_aspect(Image.new("RGB", (1, 448))).size == (448 / MAX_TILE_ASPECT, 448)
    assert squeeze_to_tile_aspect(Image.new("RGB", (448, 2))).size == (448, 448 / MAX_TILE_ASPECT)
    assert squeeze_to_tile_aspect(Image.new("RGB", (1, 2))).size == (1, 2)
