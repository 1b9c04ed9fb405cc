"""The Gradio app end to end through ``gradio_client`` (launched on 127.0.0.1), plus the handlers."""
from __future__ import annotations

import io
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from _helpers import CLASSES, run_in_threads, synthetic_image
)

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app  # noqa: E402
from app.ui import OWN_TOP1, build_app, model_rows, run_compare  # noqa: E402
from lgam.engine import CamEngine  # noqa: E402
from lgam.imageio import load_image  # noqa: E402

MAX_MB = 0.5  # the app under test refuses uploads over 0.5 MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app_checkpoints, engine, tmp_path_factory):
    ex = tmp_path_factory.mktemp("examples")
    synthetic_image(7, (120, 90)).save(ex / "shapes.png")
    port = free_port()
    args = app.parse_args(["--checkpoints", str(app_checkpoints), "--device", "cpu",
                           "--host", "127.0.0.1", "--port", str(port), "--examples", str(ex),
                           "--max-mb", str(MAX_MB), "--concurrency", "4"])
    demo = app.launch(args, engine=engine, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("inputs")
    paths = []
    for i, im in enumerate(images):
        p = d / f"img{i}.png"
        im.save(p)
        paths.append(str(p))
    return paths


def _compare(client, path, more=(), target=OWN_TOP1, method="gradcam", opacity=0.5):
    return client.predict(handle_file(path), [handle_file(m) for m in more], target, method,
                          opacity, api_name="/compare")


def test_api_has_named_compare(client):
    eps = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/compare" in eps and "/export" in eps


def test_compare_matches_engine(client, engine, files):
    gallery, top5, info = _compare(client, files[0])
    assert len(gallery) == 7
    want = engine.compare(load_image(files[0]))[0]
    assert [g["caption"] for g in gallery] == ["Input · img0.png"] + [r.caption() for r in want.results]
    for g in gallery:
        with Image.open(g["image"]) as im:
            assert im.format == "PNG" and im.size == (96, 80)
    rows = top5["data"]
    assert [r[1] for r in rows] == ["ResNet18", "SE", "SGE", "CBAM", "BAM", "LGAM"]
    assert rows[0][2] == f"{want.results[0].top5[0][0]} ({want.results[0].top5[0][1]:.2f})"
    assert "cpu" in info and "LGAM" in info


def test_target_class_for_all(client, files):
    gallery, _, _ = _compare(client, files[1], target=CLASSES[3])
    assert all(f" · {CLASSES[3]} · " in g["caption"] for g in gallery[1:])


def test_other_method_and_opacity(client, files):
    a, _, _ = _compare(client, files[2], method="layercam", opacity=0.0)
    arr_in = np.asarray(Image.open(a[0]["image"]).convert("RGB"))
    arr_0 = np.asarray(Image.open(a[1]["image"]).convert("RGB"))
    assert np.array_equal(arr_in, arr_0)  # opacity 0: the input itself
    b, _, _ = _compare(client, files[2], method="layercam", opacity=0.8)
    assert not np.array_equal(arr_in, np.asarray(Image.open(b[1]["image"]).convert("RGB")))


def test_several_images_make_a_grid(client, files):
    gallery, top5, _ = _compare(client, files[0], more=files[1:3])
    assert len(gallery) == 21 and len(top5["data"]) == 18
    assert [g["caption"] for g in gallery[::7]] == [f"Input · img{i}.png" for i in range(3)]


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("pdf", b"%PDF")])
def test_export_figure(client, files, fmt, magic):
    path = client.predict(handle_file(files[0]), [handle_file(files[1])], OWN_TOP1, "gradcam",
                          0.5, fmt, api_name="/export")
    with open(path, "rb") as f:
        assert f.read(4) == magic


