"""RQ-VAE pipeline data: the synthetic shapes set, its adherence checker, the captioned image
folder (jsonl, LAPIS-style csv) and the errors bad data gives."""

import json

import pytest
import torch

from tinykern.pipelines.rqvae import data as rqdata

PIL = pytest.importorskip("PIL.Image")


def write_image(path, colour=(200, 30, 30), size=(40, 30)):
    PIL.new("RGB", size, colour).save(path)


def test_synthetic_is_deterministic_and_captions_parse():
    ds = rqdata.SyntheticShapes(64, seed=3)
    a, cap_a = ds[5]
    b, cap_b = ds[5]
    assert torch.equal(a, b) and cap_a == cap_b and a.shape == (3, 64, 64)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    for i in range(50):
        scene, caption = ds.scene(i)
        assert not rqdata.is_held_out(caption)
        parsed = rqdata.parse_caption(caption)
        assert parsed["background"] == scene["background"] and parsed["relation"] == scene["relation"]
        assert [s["shape"] for s in parsed["shapes"]] == [s["shape"] for s in scene["shapes"]]


def test_heldout_prompts_are_fixed_and_held_out():
    prompts = rqdata.heldout_prompts(24)
    assert prompts == rqdata.heldout_prompts(24) and len(set(prompts)) == 24
    assert all(rqdata.is_held_out(p) for p in prompts)


def test_validation_prompts_are_held_out_and_disjoint_from_the_test_prompts():
    val = rqdata.validation_prompts()
    assert len(set(val)) == 22 and all(rqdata.is_held_out(p) for p in val)
    assert not set(val) & set(rqdata.heldout_prompts())


def test_heldout_prompts_refuses_more_than_are_held_out():
    with pytest.raises(ValueError, match="one-shape"):
        rqdata.heldout_prompts(48)


@pytest.mark.parametrize("resolution", [64, 256])
def test_checker_accepts_ground_truth_and_rejects_wrong_prompts(resolution):
    ds = rqdata.SyntheticShapes(resolution, seed=1, split="all")
    swap = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
    for i in range(40):
        image, caption = ds[i]
        assert rqdata.check_adherence(image, caption)["all"], caption
        scene = rqdata.parse_caption(caption)
        if scene["relation"]:
            wrong = caption.replace(f" {scene['relation']} ", f" {swap[scene['relation']]} ")
            assert not rqdata.check_adherence(image, wrong)["relation"], wrong
        other = next(b for b in rqdata.BACKGROUNDS if b != scene["background"])
        wrong = caption.replace(f"on a {scene['background']} background", f"on a {other} background")
        assert not rqdata.check_adherence(image, wrong)["all"], wrong


def _with_extra_shape(scene, colour):
    """The one-shape `scene` plus a small `colour` square in the corner farthest from its shape."""
    shape = scene["shapes"][0]
    corner = {"cx": 0.14 if shape["cx"] > 0.5 else 0.86, "cy": 0.14 if shape["cy"] > 0.5 else 0.86}
    return {**scene, "shapes": [shape, {"colour": colour, "shape": "square", "size": "small", **corner}]}


@pytest.mark.parametrize("resolution", [64, 256])
def test_checker_counts_an_extra_shape_as_a_miss(resolution):
    """A clean render of a one-shape caption passes; the same image with one more shape, of
    another colour or of the caption's own, fails on `extra` alone."""
    ds = rqdata.SyntheticShapes(resolution, seed=2, split="all")
    scenes = [scene for scene, _ in map(ds.scene, range(60)) if scene["relation"] is None][:6]
    assert len(scenes) == 6
    for scene in scenes:
        caption = rqdata.caption_of(scene)
        assert rqdata.check_adherence(rqdata.render(scene, resolution), caption)["all"], caption
        named = scene["shapes"][0]["colour"]
        other = next(c for c in rqdata.COLOURS if c not in (named, scene["background"]))
        for colour in (other, named):
            result = rqdata.check_adherence(rqdata.render(_with_extra_shape(scene, colour), resolution), caption)
            assert not result["extra"] and not result["all"], (caption, colour)
            assert result["background"] and result["relation"], (caption, colour)


