"""Captioned image data: a procedural shapes set (the default; no download) and an image folder
with captions, plus the word tokenizer and the automatic prompt-adherence checker."""

import csv
import io
import json
import re
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

# Shape colours and backgrounds are far apart in RGB so the checker can tell them by nearest
# palette entry even on blurry generated images.
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = ["white", "black", "yellow", "blue", "green", "gray"]
PALETTE = {**COLOURS, "gray": (128, 128, 128)}
SHAPES = ["circle", "square", "triangle"]
SIZES = {"small": 0.12, "large": 0.22}  # half-extent as a fraction of the image side
RELATIONS = ["above", "below", "left of", "right of"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def is_held_out(caption):
    """One caption in ten, by hash, never appears in synthetic training batches; the adherence
    test prompts come from this set."""
    return zlib.crc32(caption.encode()) % 10 == 0


class SyntheticShapes:
    """Procedural captioned shapes: one or two shapes (colour, shape, size) on a coloured
    background, two shapes placed in a stated relation, e.g. "a small red circle above a
    large blue square on a yellow background". Sample i of a seed is always the same image.

    `split` "train" skips held-out captions, "heldout" keeps only them, "all" keeps both."""

    def __init__(self, resolution=64, seed=0, split="train"):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"SyntheticShapes: split must be train, heldout or all, got {split!r}")
        self.resolution = resolution
        self.seed = seed
        self.split = split

    def scene(self, index):
        """The layout of sample `index`: {"background", "shapes": [{colour, shape, size,
        cx, cy}], "relation"} and its caption (cx, cy in [0, 1])."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        while True:
            scene = random_scene(gen)
            caption = caption_of(scene)
            held = is_held_out(caption)
            if self.split == "all" or held == (self.split == "heldout"):
                return scene, caption

    def __getitem__(self, index):
        scene, caption = self.scene(index)
        return render(scene, self.resolution), caption

    def batch(self, indices):
        images, captions = zip(*(self[i] for i in indices))
        return torch.stack(images), list(captions)


def _pick(gen, options):
    return options[int(torch.randint(len(options), (), generator=gen))]


def _uniform(gen, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def random_scene(gen):
    background = _pick(gen, BACKGROUNDS)
    colours = [c for c in COLOURS if c != background]
    first = _pick(gen, colours)
    count = 1 + int(torch.rand((), generator=gen) < 0.7)
    shapes = [{"colour": first, "shape": _pick(gen, SHAPES), "size": _pick(gen, list(SIZES))}]
    if count == 2:
        shapes.append({"colour": _pick(gen, [c for c in colours if c != first]),
                       "shape": _pick(gen, SHAPES), "size": _pick(gen, list(SIZES))})
    relation = _pick(gen, RELATIONS) if count == 2 else None
    _place(gen, shapes, relation)
    return {"background": background, "shapes": shapes, "relation": relation}


def _place(gen, shapes, relation):
    """Centres inside the image; for two shapes, separated along the relation's axis so that
    they never overlap and the relation is unambiguous."""
    r = [SIZES[s["size"]] for s in shapes]
    if relation is None:
        shapes[0]["cx"] = _uniform(gen, r[0], 1 - r[0])
        shapes[0]["cy"] = _uniform(gen, r[0], 1 - r[0])
        return
    along, across = ("cy", "cx") if relation in ("above", "below") else ("cx", "cy")
    first_lower = relation in ("above", "left of")  # the first shape has the smaller coordinate
    lo, hi = (0, 1) if first_lower else (1, 0)
    gap = r[0] + r[1] + 0.04
    a = _uniform(gen, r[lo], 1 - r[hi] - gap)
    coords = [a, a + gap + _uniform(gen, 0, max(0.0, 1 - r[hi] - gap - a))]
    if not first_lower:
        coords.reverse()
    for s, c, ri in zip(shapes, coords, r):
        s[along] = c
        s[across] = _uniform(gen, ri, 1 - ri)


def caption_of(scene):
    words = [f"a {s['size']} {s['colour']} {s['shape']}" for s in scene["shapes"]]
    body = f" {scene['relation']} ".join(words)
    return f"{body} on a {scene['background']} background"


def parse_caption(caption):
    """The scene a synthetic caption describes (without positions), or None."""
    colour = "|".join(COLOURS)
    part = rf"a (small|large) ({colour}) ({'|'.join(SHAPES)})"
    m = re.fullmatch(rf"{part}(?: ({'|'.join(RELATIONS)}) {part})? on a ({'|'.join(BACKGROUNDS)}) background", caption.strip())
    if m is None:
        return None
    g = m.groups()
    shapes = [{"size": g[0], "colour": g[1], "shape": g[2]}]
    if g[3]:
        shapes.append({"size": g[4], "colour": g[5], "shape": g[6]})
    return {"background": g[7], "shapes": shapes, "relation": g[3]}


def render(scene, resolution, supersample=2):
    """The scene as a float image [3, H, W] in [0, 1], antialiased by supersampling."""
    n = resolution * supersample
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    y, x = t[:, None].expand(n, n), t[None, :].expand(n, n)
    image = torch.tensor(PALETTE[scene["background"]], dtype=torch.float32)[:, None, None].expand(3, n, n).clone()
    for s in scene["shapes"]:
        r = SIZES[s["size"]]
        dx, dy = x - s["cx"], y - s["cy"]
        if s["shape"] == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif s["shape"] == "square":
            mask = (dx.abs() <= r) & (dy.abs() <= r)
        else:  # upward isosceles triangle filling the lower half of its 2r x 2r box
            mask = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
        image[:, mask] = torch.tensor(COLOURS[s["colour"]], dtype=torch.float32)[:, None]
    return F.avg_pool2d(image[None] / 255, supersample)[0]


class WordTokenizer:
    """Lower-cased words to ids; 0 pads, 1 is unknown. The default vocabulary is the synthetic
    captions' words; `from_captions` builds one from a folder's captions."""

    PAD, UNK = 0, 1

    def __init__(self, words, max_length=24):
        self.words = ["<pad>", "<unk>", *sorted(set(words) - {"<pad>", "<unk>"})]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.max_length = max_length

    @classmethod
    def default(cls):
        words = {"a", "on", "background", "of", *SIZES, *COLOURS, *BACKGROUNDS, *SHAPES}
        words |= {w for r in RELATIONS for w in r.split()}
        return cls(words)

    @classmethod
    def from_captions(cls, captions, max_length=32, min_count=1):
        counts = {}
        for c in captions:
            for w in cls.split(c):
                counts[w] = counts.get(w, 0) + 1
        return cls([w for w, n in counts.items() if n >= min_count], max_length)

    @staticmethod
    def split(text):
        return re.findall(r"[a-z0-9']+", text.lower())

    def __len__(self):
        return len(self.words)

    def __call__(self, texts):
        """Token ids [len(texts), max_length] int64, truncated and padded with 0."""
        out = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.ids.get(w, self.UNK) for w in self.split(text)][: self.max_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class ClipBPETokenizer:
    """CLIP's BPE tokenizer (tinykern.pipelines.sd.tokenizer: offline from the merges shipped
    with tinykern; needs transformers), with WordTokenizer's interface: ids [N, max_length] with
    CLIP's start and end tokens, padded to max_length."""

    def __init__(self, max_length=32):
        from tinykern.pipelines.sd.tokenizer import clip_tokenizer

        self._tok = clip_tokenizer()
        self.max_length = max_length

    def __len__(self):
        return len(self._tok)

    def __call__(self, texts):
        out = self._tok(list(texts), padding="max_length", max_length=self.max_length, truncation=True)
        return torch.tensor(out["input_ids"], dtype=torch.long)


