"""The Gradio app end to end through ``gradio_client`` (launched on 127.0.0.1), plus the handlers."""
from __future__ import annotations

import base64
import io
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _helpers import CLASSES, REPO, SHARED_DATA, run_in_threads, synthetic_image
from test_imageio import _dds_with_unknown_fourcc

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from torch import nn  # noqa: E402

import app  # noqa: E402
from app.server import app_process, free_port  # noqa: E402
from app.ui import (  # noqa: E402
    DATA_URL_NAME, EXAMPLES_DIR, EXTRA_EXAMPLES, FIGURE_LABEL, IN_CLASS_EXAMPLES, INFO_LABEL, LOW_CONFIDENCE,
    MIN_AGREEMENT, OUT_OF_CLASS_EXAMPLES, OWN_TOP1, TILES_LABEL, TOP5_LABEL, build_app,
    classes_note, confidence_warning, default_examples, model_rows, run_compare, training_status,
)
from lgam.cam import CamError  # noqa: E402
from lgam.checkpoints import load_manifest  # noqa: E402
from lgam.data import read_classes_tsv  # noqa: E402
from lgam.engine import CamEngine, ImageComparison, ModelResult  # noqa: E402
from lgam.imageio import load_image  # noqa: E402

MAX_MB = 0.5  # the app under test refuses uploads over 0.5 MiB


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