def test_word_tokenizer():
    tok = rqdata.WordTokenizer.default()
    ids = tok(["a small red circle above a blue square on a yellow background", "a zebra"])
    assert ids.shape == (2, tok.max_length) and ids.dtype == torch.int64
    assert int((ids[0] == tok.UNK).sum()) == 0 and int(ids[1, 1]) == tok.UNK and int(ids[1, 2]) == tok.PAD


def test_folder_with_jsonl(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "b.jpg", (10, 200, 10), (30, 50))
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"file": "a.png", "caption": "red"}) + "\n" + json.dumps({"file": "sub/b.jpg", "caption": "green"}) + "\n")
    ds = rqdata.ImageFolderCaptions(tmp_path, resolution=16)
    assert len(ds) == 2
    images, captions = ds.batch([0, 1])
    assert images.shape == (2, 3, 16, 16) and captions == ["red", "green"]
    assert float(images[0, 0].mean()) > 0.7 and float(images[1, 1].mean()) > 0.7


def test_folder_with_lapis_style_csv(tmp_path):
    write_image(tmp_path / "0001.jpg")
    write_image(tmp_path / "0002.jpg")
    (tmp_path / "captions.csv").write_text(
        "image,artist,style,aesthetic_score,caption,year\n"
        "0001.jpg,anon,baroque,5.2,\"a dark portrait, oil\",1650\n"
        "0002.jpg,anon,impressionism,6.8,a garden,1890\n")
    ds = rqdata.ImageFolderCaptions(tmp_path, resolution=8)
    assert [c for _, c in ds.items] == ["a dark portrait, oil", "a garden"]


def test_empty_folder_error_names_it(tmp_path):
    with pytest.raises(ValueError, match=f"no images .* under {tmp_path}"):
        rqdata.ImageFolderCaptions(tmp_path)


def test_missing_caption_error_names_the_image(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "lonely.png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "red"}) + "\n")
    with pytest.raises(ValueError, match="lonely.png has no caption"):
        rqdata.ImageFolderCaptions(tmp_path)


def test_folder_with_a_text_file_per_image(tmp_path):
    """The common captioned-folder layout: img.png + img.txt, in subfolders too; a caption file
    record, where there is one, wins over the text file."""
    write_image(tmp_path / "img001.png")
    (tmp_path / "img001.txt").write_text("a red square\n")
    (tmp_path / "set2").mkdir()
    write_image(tmp_path / "set2" / "img002.jpg", (10, 200, 10))
    (tmp_path / "set2" / "img002.txt").write_text("a green field")
    ds = rqdata.ImageFolderCaptions(tmp_path, resolution=8)
    assert [c for _, c in ds.items] == ["a red square", "a green field"]
    images, _ = ds.batch([0, 1])
    assert float(images[0, 0].mean()) > 0.7 and float(images[1, 1].mean()) > 0.7
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "set2/img002.jpg", "caption": "from the file"}) + "\n")
    assert [c for _, c in rqdata.ImageFolderCaptions(tmp_path, resolution=8).items] == ["a red square", "from the file"]


def test_image_without_any_caption_names_it(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a.png has no caption: no a.txt beside it"):
        rqdata.ImageFolderCaptions(tmp_path)


def test_empty_or_unreadable_text_caption_names_it(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"caption file .*a.txt is empty"):
        rqdata.ImageFolderCaptions(tmp_path)
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe not utf-8 \xff")
    with pytest.raises(ValueError, match=r"cannot read caption file .*a.txt"):
        rqdata.ImageFolderCaptions(tmp_path)


def test_caption_file_that_is_not_utf8_or_not_records_names_it(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"cannot read caption file .*captions.jsonl"):
        rqdata.ImageFolderCaptions(tmp_path)
    (tmp_path / "captions.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"captions.jsonl line 1 is not a JSON object"):
        rqdata.ImageFolderCaptions(tmp_path)


def test_unreadable_image_error_names_the_file(tmp_path):
    """A file that is no image is refused when the folder is opened; an image whose body is cut
    short, when it is decoded."""
    write_image(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"file": "a.png", "caption": "red"}) + "\n" + json.dumps({"file": "broken.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        rqdata.ImageFolderCaptions(tmp_path, resolution=8)
    write_image(tmp_path / "broken.png", size=(64, 64))
    whole = (tmp_path / "broken.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(whole[: len(whole) // 2])
    ds = rqdata.ImageFolderCaptions(tmp_path, resolution=8)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        ds.batch([0, 1])