# Column names accepted for the image path and the caption, in order of preference; LAPIS and
# other metadata files carry extra columns (ratings, artist, ...), which are ignored.
_FILE_KEYS = ("file", "file_name", "filename", "image", "image_path", "path", "img", "name")
_CAPTION_KEYS = ("caption", "text", "prompt", "description", "title")


class ImageFolderCaptions:
    """Images in `root` (recursively) with their captions, from either layout (or both):

    - a caption file in `root`: `captions.jsonl` or `captions.csv` (or metadata.jsonl /
      metadata.csv), one record per image naming the file relative to root (or by its bare
      name) and its caption; extra columns are ignored;
    - a text file beside each image with the image's name: `img001.png` + `img001.txt`.

    A record in the caption file wins over a text file. Items are (image [3, R, R] in [0, 1]
    resized and centre-cropped, caption). Every error (no images, an image without a caption,
    an empty caption, an unreadable image or caption file) is a ValueError naming the file."""

    CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")

    def __init__(self, root, resolution=64):
        self.root = Path(root).expanduser()
        self.resolution = resolution
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderCaptions: {self.root} is not a directory")
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ValueError(f"ImageFolderCaptions: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {self.root}")
        found = [self.root / n for n in self.CAPTION_FILES if (self.root / n).is_file()]
        self.captions_file = found[0] if found else None
        captions = self._read_captions() if found else {}
        self.items = []
        for path in images:
            rel = path.relative_to(self.root).as_posix()
            caption = captions.get(rel, captions.get(path.name))
            if caption is None:
                caption = self._sidecar_caption(path)
            _check_image(path)
            self.items.append((path, caption))

    def _sidecar_caption(self, path):
        text_file = path.with_suffix(".txt")
        if not text_file.is_file():
            where = f"no record in {self.captions_file} and " if self.captions_file else ""
            raise ValueError(f"ImageFolderCaptions: image {path} has no caption: {where}no {text_file.name} beside it "
                             f"(or a caption file {' / '.join(self.CAPTION_FILES)} in {self.root})")
        caption = _read_caption_text(text_file).strip()
        if not caption:
            raise ValueError(f"ImageFolderCaptions: caption file {text_file} is empty")
        return caption

    def _read_captions(self):
        text = _read_caption_text(self.captions_file)
        if self.captions_file.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"ImageFolderCaptions: {self.captions_file} line {number} is not JSON: {e}") from None
                    if not isinstance(rows[-1], dict):
                        raise ValueError(f"ImageFolderCaptions: {self.captions_file} line {number} is not a JSON object")
        else:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        out = {}
        for number, row in enumerate(rows, 1):
            keys = {k.strip().lower(): v for k, v in row.items() if k is not None}
            file = next((keys[k] for k in _FILE_KEYS if keys.get(k)), None)
            caption = next((keys[k] for k in _CAPTION_KEYS if keys.get(k) not in (None, "")), None)
            if file is None or caption is None:
                raise ValueError(f"ImageFolderCaptions: {self.captions_file} record {number} lacks a file column "
                                 f"({'/'.join(_FILE_KEYS)}) or a caption column ({'/'.join(_CAPTION_KEYS)}): {row}")
            out[str(file).strip()] = str(caption)
        return out

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, caption = self.items[index]
        with _open_image(path) as im:
            image = _decoded(path, lambda: im.convert("RGB"))
        return _square_tensor(image, self.resolution), caption

    def batch(self, indices):
        images, captions = zip(*(self[i % len(self)] for i in indices))
        return torch.stack(images), list(captions)