def _gallery(tiles: dict) -> list[dict]:
    """The API's tiles as ``[{"caption": "title · caption", "image": JPEG bytes (a file object),
    "row": k}]``, decoding each data URL."""
    out = []
    for t in tiles["tiles"]:
        head, data = t["image"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        out.append({"caption": f"{t['title']} · {t['caption']}", "row": t["row"],
                    "image": io.BytesIO(base64.b64decode(data))})
    return out


def _compare(client, path, more=(), target=OWN_TOP1, method="gradcam", opacity=0.5):
    """``/compare`` through gradio_client: ``(tiles as :func:`_gallery`, top-5, info)``."""
    tiles, top5, info = client.predict(handle_file(path), [handle_file(m) for m in more], target,
                                       method, opacity, api_name="/compare")
    return _gallery(tiles), top5, info


def test_api_names_every_input_and_output_and_needs_only_an_image(client):
    eps = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(eps) == {"/compare", "/export"}  # the page's automatic runs are not endpoints
    compare, export = eps["/compare"]["parameters"], eps["/export"]["parameters"]
    assert [p["parameter_name"] for p in compare] == ["image", "more_images", "target", "method",
                                                       "opacity", "view", "stage"]
    assert [p["parameter_name"] for p in export] == [p["parameter_name"] for p in compare] + [
        "figure_format"]
    assert [p["parameter_has_default"] for p in export] == [False] + [True] * 7
    assert [p["parameter_default"] for p in export[2:]] == [
        OWN_TOP1, "gradcam", 0.5, "Grad-CAM", "last stage with gates", "png"]
    assert [r["label"] for r in eps["/compare"]["returns"]] == [TILES_LABEL, TOP5_LABEL,
                                                                INFO_LABEL]
    assert [r["label"] for r in eps["/export"]["returns"]] == [FIGURE_LABEL]
    labels = [x["label"] for e in eps.values() for x in e["parameters"] + e["returns"]]
    assert not any(re.fullmatch(r"(value|parameter)_\d+", str(lb)) for lb in labels), labels


def test_just_an_image_and_inputs_by_name(client, files):
    tiles, top5, info = client.predict(handle_file(files[0]), api_name="/compare")
    assert len(tiles["tiles"]) == 7 and len(top5["data"]) == 6 and "Device" in info
    tiles, _, _ = client.predict(handle_file(files[0]), target=CLASSES[2], opacity=0.3,
                                 api_name="/compare")
    assert all(t["caption"].startswith(f"{CLASSES[2]} · ") for t in tiles["tiles"][1:])
    path = client.predict(handle_file(files[0]), figure_format="pdf", api_name="/export")
    with open(path, "rb") as f:
        assert f.read(4) == b"%PDF"


API_EXAMPLE_MARKER = "<!-- api-example"


def readme_api_example() -> str:
    """The first ``python`` code block after the API-example marker in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert API_EXAMPLE_MARKER in text, "README.md lost its API example marker"
    block = re.compile(r"```python\n(.*?)```", re.S).search(text, text.index(API_EXAMPLE_MARKER))
    assert block, "no python code block after the API example marker"
    return block.group(1)


def test_readme_api_example_runs_verbatim(server, monkeypatch, tmp_path, capsys):
    code = readme_api_example()
    url = re.search(r'Client\("([^"]+)"', code).group(1)
    real_client = gradio_client.Client

    def client_of_the_test_server(src, *args, **kwargs):  # the README's address -> the fixture's
        assert src == url
        return real_client(server, *args, **kwargs)

    monkeypatch.setattr(gradio_client, "Client", client_of_the_test_server)
    monkeypatch.chdir(tmp_path)
    synthetic_image(21, (120, 90)).save(tmp_path / "photo.jpg")
    namespace: dict = {"__name__": "readme_api_example"}
    exec(compile(code, "README.md (API example)", "exec"), namespace)  # noqa: S102
    tiles = namespace["tiles"]["tiles"]
    assert len(tiles) == 7 and (tiles[0]["title"], tiles[0]["caption"]) == ("Input", "photo.jpg")
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == sorted(
        ["photo.jpg"] + [f"{t['title']}.jpg" for t in tiles])  # the example saved each tile
    assert "Device" in namespace["info"] and len(namespace["top5"]["data"]) == 6
    for name, magic in (("figure", b"\x89PNG"), ("pdf", b"%PDF")):
        with open(namespace[name], "rb") as f:
            assert f.read(4) == magic, name
    printed = capsys.readouterr().out
    assert all(f"{t['title']} · {t['caption']}" in printed for t in tiles)


def test_compare_matches_engine(client, engine, files):
    gallery, top5, info = _compare(client, files[0])
    assert len(gallery) == 7
    want = engine.compare(load_image(files[0]))[0]
    assert [g["caption"] for g in gallery] == ["Input · img0.png"] + [r.caption() for r in want.results]
    for g in gallery:
        with Image.open(g["image"]) as im:
            assert im.format == "JPEG" and im.size == (96, 80)  # the photo's own aspect
    # each tile is its caption's model's heatmap over the photo (JPEG error aside), not another's
    from lgam.cam import overlay

    photo = load_image(files[0])
    overlays = [np.asarray(overlay(photo, r.cam, 0.5), dtype=np.float32) for r in want.results]
    for k, g in enumerate(gallery[1:]):
        tile = np.asarray(Image.open(g["image"]).convert("RGB"), dtype=np.float32)
        gaps = [float(np.abs(tile - o).mean()) for o in overlays]
        assert gaps[k] < 8 and gaps[k] == min(gaps), (g["caption"], gaps)  # own ~3, others ~30-60
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


def test_uploads_and_the_temp_folder_are_not_served_inline(server, tmp_path):
    """An uploaded HTML file comes back as a download, not as a page on the app's site, and a file
    the app never gave out is refused (the temp folder was once allowed wholesale)."""
    import httpx

    up = httpx.post(server + "gradio_api/upload",
                    files={"files": ("evil.html", b"<script>alert(1)</script>", "text/html")})
    up.raise_for_status()
    got = httpx.get(server + "gradio_api/file=" + up.json()[0])
    assert got.status_code == 200 and got.headers.get("content-type", "") != "text/html"
    assert got.headers.get("content-disposition", "").startswith("attachment")
    secret = Path(tempfile.mkdtemp()) / "secret.txt"
    secret.write_text("not for the web")
    try:
        assert httpx.get(server + "gradio_api/file=" + str(secret)).status_code in (403, 404)
    finally:
        secret.unlink()


def test_the_precision_flag_reaches_the_engine(monkeypatch):
    """``--precision`` (and LGAM_PRECISION) once stopped at the argument parser."""
    import app.server as srv

    seen = {}

    def from_checkpoints(directory, **kw):
        seen.update(kw)
        raise srv.LgamError("stop here")

    monkeypatch.setattr(srv.CamEngine, "from_checkpoints", staticmethod(from_checkpoints))
    assert srv.main(["--checkpoints", "x", "--device", "cpu", "--precision", "float32"]) == 2
    assert seen == {"device": "cpu", "precision": "float32"}


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("pdf", b"%PDF")])
def test_export_figure(client, files, fmt, magic):
    path = client.predict(handle_file(files[0]), [handle_file(files[1])], OWN_TOP1, "gradcam",
                          0.5, figure_format=fmt, api_name="/export")
    with open(path, "rb") as f:
        assert f.read(4) == magic
    if fmt == "png":  # a row per image: the second image is in the figure
        one = client.predict(handle_file(files[0]), [], OWN_TOP1, "gradcam", 0.5, figure_format=fmt,
                             api_name="/export")
        with Image.open(path) as two_rows, Image.open(one) as one_row:
            assert two_rows.width == one_row.width and two_rows.height > 1.6 * one_row.height


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
        "texture.dds": (_dds_with_unknown_fourcc(), "cannot be decoded"),  # NotImplementedError
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


def test_user_errors_leave_no_traceback_in_the_log(client, files, tmp_path, capfd):
    dds = tmp_path / "texture.dds"
    dds.write_bytes(_dds_with_unknown_fourcc())
    mistakes = {
        "undecodable file": lambda: _compare(client, str(dds)),
        "no image": lambda: client.predict(None, api_name="/compare"),
        "unknown class": lambda: _compare(client, files[0], target="not a class"),
        "unknown method": lambda: _compare(client, files[0], method="magic"),
        "opacity out of range": lambda: _compare(client, files[0], opacity=2.0),
        "unknown format": lambda: client.predict(handle_file(files[0]), figure_format="gif",
                                                 api_name="/export"),
    }
    capfd.readouterr()
    for what, call in mistakes.items():
        with pytest.raises(AppError):
            call()
        out, err = capfd.readouterr()
        assert "Traceback" not in out + err, what
        assert "Something went wrong" not in out + err, what


def _data_url(data: bytes, head: str = "data:image/png;base64") -> str:
    return f"{head},{base64.b64encode(data).decode()}"


def test_an_image_sent_as_a_data_url_reaches_the_loader_as_it_is(files):
    """Gradio decoded a data: URL itself (no limits of ours) and re-encoded it as lossy WebP."""
    from types import SimpleNamespace

    from app.ui import raw_image

    comp, png = raw_image(), Path(files[0]).read_bytes()
    path = Path(comp.preprocess(SimpleNamespace(path=None, url=_data_url(png))))
    assert path.name == DATA_URL_NAME and path.read_bytes() == png
    for url, message in [(_data_url(png, "data:image/png"), "not base64-encoded"),
                         ("data:image/png;base64,!!!", "not valid base64")]:
        with pytest.raises(gr.Error, match=message):
            comp.preprocess(SimpleNamespace(path=None, url=url))


def test_a_data_url_image_is_size_checked_first_and_deleted_with_the_uploads(files):
    """An image sent as a data: URL was decoded and written whatever its size (Gradio's upload
    limit does not cover a request's JSON) and its file was never deleted: no component tracked
    it, and Gradio's delete_cache deletes only the files its components track."""
    from types import SimpleNamespace

    from gradio.route_utils import delete_files_created_by_app

    from app.ui import raw_image

    png = Path(files[0]).read_bytes()
    with gr.Blocks() as demo:
        comp, small = raw_image(), raw_image(max_bytes=len(png) - 3)
    with pytest.raises(gr.Error, match=r"data: URL holds \d+ bytes; the limit is \d+ bytes"):
        small.preprocess(SimpleNamespace(path=None, url=_data_url(png)))
    path = Path(comp.preprocess(SimpleNamespace(path=None, url=_data_url(png))))
    assert path.read_bytes() == png
    delete_files_created_by_app(demo, None)  # what delete_cache does once the file is old enough
    assert not path.exists()


def test_a_bad_data_url_is_answered_with_a_message_and_no_traceback(server, capfd):
    """A bad data: URL was answered with error null and a ComponentProcessingError traceback."""
    import json
    import urllib.request

    from app.ui import DEFAULT_STAGE, DEFAULT_VIEW

    for url, message in [("data:image/png;base64,!!!", "not valid base64"),
                         (_data_url(b"hello"), f"{DATA_URL_NAME} is not an image")]:
        image = {"url": url, "meta": {"_type": "gradio.FileData"}}
        payload = {"data": [image, [], OWN_TOP1, "gradcam", 0.5, DEFAULT_VIEW, DEFAULT_STAGE]}
        request = urllib.request.Request(server + "gradio_api/call/compare", json.dumps(payload).encode(),
                                         {"Content-Type": "application/json"})
        event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
        answer = urllib.request.urlopen(f"{server}gradio_api/call/compare/{event}", timeout=60).read().decode()
        assert "event: error" in answer and message in answer, answer
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_more_images_are_judged_by_their_bytes_not_their_extension(client, files, tmp_path):
    """Gradio's file_types filter refused an extensionless photo (IMG_0001) with a traceback in
    the log; the app's loader reads it, and names a real non-image."""
    photo = tmp_path / "IMG_0001"
    photo.write_bytes(Path(files[1]).read_bytes())
    gallery, _, _ = _compare(client, files[0], more=[str(photo)])
    assert len(gallery) == 14 and gallery[7]["caption"] == "Input · IMG_0001"
    note = tmp_path / "notes.jpg"
    note.write_text("not a photo")
    with pytest.raises(AppError, match="notes.jpg"):
        _compare(client, files[0], more=[str(note)])


def test_scorecam_takes_one_image_at_a_time_on_a_cpu(engine, files, tmp_path):
    """ScoreCAM takes minutes an image and model on a CPU: eight images would take an hour. The
    check comes before any file is read (it once decoded all eight first)."""
    never_read = tmp_path / "never_read.png"  # not an image: reading it would say so instead
    never_read.write_text("not an image")
    with pytest.raises(gr.Error, match="one image at a time"):
        run_compare(engine, files[0], [str(never_read)], method="scorecam")


def test_a_second_scorecam_on_a_cpu_is_answered_at_once(engine, files):
    """One ScoreCAM runs at a time on a CPU; another waited minutes in the queue for it."""
    from app import ui

    assert ui._SLOW_RUN.acquire(blocking=False)  # a ScoreCAM request is running
    try:
        with pytest.raises(gr.Error, match="scorecam is already running for another request"):
            run_compare(engine, files[0], method="scorecam")
    finally:
        ui._SLOW_RUN.release()
    with pytest.raises(gr.Error, match="one image at a time"):
        run_compare(engine, files[0], [files[1]], method="scorecam")
    assert ui._SLOW_RUN.acquire(blocking=False)  # a refused request does not keep it
    ui._SLOW_RUN.release()


def test_scorecam_draws_no_progress_bars_in_the_server_log(engine, files, monkeypatch, capfd):
    """pytorch-grad-cam's ScoreCAM drew a tqdm bar per image and model into the server's log."""
    import pytorch_grad_cam.score_cam as score_cam

    monkeypatch.setattr(score_cam, "tqdm", score_cam.tqdm)  # put back after the test

    def compare(*args, **kwargs):  # the bar ScoreCAM draws, without its minutes of work
        for _ in score_cam.tqdm.tqdm(range(3)):
            pass
        raise CamError("stopped here")

    monkeypatch.setattr(engine, "compare", compare)
    capfd.readouterr()
    with pytest.raises(gr.Error, match="stopped here"):
        run_compare(engine, files[0], method="scorecam")
    out, err = capfd.readouterr()
    assert "3/3" not in out + err, err


def test_too_many_images_are_refused_and_the_page_says_the_limit_first(engine, files):
    """Gradio's File takes any number of files: the run refuses past ``max_images`` (the main image
    included) before decoding any, and the "More images" label says the limit before the upload."""
    with pytest.raises(gr.Error) as raised:
        run_compare(engine, files[0], files[1:3], max_images=2)
    assert raised.value.message == "At most 2 images at once, got 3."
    _, rows, _ = run_compare(engine, files[0], files[1:2], max_images=2)
    assert len(rows) == 2 * 6
    demo = build_app(engine, max_images=3)
    more = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "more-images")
    assert more.label == "More images (one row each; at most 3 images in all)"


def test_a_file_name_is_shown_as_it_is_not_as_markdown(engine, tmp_path):
    """Uploaded names went into the run info's Markdown raw: a name could render as a link."""
    from app.ui import page_or_cleared

    bad = tmp_path / "[click](example.com) *me* <b>.png"
    bad.write_text("not an image")
    _, _, info = page_or_cleared(engine, str(bad), None)
    assert r"\[click\](example.com) \*me\* \<b\>.png is not an image" in info


def test_a_file_name_is_not_linked_by_gfm_itself():
    """Gradio's Markdown (marked, GFM) links www.*, e-mail addresses and scheme:// on its own, even
    mid-word: www.example.com.jpg showed as a link to it. One escaped character stops it (checked
    against marked 15: each of these renders as the plain name)."""
    from app.ui import markdown_text

    assert markdown_text("www.example.com.jpg") == r"www\.example.com.jpg"
    assert markdown_text("photoWWW.Shop.org (1).png") == r"photoWWW\.Shop.org (1).png"
    assert markdown_text("me@example.com.png") == r"me\@example.com.png"
    assert markdown_text("see https://x.org or FTP://y") == r"see https\://x.org or FTP\://y"
    assert markdown_text("holiday 12:30.jpg") == "holiday 12:30.jpg"  # a colon alone links nothing


def test_a_file_name_is_escaped_in_the_run_info_only(engine, tmp_path, monkeypatch):
    """The Markdown-escaped name went into the toast and the API's error too, where it is not
    Markdown: a camera's IMG_0001.HEIC showed as IMG\\_0001.HEIC."""
    from app import ui

    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic")
    toasts = []
    monkeypatch.setattr(ui.gr, "Warning", toasts.append)
    _, _, info = ui.page_or_cleared(engine, str(heic), None)
    assert toasts == [toasts[0]] and toasts[0].startswith("Cannot use this file: IMG_0001.HEIC is a HEIC")
    assert info.startswith(r"⚠ Cannot use this file: IMG\_0001.HEIC is a HEIC")
    with pytest.raises(gr.Error) as raised:
        run_compare(engine, str(heic))
    assert raised.value.message == toasts[0]


def test_an_upload_deleted_from_the_cache_is_said_to_be_gone(engine, tmp_path):
    """A page left open past delete_cache's hour sent a deleted upload's path on its next event:
    the person was told their own photo was "no such file"."""
    gone = tmp_path / "holiday_photo.jpg"
    with pytest.raises(gr.Error, match="holiday_photo.jpg is no longer on the server "
                                       r"\(uploads are deleted after 60 minutes\): add it again"):
        run_compare(engine, str(gone))


def test_a_failure_while_encoding_the_tiles_is_reported_not_raised(engine, files, monkeypatch):
    """The tiles were encoded outside the guard: an encoder error reached Gradio as a traceback."""
    import app.ui

    def broken(*args, **kwargs):
        raise RuntimeError("encoder broke")

    for handler, encoder in ((run_compare, "tiles_data"), (app.ui.run_page, "tiles_html")):
        monkeypatch.setattr(app.ui, encoder, broken)
        with pytest.raises(gr.Error, match="Something went wrong: RuntimeError: encoder broke"):
            handler(engine, files[0])


def test_a_failed_page_run_clears_the_previous_results(engine, files, tmp_path):
    """The grid once kept the previous image's heatmaps beside a new file that failed."""
    from app.ui import page_or_cleared

    grid, top5, _ = page_or_cleared(engine, files[0], None)
    assert "<img" in grid and top5
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    grid, top5, info = page_or_cleared(engine, str(bad), None)
    assert grid == "" and top5 == [] and info.startswith("⚠ Cannot use this file") and "broken.png" in info
    assert page_or_cleared(engine, None, None) == ("", [], "")


def test_export_folders_do_not_pile_up(monkeypatch, tmp_path):
    import app.ui as ui

    monkeypatch.setattr(ui.tempfile, "gettempdir", lambda: str(tmp_path))
    root = ui._export_root()
    stale, fresh = root / "lgam_fig5_old", root / "lgam_fig5_new"
    for d in (stale, fresh):
        d.mkdir()
        (d / "figure5.png").write_bytes(b"x")
    os.utime(stale, (0, time.time() - ui.EXPORT_KEEP_S - 60))
    assert ui._export_root() == root
    assert not stale.exists() and fresh.exists()


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


@pytest.mark.slow
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
    # different jobs really got different heatmaps (not one shared result; the captions differ
    # anyway, each naming its file)
    assert len({g[2][1].tobytes() for g in got}) == len(jobs)


@pytest.mark.parametrize("cpu_max, want", [("200000 100000\n", 2), ("150000 100000", 2),
                                           ("50000 100000", 1), ("max 100000", None), ("", None),
                                           (None, None)])
def test_cpu_quota_read_from_the_cgroup(tmp_path, cpu_max, want):
    from app.server import cpu_quota

    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    assert cpu_quota(tmp_path) == want


def test_threads_follow_the_cpu_quota_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    """torch sized its pool by the host's cores under a 2-CPU container quota."""
    import torch

    from app.server import limit_threads_to_cpu_quota

    (tmp_path / "cpu.max").write_text("100000 100000")
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert limit_threads_to_cpu_quota(tmp_path) is None and torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        got = limit_threads_to_cpu_quota(tmp_path)
        assert torch.get_num_threads() == 1 and got == (1 if before > 1 else None)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.slow
def test_malloc_arenas_capped_unless_the_environment_says_otherwise():
    code = "from app.server import limit_malloc_arenas as f; print(f())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout.strip()
    assert run(env) == "True"
    assert run({**env, "MALLOC_ARENA_MAX": "4"}) == "False"


@pytest.fixture(scope="module")
def server_process(app_checkpoints):
    """``python -m app`` in its own process, as deployed: its pid and URL."""
    with app_process(["--checkpoints", str(app_checkpoints), "--device", "cpu",
                      "--precision", "float32"]) as (proc, url):
        yield proc.pid, url


@pytest.mark.slow
def test_sixteen_clients_eleven_rounds_of_the_same_photo(server_process, files):
    """Many users clicking the same example: every answer complete and equal to a sequential
    one (no file rewritten while another request streams it). The server's memory over the same
    load is a number, not a threshold a busy machine could break: benchmarks/app_memory.py."""
    _, url = server_process
    clients = [Client(url, verbose=False) for _ in range(16)]
    want = _tiles(_compare(clients[0], files[1]))
    got: list = [[] for _ in clients]
    for _ in range(11):  # rounds in lock-step: 16 concurrent requests
        errors = run_in_threads(lambda i: got[i].append(_tiles(_compare(clients[i], files[1]))),
                                len(clients), timeout=600)
        assert not errors, errors[:3]
    for answers in got:
        assert len(answers) == 11
        for g in answers:
            assert g[0] == want[0] and [r[:7] for r in g[1]] == [r[:7] for r in want[1]]
            assert all(x.shape == y.shape and np.abs(x - y).max() <= 1 for x, y in zip(g[2], want[2]))


# -- handlers without a server --------------------------------------------------------------


def test_unavailable_models_shown_as_tiles(broken_checkpoints, files):
    eng = CamEngine.from_checkpoints(broken_checkpoints, device="cpu")
    tiles, rows, _ = run_compare(eng, files[0], [], OWN_TOP1, "gradcam", 0.5)
    caps = [f"{t['title']} · {t['caption']}" for t in tiles["tiles"]]
    assert caps[3].startswith("SGE · unavailable: ") and caps[5].startswith("BAM · unavailable: ")
    assert sum("unavailable" in c for c in caps) == 2
    assert rows[2][2].startswith("unavailable")


def test_model_table_shows_the_error_at_the_size_each_model_is_fed(engine, app_checkpoints,
                                                                  broken_checkpoints):
    rows = model_rows(engine)
    entry = load_manifest(app_checkpoints)["models"]["resnet18"]
    size = entry["input_size"]
    assert rows[0][:2] == ["ResNet18", "trained (epochs not recorded)"] and rows[0][2] == "11.187"
    assert rows[0][4] == size and rows[0][5] == f"{entry['metrics'][f'val_top1_err_{size}']:.2f}"
    # the fixture's errors are 95.0 at every size: here 160 and 224 differ, and the table is fed 160
    fed = CamEngine({"resnet18": engine.model("resnet18")}, engine.classes, device="cpu", entries={
        "resnet18": {"input_size": 160, "metrics": {"val_top1_err_160": 22.55, "val_top1_err_224": 28.98}}})
    assert model_rows(fed)[0][4:6] == [160, "22.55"]
    assert rows[0][6] == "—"  # the fixture's manifest does not say on how many images
    broken = {r[0]: r for r in model_rows(CamEngine.from_checkpoints(broken_checkpoints,
                                                                     device="cpu"))}
    assert broken["BAM"][1].startswith("unavailable: ") and broken["SE"][1].startswith("trained")


def _status_engine() -> CamEngine:
    """Two loaded stand-in models (no weights to load) with manifest entries, one unavailable."""
    entries = {
        "resnet18": {"epochs": 20, "input_size": 160, "metrics": {
            "params": 11_186_772, "val_top1_err_160": 22.55, "val_top1_err_224": 28.98,
            "val_images": 7854}},
        "resnet18_se": {"epochs": 1, "metrics": {"val_top1_err_224": 50.0, "val_images": 200}},
    }
    models = {"resnet18": nn.Identity(), "resnet18_se": nn.Identity(),
              "resnet18_lgam": "not in the checkpoint manifest"}
    return CamEngine(models, CLASSES, device="cpu", entries=entries)


def test_training_status_from_the_manifest_entry():
    eng = _status_engine()
    assert training_status(eng, "resnet18") == "trained 20 epochs"
    assert training_status(eng, "resnet18_se") == "trained 1 epoch"
    assert training_status(eng, "resnet18_lgam") == "unavailable: not in the checkpoint manifest"
    rows = {r[0]: r for r in model_rows(eng)}
    assert rows["ResNet18"] == ["ResNet18", "trained 20 epochs", "11.187", "—", 160, "22.55",
                                "7,854", "28.98"]
    assert rows["SE"][4:7] == [224, "50.00", "200"]  # the error at the size it is fed: 224


def test_page_lists_the_classes_and_each_models_training():
    note = classes_note(CLASSES)
    assert f"know {len(CLASSES)} classes" in note and all(c in note for c in CLASSES)
    config = build_app(_status_engine()).get_config_file()
    texts = [str(c.get("props", {}).get("value")) for c in config["components"]]
    assert any(classes_note(CLASSES) in t for t in texts)
    assert any("trained 20 epochs" in t and "7,854" in t for t in texts)  # the model table


def _comparison(*tops: tuple[str, float] | None) -> ImageComparison:
    results = [ModelResult(f"m{i}", f"M{i}", error="unavailable") if t is None
               else ModelResult(f"m{i}", f"M{i}", top5=[t]) for i, t in enumerate(tops)]
    return ImageComparison(Image.new("RGB", (4, 4)), results, "gradcam", "cpu")


@pytest.mark.parametrize("size", [(10, 10_000), (10_000, 10), (3, 60), (600, 400), (5, 5)])
def test_page_tiles_keep_a_readable_shape(size):
    """A 10 x 10,000 strip made 1 x 448 tiles that the grid drew ~90,000 px tall (and its
    transpose tiles under a pixel high): tiles are squeezed to at most 4:1, as Figure 5's are;
    ordinary photos keep their shape."""
    from app import render
    from lgam.figure import MAX_TILE_ASPECT

    result = ModelResult("m", "M", target_class="tench", score=0.9, cam=np.ones((7, 7), np.float32))
    comp = ImageComparison(Image.new("RGB", size, (90, 20, 20)), [result], "gradcam", "cpu")
    tiles = render.tiles_for(comp, "x.png", 0.5, "cam")[0]
    for t in tiles:
        w, h = t.image.size
        assert max(w, h) <= render.TILE_PX and max(w / h, h / w) <= MAX_TILE_ASPECT + 0.01, t.image.size
    w, h = size
    if max(w / h, h / w) <= MAX_TILE_ASPECT:
        shown = size if max(size) <= render.TILE_PX else (render.TILE_PX, round(render.TILE_PX * h / w))
        assert tiles[0].image.size == shown


def test_page_captions_say_when_a_map_is_the_same_for_every_class():
    from app import render

    result = ModelResult("m", "M", target_class="tench", score=0.9, cam=np.ones((7, 7), np.float32))
    for method, caption in [("gradcam", "tench · 0.90"), ("eigencam", "tench · 0.90 · map not class-specific")]:
        comp = ImageComparison(Image.new("RGB", (32, 32)), [result], method, "cpu")
        assert render.tiles_for(comp, "x.png", 0.5, "cam")[0][1].caption == caption


def test_confidence_warning():
    sure = [("tench", 0.9)] * 5 + [("church", 0.8)]  # one dissenting model is normal
    assert confidence_warning(_comparison(*sure), 20) is None
    low = confidence_warning(_comparison(*[("tench", 0.3)] * 6), 20)
    assert low.startswith("⚠ low confidence: mean top-1 probability 0.30 < 0.5")
    assert low.endswith("this photo may show none of the 20 classes")
    split = confidence_warning(_comparison(*[("tench", 0.9)] * 3, *[("church", 0.9)] * 3), 20)
    assert "the models disagree (2 different top-1 classes among 6 models)" in split
    assert "probability" not in split
    both = confidence_warning(_comparison(("tench", 0.2), ("church", 0.3)), 20)
    assert "probability 0.25" in both and "disagree" in both
    # unavailable models do not count; one model cannot disagree with itself
    assert confidence_warning(_comparison(("tench", 0.9), None, None), 20) is None
    assert confidence_warning(_comparison(None, None), 20) is None
    assert 0 < LOW_CONFIDENCE < 1 and 0 < MIN_AGREEMENT < 1


def test_info_line_warns_per_image(engine, files):
    _, _, info = run_compare(engine, files[0], [files[1]], OWN_TOP1, "gradcam", 0.5)
    comps = engine.compare([load_image(f) for f in files[:2]])
    warnings = [confidence_warning(c, len(engine.classes)) for c in comps]
    paragraphs = info.split("\n\n")
    assert paragraphs[:-1] == [f"{w} ({Path(f).name})" for w, f in zip(warnings, files) if w]
    assert paragraphs[-1].startswith("**Device:**")


def test_the_gate_stage_says_which_views_use_it(engine):
    """Choosing a gate stage in the Grad-CAM view did nothing, and the page did not say so."""
    demo = build_app(engine)
    stage = next(c for c in demo.blocks.values() if getattr(c, "label", None) == "Gate stage")
    assert stage.info == "used when Show is 'attention gates' or 'both'"


def test_the_show_radio_names_the_cam_method_it_draws(engine):
    """Show said "Grad-CAM" while Score-CAM was drawn. Its label follows the method; its value stays
    "Grad-CAM", the API's."""
    from app.render import VIEWS
    from app.ui import view_choices

    demo = build_app(engine)
    comps = dict(demo.blocks.items())
    view = next(c for c in comps.values() if getattr(c, "elem_id", None) == "view")
    method_id = next(i for i, c in comps.items() if getattr(c, "label", None) == "CAM method")
    assert view.choices == [("Grad-CAM", "Grad-CAM"), ("attention gates", "attention gates"), ("both", "both")]
    relabel = next(f for f in demo.fns.values() if (method_id, "change") in f.targets)
    assert [o._id for o in relabel.outputs] == [view._id] and relabel.api_visibility == "private"
    assert relabel.fn("scorecam").choices == [("Score-CAM", "Grad-CAM"), ("attention gates", "attention gates"),
                                             ("both", "both")]
    assert [v for _, v in view_choices("eigencam")] == list(VIEWS)  # the values: the API's views
    assert view_choices("no-such-method")[0] == ("Grad-CAM", "Grad-CAM")


def test_runs_on_new_input_and_example_click(engine, files):
    demo = build_app(engine, examples=[files[0]])
    fns = list(demo.fns.values())
    public = sorted(f.api_name for f in fns if f.api_visibility == "public")
    assert public == ["compare", "export"]  # one API name per endpoint
    comps = dict(demo.blocks.items())
    image_id = next(i for i, c in comps.items() if getattr(c, "elem_id", None) == "input-image")
    files_id = next(i for i, c in comps.items() if getattr(c, "elem_id", None) == "more-images")
    view_id = next(i for i, c in comps.items() if getattr(c, "elem_id", None) == "view")
    auto = [f for f in fns if any(event == "change" for _, event in f.targets)
            and [o._id for o in f.outputs] != [view_id]]  # not the Show radio's relabelling
    assert sorted(i for f in auto for i, _ in f.targets) == sorted([image_id, files_id, view_id])
    assert all(f.api_visibility == "private" and f.trigger_mode == "always_last" for f in auto)
    cam = [f for f in fns if f.fn is not None and f.name != "load_example" and [o._id for o in f.outputs] != [view_id]]
    assert {f.concurrency_id for f in cam} == {"cam"}  # button, automatic runs, export: one limit
    # an example click only fills the image (whose change then runs the comparison): no 2nd run
    example = next(f for f in fns if f.name == "load_example")
    assert [o._id for o in example.outputs] == [image_id]
    run = auto[0].fn
    settings = (OWN_TOP1, "gradcam", 0.5, "Grad-CAM", "last stage with gates")
    html, rows, info = run(files[0], None, *settings)
    assert html.count("<figure>") == 7 and len(rows) == 6 and "Device" in info
    assert run(None, [], *settings) == ("", [], "")  # cleared: results cleared
    html, _, _ = run(None, [files[1]], *settings)
    assert f"<b>Input</b>{Path(files[1]).name}</figcaption>" in html


def test_page_grid_views(engine, files):
    """The page's grid: captions are text (never cut), one figure per tile, gates on demand."""
    from app.ui import run_page

    html, _, _ = run_page(engine, files[0])
    assert html.count("<figure>") == 7 and html.count("data:image/jpeg;base64,") == 7
    assert "SE</b>" in html and "· 0." in html and "<style>" in html
    # a colour key under the grid: the overlays' colormap from 0 (dark blue) to 1 (dark red)
    assert 'class="lgam-scale">0<span class="bar"' in html and "#000080" in html and "#800000" in html
    assert "· CAM, each map min-max scaled to 0-1</span>" in html
    html, _, info = run_page(engine, files[0], view="attention gates", stage="stage 3")
    assert "· gate value (what the module multiplies by)</span>" in html
    assert "<b>LGAM</b>gate, stage 3 · layer3.1</figcaption>" in html
    assert "<b>ResNet18</b>no attention module</figcaption>" in html
    assert "What the gate maps are" in info and "eqs (5)-(6)" in info
    html, _, _ = run_page(engine, files[0], [files[1]], view="both")
    assert html.count("<figure>") == 4 * 7 and html.count("lgam-row-title") >= 2
    with pytest.raises(gr.Error, match="View must be one of"):
        run_page(engine, files[0], view="heat")
    with pytest.raises(gr.Error, match="Gate stage must be one of"):
        run_page(engine, files[0], stage="stage 9")


def test_startup_summary(engine, broken_checkpoints, monkeypatch, capsys):
    line = app.startup_summary(engine)
    assert line.startswith("lgam app: 6/6 models loaded · device cpu") and "\n" not in line
    assert line.endswith("· precision float32")
    broken = app.startup_summary(CamEngine.from_checkpoints(broken_checkpoints, device="cpu"))
    assert "4/6 models loaded (unavailable: SGE, BAM)" in broken
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: None)
    app.launch(app.parse_args(["--device", "cpu"]), engine=engine)
    assert capsys.readouterr().out.splitlines()[-1] == line


