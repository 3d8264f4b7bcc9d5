"""The scenes llava.py learns from: coloured shapes in three columns, drawn with numpy,
and the questions and answers about them, in LLaVA's three kinds of instruction data
(Liu et al., arXiv:2304.08485, section 3: conversation, detailed description, complex
reasoning), written from the scene's own description instead of by GPT-4.

    scene = random_scene(rng)    # [{"shape", "colour", "size", "column", "x", "y"}, ...], at most one per column
    draw(scene)                  # uint8 (30, 30, 3)
    conversation(scene, rng)     # [(question, answer, kind)], one turn of each kind at most
"""

import os
import sys
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import atomic_write


# ----------------------------------------------------------------------------- scenes
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40),
           "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 2.6, "large": 4.5}  # half-widths in pixels
COLUMNS = ("left", "middle", "right")
NUMBERS = ("zero", "one", "two", "three")
IMAGE_SIZE = 30  # three columns of 10 pixels: one 10 x 10 patch wide each


def random_scene(rng, n_objects=None):
    """1-3 objects, each in its own column, no two with the same colour and shape. Each object
    lies inside one 10 x 10 cell, the ViT's patch: a shape cut by a patch border would reach
    the encoder as two fragments in two patches, and CLIP's loss rarely needs the shape
    (experiments/llava.py measures both)."""
    n = n_objects or int(rng.integers(1, 4))
    columns = sorted(rng.choice(3, n, replace=False))
    kinds = rng.choice(len(COLOURS) * len(SHAPES), n, replace=False)
    scene = []
    for col, kind in zip(columns, kinds):
        size = ("small", "large")[rng.integers(2)]
        r = SIZES[size]
        free = IMAGE_SIZE / 6 - r  # how far the centre may move with the shape still inside its cell
        x = (col + 0.5) * IMAGE_SIZE / 3 + rng.uniform(-free, free)
        y = (rng.integers(3) + 0.5) * IMAGE_SIZE / 3 + rng.uniform(-free, free)  # in one row of patches too
        scene.append(dict(colour=list(COLOURS)[kind // len(SHAPES)], shape=SHAPES[kind % len(SHAPES)],
                          size=size, column=COLUMNS[col], x=float(x), y=float(y)))
    return scene


def draw(scene, rng=None):
    """The scene as an RGB image (H, W, 3) uint8 on a dark background with a little noise."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 20.0)
    for o in scene:
        r, dx, dy = SIZES[o["size"]], xx - o["x"], yy - o["y"]
        mask = {"circle": dx ** 2 + dy ** 2 <= r ** 2,
                "square": (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85),
                "triangle": (dy <= r) & (dy >= -r) & (abs(dx) <= (dy + r) / 2),
                "cross": ((abs(dx) <= r / 3) | (abs(dy) <= r / 3)) & (abs(dx) <= r) & (abs(dy) <= r)}[o["shape"]]
        image[mask] = COLOURS[o["colour"]]
    if rng is not None:
        image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def name(o, size=False):
    return f"{o['size'] + ' ' if size else ''}{o['colour']} {o['shape']}"


def caption(scene, rng, long=None):
    """A short caption (the CC3M stand-in of stage 1): 'a red circle and a large blue cross on the right.'"""
    long = rng.random() < 0.5 if long is None else long
    parts = [f"a {name(o, long)}" + (f" on the {o['column']}" if long else "") for o in scene]
    return (", ".join(parts[:-1]) + " and " if len(parts) > 1 else "") + parts[-1] + "."


def shape_twin(scene, rng):
    """The scene with one object's shape changed, colour, size and place kept: its caption differs
    from the scene's in one word, a hard negative for CLIP's loss (as NegCLIP's composition-aware
    hard negatives: Yuksekgonul et al., arXiv:2210.01936)."""
    i = int(rng.integers(len(scene)))
    taken = {(o["colour"], o["shape"]) for o in scene}
    shapes = [s for s in SHAPES if (scene[i]["colour"], s) not in taken]  # at least one: 4 shapes, <= 3 objects
    return scene[:i] + [{**scene[i], "shape": shapes[rng.integers(len(shapes))]}] + scene[i + 1:]


def clip_batch(scenes, rng, size, twins):
    """(scenes, captions) of one contrastive batch. twins: size / 2 training scenes, each followed by
    its shape twin and both captioned alike (long or short), so the loss needs the shapes; otherwise
    `size` distinct training scenes, whose captions colour, size and place tell apart."""
    idx = rng.choice(len(scenes), size=size // 2 if twins else size, replace=False)
    batch = [t for i in idx for t in ((scenes[i], shape_twin(scenes[i], rng)) if twins else (scenes[i],))]
    longs = np.repeat(rng.random(len(idx)) < 0.5, 2 if twins else 1)
    return batch, [caption(scene, rng, bool(long)) for scene, long in zip(batch, longs)]


def neighbour(scene, o, side):
    """The nearest object on `side` of o, or None."""
    others = [p for p in scene if (p["x"] < o["x"] if side == "left" else p["x"] > o["x"])]
    return min(others, key=lambda p: abs(p["x"] - o["x"]), default=None)


def question(scene, kind, rng):
    """(question, answer) of one of LLaVA's three kinds (section 3), in words the tokenizer knows."""
    o = scene[rng.integers(len(scene))]
    if kind == "description":  # detailed description: every object, left to right
        q = ("describe the image in detail.", "what is in the image? give details.")[rng.integers(2)]
        n = NUMBERS[len(scene)]
        a = f"there {'is one shape' if len(scene) == 1 else f'are {n} shapes'}. " + \
            " ".join(f"a {name(p, True)} on the {p['column']}." for p in scene)
        return q, a
    if kind == "conversation":  # short questions, each with balanced answers: the words alone give chance
        pick = int(rng.integers(6))
        key = {0: "shape", 1: "colour"}.get(pick)
        unique = [p for p in scene if key and sum(q[key] == p[key] for q in scene) == 1]
        if pick == 0 and unique:  # 5 answers, equally likely
            o = unique[rng.integers(len(unique))]
            return f"what colour is the {o['shape']}?", f"{o['colour']}."
        if pick == 1 and unique:  # 4 answers
            o = unique[rng.integers(len(unique))]
            return f"what shape is the {o['colour']} object?", f"a {o['shape']}."
        if pick <= 2:  # yes or no, half and half: an object of the scene, or a colour and shape it lacks
            present = rng.random() < 0.5
            if not present:
                absent = [(c, s) for c in COLOURS for s in SHAPES
                          if not any(p["colour"] == c and p["shape"] == s for p in scene)]
                c, s = absent[rng.integers(len(absent))]
                o = dict(colour=c, shape=s)
            return f"is there a {name(o)}?", ("yes." if present else "no.")
        if pick == 3:  # 3 answers
            return f"where is the {name(o)}?", f"on the {o['column']}."
        if pick == 4:  # 2 answers
            return f"is the {name(o)} large or small?", f"{o['size']}."
        return "how many shapes are there?", f"{NUMBERS[len(scene)]}."  # 3 answers
    side = ("left", "right")[rng.integers(2)]  # complex reasoning: relations between objects
    if rng.random() < 0.3 and len(scene) > 1:
        o, p = rng.choice(len(scene), 2, replace=False)
        o, p = scene[o], scene[p]
        q = f"which is bigger, the {name(o)} or the {name(p)}?"
        return q, ("they are the same size." if o["size"] == p["size"] else
                   f"the {name(o if o['size'] == 'large' else p)}.")
    n = neighbour(scene, o, side)
    return f"what is {side} of the {name(o)}?", (f"a {name(n, True)}." if n else "nothing.")


BRIEF = ("describe the image briefly.", "give a short caption of the image.", "what is in the picture?")
KINDS = ("conversation", "description", "reasoning")


def conversation(scene, rng, n_turns=None):
    """A multi-turn conversation [(question, answer, kind)]; one turn of each kind at most."""
    n = n_turns or int(rng.integers(1, 4))
    return [(*question(scene, kind, rng), kind) for kind in rng.permutation(KINDS)[:n]]


def text_prior(talks, rng, n=10_000):
    """The best the words alone can do on `talks` (conversations [(question, answer, kind)]): each
    question answered with its most frequent answer among n fresh conversations' identical
    questions (wrong if it never occurs), per kind. On the conversation kind, whose answers are
    balanced, this is chance."""
    answers = {}
    for _ in range(n):
        for q, a, _ in conversation(random_scene(rng), rng, 3):
            answers.setdefault(q, Counter())[a] += 1
    guess = {q: c.most_common(1)[0][0] for q, c in answers.items()}
    right = {k: 0 for k in KINDS}
    for turns in talks:
        for q, a, kind in turns:
            right[kind] += guess.get(q) == a
    return {k: right[k] / len(talks) for k in KINDS}


def caption_turn(scene, rng):
    """Stage 1's data: a caption as a one-turn conversation with a brief-description instruction."""
    return [(BRIEF[rng.integers(len(BRIEF))], caption(scene, rng), "caption")]


# ----------------------------------------------------------------------------- image files
def read_image(path, size=IMAGE_SIZE):
    """A PNG (or any format matplotlib reads) -> uint8 (size, size, 3); other sizes are resized (a note says so)."""
    import matplotlib.image
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} not found")
    try:
        image = matplotlib.image.imread(path)
    except Exception as e:  # PIL and matplotlib raise several types for a file that is not an image
        raise ValueError(f"{path} is not an image matplotlib can read ({type(e).__name__}); give a PNG") from None
    if image.dtype != np.uint8:
        image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)  # PNG comes back as floats in [0, 1]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"{path}: expected an RGB or RGBA image, got an array of shape {image.shape}")
    image = image[..., :3]
    if image.shape[:2] != (size, size):
        print(f"note: {path} is {image.shape[1]}x{image.shape[0]}, resized to the model's {size}x{size}",
              file=sys.stderr)
        x = torch.as_tensor(image).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        image = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return image


def write_png(image, path):
    import matplotlib.image
    atomic_write(path, lambda f: matplotlib.image.imsave(f, image, format="png"))