def _read_caption_text(path):
    """The text of caption file `path`, or ValueError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"ImageFolderCaptions: cannot read caption file {path}: {e}") from None


def _decoded(path, read):
    """read(), with any error from PIL (its own types, OSError, ...) as a ValueError naming the image."""
    try:
        return read()
    except Exception as e:
        raise ValueError(f"ImageFolderCaptions: cannot read image {path}: {e}") from None


def _open_image(path):
    from PIL import Image

    return _decoded(path, lambda: Image.open(path))


def _check_image(path):
    """Refuse, naming it, a file PIL cannot identify or an image with no pixels (the header
    only: a truncated body shows when the image is decoded)."""
    with _open_image(path) as im:
        if min(im.size) < 1:
            raise ValueError(f"ImageFolderCaptions: image {path} is {im.size[0]}x{im.size[1]} pixels")


def _square_tensor(image, resolution):
    """Resize the short side to `resolution`, centre-crop, to [3, R, R] float in [0, 1]."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return data.permute(2, 0, 1).float() / 255


def open_dataset(data, resolution, seed=0):
    """`data` is "synthetic" or an image folder with captions (ImageFolderCaptions)."""
    if data == "synthetic":
        return SyntheticShapes(resolution, seed=seed, split="train")
    return ImageFolderCaptions(data, resolution)


