"""Image modes, EXIF orientation and caption handling, the same in training, evaluation and the teacher view."""

from __future__ import annotations

import io
import shutil

import pytest
import torch
from PIL import Image, ImageOps
from train_helpers import one_thread  # noqa: F401

from dinorankclip.config import load_config
from dinorankclip.data.csv_dataset import CaptionDataset
from dinorankclip.data.images import BACKGROUND, decode_image, load_image, to_rgb
from dinorankclip.data.shards import CaptionSpec, RawRecord
from dinorankclip.data.transforms import PairedViews
from dinorankclip.data.wds import SampleDecoder
from dinorankclip.eval.features import Encoder
from dinorankclip.eval.runner import CaptionedImages
from dinorankclip.models.dinorankclip import build_model
from dinorankclip.models.trunk import TrunkSpec, build_tokenizer

WHITE = BACKGROUND


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    return [image.getpixel((x, 0)) for x in range(image.width)]


def _close(got, expected, tol=1):
    return all(abs(g - e) <= tol for pg, pe in zip(got, expected, strict=True) for g, e in zip(pg, pe, strict=True))


def _rgba():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 255, 0, 128)])
    return image, [WHITE, (0, 0, 255), (127, 255, 127)]


def _la():
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (100, 255)])
    return image, [WHITE, (100, 100, 100)]


def _palette_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putdata([0, 1])
    image.info["transparency"] = 0
    return image, [WHITE, (10, 20, 30)]


def _grey():
    image = Image.new("L", (2, 1))
    image.putdata([0, 200])
    return image, [(0, 0, 0), (200, 200, 200)]


def _bilevel():
    image = Image.new("1", (2, 1))
    image.putdata([0, 255])
    return image, [(0, 0, 0), (255, 255, 255)]


def _cmyk():
    image = Image.new("CMYK", (2, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])
    return image, [(255, 255, 255), (0, 255, 255)]