def test_no_checkpoints_page_says_how(tmp_path, files):
    eng = CamEngine.from_checkpoints(tmp_path / "nothing", device="cpu")
    with pytest.raises(gr.Error, match="No trained checkpoints"):
        run_compare(eng, files[0], [], OWN_TOP1, "gradcam", 0.5)
    from app.ui import page_or_cleared

    _, _, info = page_or_cleared(eng, files[0], None)  # its commands as code, not escaped backticks
    assert "`lgam train`" in info and "\\`" not in info
    demo = build_app(eng)
    texts = [c.get("props", {}).get("value") for c in demo.get_config_file()["components"]]
    assert any(isinstance(t, str) and "No models loaded" in t and "lgam train" in t for t in texts)


def _source_rows() -> list[list[str]]:
    """The table of app/examples/SOURCES.md: ``[file, class, wnid, original file]`` per image."""
    text = (EXAMPLES_DIR / "SOURCES.md").read_text()
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in text.splitlines() if ln.startswith("|")]
    assert rows[0] == ["file", "class", "wnid", "original file (ImageNet-20 val)"]
    return rows[2:]


def test_examples_in_class_first_then_out_of_class_then_a_folder(tmp_path):
    synthetic_image(1).save(tmp_path / "mine.jpg")
    (tmp_path / "notes.txt").write_text("x")
    ex = default_examples(tmp_path)
    assert list(ex) == [IN_CLASS_EXAMPLES, OUT_OF_CLASS_EXAMPLES, EXTRA_EXAMPLES]
    assert [Path(e).name for e in ex[EXTRA_EXAMPLES]] == ["mine.jpg"]  # no .txt
    assert any("grace_hopper" in e for e in ex[OUT_OF_CLASS_EXAMPLES])  # shipped in matplotlib
    assert list(default_examples()) == [IN_CLASS_EXAMPLES, OUT_OF_CLASS_EXAMPLES]
    for e in (e for paths in ex.values() for e in paths):
        assert load_image(e).mode == "RGB"