def heldout_prompts(count=24, seed=12345, exclude=()):
    """A fixed set of held-out synthetic captions (never seen in training), two-shape ones
    first in equal share with one-shape ones, none of them in `exclude`. The defaults are the
    test prompts; sampling settings and checkpoints are chosen on `validation_prompts()`."""
    source = SyntheticShapes(seed=seed, split="heldout")
    singles, pairs = [], []
    # Only 23 one-shape captions are held out, so a request for more can never be met.
    for i in range(20_000):
        scene, caption = source.scene(i)
        bucket = pairs if scene["relation"] else singles
        if len(bucket) < (count + 1) // 2 and caption not in bucket and caption not in exclude:
            bucket.append(caption)
        if len(singles) + len(pairs) == count:
            return pairs + singles
    raise ValueError(f"heldout_prompts: found {len(pairs)} two-shape and {len(singles)} one-shape held-out "
                     f"captions, fewer than the {(count + 1) // 2} of each that count={count} needs")


def validation_prompts(count=22):
    """Held-out captions disjoint from the test prompts heldout_prompts(24): the 11 one-shape
    captions those leave and as many two-shape ones."""
    return heldout_prompts(count, seed=777, exclude=heldout_prompts())


def check_adherence(image, caption):
    """Does `image` [3, H, W] in [0, 1] show what the synthetic `caption` says? Returns a dict
    of booleans: background (nearest palette colour of the border), colour (each named colour
    covers enough pixels), shape (the best-overlapping ideal square, circle or triangle inscribed
    in the colour's bounding box), size (bounding-box side, small 0.24 vs large 0.44 of the side), relation
    (centroids), extra (no solid region of a non-background colour beyond the shapes the caption
    names: an image with an extra shape is a miss), and all."""
    scene = parse_caption(caption)
    if scene is None:
        raise ValueError(f"check_adherence: not a synthetic-shapes caption: {caption!r}")
    h, w = image.shape[1:]
    names = list(PALETTE)
    palette = torch.tensor([PALETTE[n] for n in names], dtype=torch.float32) / 255
    pixels = image.permute(1, 2, 0).reshape(-1, 3).float()
    dist = torch.cdist(pixels, palette)
    nearest = dist.argmin(1).reshape(h, w)
    border = torch.cat([nearest[0], nearest[-1], nearest[:, 0], nearest[:, -1]])
    background = int(torch.mode(border).values)
    result = {"background": names[background] == scene["background"]}
    min_area = 0.3 * (2 * SIZES["small"] * h) ** 2 * 0.5  # a third of the smallest triangle
    ok = {"colour": True, "shape": True, "size": True}
    centroids = []
    for s in scene["shapes"]:
        raw = nearest == names.index(s["colour"])
        # The opening drops stray pixels; the raw pixels next to what survives come back (a
        # small triangle's apex is thinner than the 3x3 opening).
        mask = raw & (F.max_pool2d(_opened(raw)[None, None].float(), 5, 1, 2)[0, 0] > 0.5)
        area = int(mask.sum())
        if area < min_area:
            ok["colour"] = ok["shape"] = ok["size"] = False
            centroids.append(None)
            continue
        ys, xs = mask.nonzero(as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        side = max(y1 - y0, x1 - x0) / max(h, w)
        ok["shape"] &= _best_template(mask[y0:y1, x0:x1]) == s["shape"]
        ok["size"] &= ("large" if side > 0.34 else "small") == s["size"]
        centroids.append((float(xs.float().mean()), float(ys.float().mean())))
    result.update(ok)
    relation = True
    if scene["relation"]:
        a, b = centroids
        if a is None or b is None:
            relation = False
        else:
            dx, dy = b[0] - a[0], b[1] - a[1]
            along = {"above": dy, "below": -dy, "left of": dx, "right of": -dx}[scene["relation"]]
            # Training layouts separate the centres by at least 0.28 of the side on that axis.
            relation = along >= 0.15 * max(h, w)
    result["relation"] = relation
    named = [names.index(s["colour"]) for s in scene["shapes"]]
    # Looked for on every step-th pixel (about 64 a side): the smallest shape still spans 15.
    step = max(1, max(h, w) // 64)
    coarse = nearest[::step, ::step]
    result["extra"] = all(len(_solid_regions(coarse == c, max(coarse.shape), min_area / step**2)) <= named.count(c)
                          for c in range(len(names)) if c != background)
    result["all"] = all(result.values())
    return result


def _solid_regions(mask, side, min_area):
    """The regions of `mask` [H, W] that count as a drawn shape: the parts of the mask eroded by
    3% of the image side (which removes stray pixels and the thin seams that blurred edges leave
    between two colours), parts closer than that counting as one, that grown back by as much
    inside the mask cover min_area pixels."""
    if int(mask.sum()) < min_area:
        return []
    radius = max(1, round(0.03 * side))
    core = ~_dilated(~mask, radius)
    return [part for part in _components(core, radius) if int((_dilated(part, radius) & mask).sum()) >= min_area]


def _dilated(mask, radius):
    """Dilation of a bool mask [H, W] by a (2 radius + 1)-pixel square, as two 1-D passes."""
    return _max_filter(mask.float(), radius) > 0.5


def _max_filter(values, radius):
    m = F.max_pool2d(values[None, None], (1, 2 * radius + 1), 1, (0, radius))
    return F.max_pool2d(m, (2 * radius + 1, 1), 1, (radius, 0))[0, 0]


def _components(mask, radius):
    """The parts of a bool mask [H, W], those less than `radius` pixels apart joined, one bool
    mask each: every pixel takes the largest label within `radius` until nothing changes."""
    h, w = mask.shape
    keep = mask.float()
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w) * keep
    while True:
        grown = _max_filter(labels, radius) * keep
        if torch.equal(grown, labels):
            return [labels == v for v in labels.unique().tolist() if v > 0]
        labels = grown


def _best_template(box):
    """The shape whose ideal mask inscribed in the bounding box overlaps `box` best (IoU):
    robust to the rounded corners and soft edges of decoded images, where a fill-ratio
    threshold is not."""
    bh, bw = box.shape
    y = ((torch.arange(bh) + 0.5) / bh)[:, None].expand(bh, bw)
    x = ((torch.arange(bw) + 0.5) / bw)[None, :].expand(bh, bw)
    templates = {"square": torch.ones(bh, bw, dtype=torch.bool),
                 "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
                 "triangle": (x - 0.5).abs() <= y / 2}
    iou = {k: float((t & box).sum()) / max(float((t | box).sum()), 1.0) for k, t in templates.items()}
    return max(iou, key=iou.get)


def _opened(mask):
    """Morphological opening (3x3): drops the stray pixels that blurred edges of other
    colours leave, which would otherwise stretch the bounding box."""
    m = mask[None, None].float()
    eroded = -F.max_pool2d(-m, 3, 1, 1)
    return F.max_pool2d(eroded, 3, 1, 1)[0, 0] > 0.5