def _grey16():
    image = Image.new("I;16", (3, 1))
    image.putdata([0, 32768, 65535])
    return image, [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


MODES = {"RGBA": _rgba, "LA": _la, "P+transparency": _palette_with_transparency, "L": _grey, "1": _bilevel,
         "CMYK": _cmyk, "I;16": _grey16}


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_becomes_correct_rgb(mode):
    image, expected = MODES[mode]()
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert out.size == image.size
    assert _close(_pixels(out), expected), _pixels(out)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency", "L", "1", "I;16"])
def test_mode_survives_png_decode(mode):
    image, expected = MODES[mode]()
    out = decode_image(_png(image))
    assert out.mode == "RGB"
    assert _close(_pixels(out), expected), _pixels(out)


@pytest.mark.parametrize("train", [True, False])
def test_one_pixel_image_gives_full_views(train):
    image = decode_image(_png(Image.new("RGBA", (1, 1), (10, 200, 30, 255))))
    views = PairedViews(image_size=16, mean=(0.0,) * 3, std=(1.0,) * 3, teacher_size=32, train=train,
                        output_uint8=True)
    out = views(image, torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, 16, 16)
    assert out["teacher_view"].shape == (3, 32, 32)
    assert out["image"][:, 8, 8].tolist() == [10, 200, 30]


def _rotated_jpeg(path) -> Image.Image:
    """Write a 48x24 JPEG (red left half, blue right half) tagged 'rotate 90° clockwise'; return it upright."""
    image = Image.new("RGB", (48, 24), (220, 0, 0))
    image.paste((0, 0, 220), (24, 0, 48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", exif=exif, quality=95)
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def test_exif_orientation_same_in_training_eval_and_teacher(tmp_path):
    upright = _rotated_jpeg(tmp_path / "r.jpg")
    assert upright.size == (24, 48)
    (tmp_path / "pairs.csv").write_text("filepath,caption\nr.jpg,a red and blue picture\n")
    views = PairedViews(image_size=16, mean=(0.0,) * 3, std=(1.0,) * 3, teacher_size=32, train=False)
    expected = views(upright)
    train_sample = CaptionDataset(tmp_path / "pairs.csv", transform=views, tokenizer=lambda t: torch.zeros(1, 2))[0]
    eval_sample = CaptionedImages(tmp_path / "pairs.csv", transform=views)[0]
    record = RawRecord("r", "shard.tar", {"jpg": (tmp_path / "r.jpg").read_bytes(), "txt": b"x"}, 0, 0, seed=0)
    shard_sample = SampleDecoder(views, lambda t: torch.zeros(1, 2), image_keys=("jpg",),
                                 caption=CaptionSpec.parse("txt"))(record)
    for sample in (train_sample, eval_sample, shard_sample):
        assert torch.equal(sample["image"], expected["image"])
        assert torch.equal(sample["teacher_view"], expected["teacher_view"])  # the teacher gets the same pixels


def test_exif_switch_off_keeps_stored_orientation(tmp_path):
    _rotated_jpeg(tmp_path / "r.jpg")
    assert load_image(tmp_path / "r.jpg", exif_transpose=False).size == (48, 24)
    assert load_image(tmp_path / "r.jpg").size == (24, 48)


def test_jpeg_draft_keeps_enough_pixels(sample_data):
    path = sorted((sample_data / "flickr8k" / "images").glob("*.jpg"))[0]
    full = load_image(path)
    reduced = load_image(path, min_size=40)
    assert min(reduced.size) >= 40
    assert min(reduced.size) < min(full.size)
    assert load_image(path, min_size=1000).size == full.size  # never below the full size


@pytest.fixture(scope="module")
def tiny_text_model():
    cfg = load_config(None, ["model.trunk=dinorankclip-tiny", "model.image_size=32", "fusion.variant=none"])
    torch.manual_seed(0)
    return build_model(cfg, None).eval()


def _spec():
    return TrunkSpec(name="dinorankclip-tiny", embed_dim=256, image_size=32, context_length=32,
                     image_mean=(0.5,) * 3, image_std=(0.5,) * 3)


def test_long_caption_keeps_end_of_text(tmp_path, sample_data):
    tokenizer = build_tokenizer(_spec())
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    long_caption = " ".join(["a dog runs across the green field"] * 20)
    shutil.copy(sorted((sample_data / "flickr8k" / "images").glob("*.jpg"))[0], tmp_path / "a.jpg")
    (tmp_path / "pairs.csv").write_text(f"filepath,caption\na.jpg,{long_caption}\n")
    views = PairedViews(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    table_tokens = CaptionDataset(tmp_path / "pairs.csv", transform=views, tokenizer=tokenizer)[0]["text"]
    record = RawRecord("a", "s.tar", {"jpg": (tmp_path / "a.jpg").read_bytes(), "txt": long_caption.encode()}, 0, 0, 0)
    decoder = SampleDecoder(views, tokenizer, image_keys=("jpg",), caption=CaptionSpec.parse("txt"))
    shard_tokens = decoder(record)["text"]
    for tokens in (table_tokens, shard_tokens):
        assert tokens.shape == (32,)
        assert tokens[0].item() == sot
        assert tokens[-1].item() == eot  # truncation keeps the end-of-text token that pools the text
        assert (tokens != 0).all()


@pytest.mark.parametrize("caption", ["", "   ", "\t \n"])
def test_empty_caption_same_in_training_and_eval(tmp_path, sample_data, tiny_text_model, caption):
    tokenizer = build_tokenizer(tiny_text_model.spec)
    shutil.copy(sorted((sample_data / "flickr8k" / "images").glob("*.jpg"))[0], tmp_path / "a.jpg")
    quoted = caption.replace("\n", "\\n")
    (tmp_path / "pairs.csv").write_text(f'filepath,caption\na.jpg,"{caption}"\n')
    views = PairedViews(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    tokens = CaptionDataset(tmp_path / "pairs.csv", transform=views, tokenizer=tokenizer)[0]["text"]
    assert tokens[:2].tolist() == [tokenizer.sot_token_id, tokenizer.eot_token_id], quoted
    assert not tokens[2:].any()
    with torch.no_grad():
        train_embedding = tiny_text_model.encode_text(tokens[None])
    eval_embedding = Encoder(tiny_text_model, tokenizer, torch.device("cpu")).texts([caption])
    assert torch.allclose(train_embedding, eval_embedding, atol=1e-6)