def test_shipped_examples_are_small_val_images_with_their_source_named():
    """At most six ImageNet val images of the models' classes, at most 224 px, each listed in
    SOURCES.md with its class, wnid and original file; nothing else in the folder."""
    shipped = default_examples()[IN_CLASS_EXAMPLES]
    rows = _source_rows()
    assert [Path(e).name for e in shipped] == [r[0] for r in rows] and 1 <= len(rows) <= 6
    assert sorted(p.name for p in EXAMPLES_DIR.iterdir()) == sorted([r[0] for r in rows]
                                                                    + ["SOURCES.md"])
    text = (EXAMPLES_DIR / "SOURCES.md").read_text()
    assert "ImageNet" in text and "Imagenette" in text and "lgam.data sample" in text
    classes = next(iter(load_manifest(REPO / "checkpoints")["models"].values()))["classes"]
    tsv = SHARED_DATA / "imagenet20" / "classes.tsv"
    by_wnid = dict(zip(*read_classes_tsv(tsv))) if tsv.is_file() else {}
    for path, (name, cls, wnid, original) in zip(shipped, rows):
        with Image.open(path) as im:
            assert im.format == "JPEG" and max(im.size) <= 224, (name, im.size)
        assert Path(path).stat().st_size < 64 * 1024, name
        assert cls in classes and original == f"val/{wnid}/{Path(original).name}", name
        assert name.split("_", 1)[1].removesuffix(".jpg") == "".join(
            ch if ch.isalnum() else "_" for ch in cls)  # as lgam.data.sample names it
        if by_wnid:
            assert by_wnid[wnid] == cls, name