def _bomb() -> bytes:
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(4096)))
            + chunk(b"IEND", b""))


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _bad_inputs() -> dict[str, tuple[bytes, str]]:
    rng = np.random.default_rng(0)
    noise = _png(Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)))
    assert len(noise) > MAX_MB * 2**20
    good = _png(synthetic_image(3))
    return {
        "text.png": (b"just some text, not pixels\n" * 20, "not an image"),
        "empty.jpg": (b"", "empty"),
        "truncated.png": (good[: len(good) // 2], "truncated or corrupt"),
        "corrupt.png": (good[:60] + bytes(range(256)) * 4, "truncated or corrupt|not an image"),
        "huge.png": (noise, "limit"),
        "bomb.png": (_bomb(), "pixels"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_input_gets_a_clear_message(client, files, tmp_path, name):
    data, message = _bad_inputs()[name]
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(AppError, match=message):
        _compare(client, str(p))
    gallery, _, _ = _compare(client, files[0])  # the app is still fine
    assert len(gallery) == 7


def _unusual(tmp_path) -> dict[str, str]:
    out = {}
    frames = [Image.new("RGB", (30, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["anim.gif"] = str(p)
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (30, 20), (0, 200, 200, 0)).save(p)
    out["cmyk.jpg"] = str(p)
    p = tmp_path / "gray16.png"
    Image.fromarray((np.arange(600, dtype=np.uint16) * 100).reshape(20, 30)).save(p)
    out["gray16.png"] = str(p)
    p = tmp_path / "pixel.png"
    Image.new("RGBA", (1, 1), (10, 20, 30, 128)).save(p)
    out["pixel.png"] = str(p)
    p = tmp_path / "anim.png"  # APNG
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["anim.png"] = str(p)
    p = tmp_path / "palette.png"
    synthetic_image(4, (30, 20)).convert("P", palette=Image.Palette.ADAPTIVE).save(p)
    out["palette.png"] = str(p)
    p = tmp_path / "gray.jpg"
    synthetic_image(5, (30, 20)).convert("L").save(p)
    out["gray.jpg"] = str(p)
    p = tmp_path / "rotated.jpg"  # stored 30x20, EXIF orientation 6: shown 20x30
    exif = Image.Exif()
    exif[0x0112] = 6
    synthetic_image(6, (30, 20)).save(p, exif=exif)
    out["rotated.jpg"] = str(p)
    return out


def test_unusual_inputs_work(client, tmp_path):
    for name, path in _unusual(tmp_path).items():
        gallery, _, _ = _compare(client, path)
        assert len(gallery) == 7, name
        assert gallery[0]["caption"] == f"Input · {name}"
        with Image.open(gallery[0]["image"]) as shown:
            assert shown.mode == "RGB", name
            want = {"rotated.jpg": (20, 30), "pixel.png": (1, 1)}.get(name, (30, 20))
            assert shown.size == want, name
        if name in ("anim.gif", "anim.png"):  # the first (red) frame
            assert np.asarray(Image.open(gallery[0]["image"]))[..., 0].mean() > 200, name


def test_no_image_and_bad_controls(client, files):
    with pytest.raises(AppError, match="add an image"):
        client.predict(None, [], OWN_TOP1, "gradcam", 0.5, api_name="/compare")
    with pytest.raises(AppError, match="not in the list of choices"):  # Gradio checks dropdowns
        _compare(client, files[0], target="not a class")
    with pytest.raises(AppError, match="not in the list of choices"):
        _compare(client, files[0], method="magic")


def _tiles(result):
    gallery, top5, _ = result
    return ([g["caption"] for g in gallery], top5["data"],
            [np.asarray(Image.open(g["image"]).convert("RGB"), dtype=np.int16) for g in gallery])


def test_eight_concurrent_clients_get_their_own_results(server, files):
    jobs = [(files[i], None if i % 2 else CLASSES[i], "gradcam" if i != 5 else "xgradcam")
            for i in range(8)]
    clients = [Client(server, verbose=False) for _ in jobs]
    alone = [_tiles(_compare(c, f, target=t or OWN_TOP1, method=m))
             for c, (f, t, m) in zip(clients, jobs)]
    got: list = [None] * len(jobs)

    def work(i):
        f, t, m = jobs[i]
        got[i] = _tiles(_compare(clients[i], f, target=t or OWN_TOP1, method=m))

    errors = run_in_threads(work, len(jobs))
    assert not errors, errors
    for i, (g, a) in enumerate(zip(got, alone)):
        assert g[0] == a[0], i  # captions: model, class, probability
        assert [r[:7] for r in g[1]] == [r[:7] for r in a[1]], i  # top-5 (not the timings)
        for x, y in zip(g[2], a[2]):
            assert x.shape == y.shape and np.abs(x - y).max() <= 1, i
    # different jobs really got different answers (not one shared result)
    assert len({tuple(g[0]) for g in got}) == len(jobs)


# -- handlers without a server --------------------------------------------------------------


def test_unavailable_models_shown_as_tiles(broken_checkpoints, files):
    eng = CamEngine.from_checkpoints(broken_checkpoints, device="cpu")
    gallery, rows, _ = run_compare(eng, files[0], [], OWN_TOP1, "gradcam", 0.5)
    caps = [c for _, c in gallery]
    assert caps[3].startswith("SGE · unavailable: ") and caps[5].startswith("BAM · unavailable: ")
    assert sum("unavailable" in c for c in caps) == 2
    assert rows[2][2].startswith("unavailable")


def test_model_table_shows_the_error_at_the_size_each_model_is_fed(engine, app_checkpoints,
                                                                  broken_checkpoints):
    from lgam.checkpoints import load_manifest

    rows = model_rows(engine)
    entry = load_manifest(app_checkpoints)["models"]["resnet18"]
    size = entry["input_size"]
    assert rows[0][:2] == ["ResNet18", "ok"] and rows[0][2] == "11.187"
    assert rows[0][4] == size and rows[0][5] == f"{entry['metrics'][f'val_top1_err_{size}']:.2f}"
    broken = {r[0]: r for r in model_rows(CamEngine.from_checkpoints(broken_checkpoints,
                                                                     device="cpu"))}
    assert broken["BAM"][1].startswith("unavailable: ") and broken["SE"][1] == "ok"


def test_no_checkpoints_page_says_how(tmp_path, files):
    eng = CamEngine.from_checkpoints(tmp_path / "nothing", device="cpu")
    with pytest.raises(gr.Error, match="No trained checkpoints"):
        run_compare(eng, files[0], [], OWN_TOP1, "gradcam", 0.5)
    demo = build_app(eng)
    texts = [c.get("props", {}).get("value") for c in demo.get_config_file()["components"]]
    assert any(isinstance(t, str) and "No models loaded" in t and "lgam train" in t for t in texts)


def test_examples_come_from_packages_and_folder(tmp_path):
    from app.ui import default_examples

    synthetic_image(1).save(tmp_path / "mine.jpg")
    (tmp_path / "notes.txt").write_text("x")
    ex = default_examples(tmp_path)
    assert ex[-1].endswith("mine.jpg") and not any(e.endswith(".txt") for e in ex)
    assert any("grace_hopper" in e for e in ex)  # shipped inside matplotlib
    for e in ex:
        assert load_image(e).mode == "RGB"


def test_flags():
    a = app.parse_args(["--checkpoints", "ck", "--device", "cuda", "--host", "0.0.0.0",
                        "--port", "1234"])
    assert (a.checkpoints, a.device, a.host, a.port) == ("ck", "cuda", "0.0.0.0", 1234)