def test_page_opens_on_the_first_example_compared(engine, files):
    """The first view is a finished comparison of the first example: its image in the input,
    its grid, top-5 table and run info as the page's handler gives them; the groups of
    examples follow in order."""
    from app.ui import FIRST_VIEW_NOTE, run_page

    demo = build_app(engine, {"in class": [files[0]], "out of class": [files[1], files[2]]})
    components = demo.get_config_file()["components"]
    props = {c["props"].get("elem_id"): c["props"] for c in components}
    assert props["input-image"]["value"]["orig_name"] == Path(files[0]).name
    grid, top5, info = run_page(engine, files[0])
    assert props["results"]["value"] == grid and grid.count("<figure>") == 7
    assert f"<b>Input</b>{Path(files[0]).name}</figcaption>" in grid
    note, shown_info = props["run-info"]["value"].split("\n\n", 1)
    assert note == FIRST_VIEW_NOTE.format(name=Path(files[0]).name)
    assert shown_info.split("total")[0] == info.split("total")[0]  # the same, up to its times
    table = next(c["props"] for c in components
                 if c["type"] == "dataframe" and c["props"].get("label") == TOP5_LABEL)
    assert [r[:7] for r in table["value"]["data"]] == [r[:7] for r in top5] and len(top5) == 6
    examples = [(c["props"]["label"], len(c["props"]["samples"])) for c in components
                if c["type"] == "dataset"]
    assert examples == [("in class", 1), ("out of class", 2)]
    # the page's Export exports the page's image; the API's endpoints take their own, which has
    # no initial value (else the first example would become their default image)
    fns = {f.api_name: f for f in demo.fns.values()}
    assert fns["page_export"].inputs[0] is fns["page"].inputs[0]
    assert fns["page"].inputs[0].elem_id == "input-image"
    for name in ("compare", "export"):
        image = fns[name].inputs[0]
        assert not image.visible and image.value is None and image.label == "Image"


def test_first_view_is_empty_without_models_or_a_readable_example(engine, tmp_path, files,
                                                                   caplog):
    """No models, no example or an unreadable one: the page still starts, on an empty view."""
    from app.ui import first_view

    no_models = CamEngine.from_checkpoints(tmp_path / "nothing", device="cpu")
    assert first_view(no_models, files[0]) is None and first_view(engine, None) is None
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert first_view(engine, str(bad)) is None
    assert "no first view: bad.png: Cannot use this file" in caplog.text
    for eng, examples in ((no_models, [files[0]]), (engine, [str(bad), files[0]])):
        props = {c.get("props", {}).get("elem_id"): c["props"]
                 for c in build_app(eng, examples).get_config_file()["components"]}
        assert props["input-image"].get("value") is None and not props["results"].get("value")


def test_flags():
    a = app.parse_args(["--checkpoints", "ck", "--device", "cuda", "--host", "0.0.0.0",
                        "--port", "1234"])
    assert (a.checkpoints, a.device, a.host, a.port) == ("ck", "cuda", "0.0.0.0", 1234)


@pytest.mark.parametrize("flag,value", [("--concurrency", "0"), ("--concurrency", "-2"),
                                        ("--max-mb", "0"), ("--max-megapixels", "-1"),
                                        ("--max-mb", "nan"), ("--port", "http")])
def test_flags_that_cannot_work_are_refused(flag, value, capsys):
    """--concurrency 0 queued every request forever (Gradio starts an event only while fewer
    than the limit run); zero or negative size limits refused every upload."""
    with pytest.raises(SystemExit) as e:
        app.parse_args([flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_a_bad_port_variable_is_a_usage_error_and_a_flag_overrides_it(monkeypatch, capsys):
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    assert app.parse_args(["--port", "1234"]).port == 1234
    with pytest.raises(SystemExit):
        app.parse_args([])
    assert "--port" in capsys.readouterr().err
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7000")
    assert app.parse_args([]).port == 7000


def test_api_tiles_are_jpeg_data_urls_row_by_row():
    """The API answers with the tiles themselves (no files to download or to pile up)."""
    from app import render

    rows = [[render.Tile(Image.new("RGB", (8, 6), (200, 10, 10)), "Input", "a.png"),
             render.Tile(Image.new("RGB", (8, 6)), "LGAM", "tench · 0.90")],
            [render.Tile(Image.new("RGB", (8, 6)), "Input", "b.png")]]
    got = _gallery(render.tiles_data(rows))
    assert [(g["row"], g["caption"]) for g in got] == [
        (0, "Input · a.png"), (0, "LGAM · tench · 0.90"), (1, "Input · b.png")]
    with Image.open(got[0]["image"]) as im:
        assert im.format == "JPEG" and im.size == (8, 6) and im.getpixel((4, 3))[0] > 150

def test_uploads_are_kept_small_once_the_models_inputs_are_made(engine, tmp_path):
    """Eight 50-MP uploads decoded and held for one request took ~1.2 GB: each is prepared for the
    models as it is read and only a copy of at most SHOWN_PX a side is kept; the page's tiles are
    the ones the full image gives."""
    from app.render import tiles_data, tiles_for
    from app.ui import SHOWN_PX, _load_inputs
    from lgam.engine import PreparedImage

    paths = []
    for i, size in enumerate([(1400, 1000), (300, 200)]):
        paths.append(tmp_path / f"photo{i}.png")
        synthetic_image(80 + i, size).save(paths[-1])
    imgs, names = _load_inputs(engine, [str(paths[0]), str(paths[1])], 2**25, 10**8)
    assert names == ["photo0.png", "photo1.png"] and all(isinstance(p, PreparedImage) for p in imgs)
    assert max(imgs[0].image.size) == SHOWN_PX and imgs[1].image.size == (300, 200)
    full = load_image(paths[0])
    page = tiles_data(tiles_for(engine.compare(imgs[0])[0], "photo0.png", 0.5, "cam"))
    assert page == tiles_data(tiles_for(engine.compare(full)[0], "photo0.png", 0.5, "cam"))
