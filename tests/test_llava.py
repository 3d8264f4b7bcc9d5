"""llava.py: the contrastive loss, where image features land, what each stage trains, the
Hugging Face Llava exchange, and one-line errors for bad images and prompts."""

import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
import llava
from data import scenes

TINY = llava.Settings(**llava.QUICK)


@pytest.fixture(scope="module")
def tok():
    return llava.WordTokenizer(llava.build_vocab())


def tiny_llava(tok, projector="mlp"):
    return llava.new_llava(tok, TINY, projector)


# ----------------------------------------------------------------------------- CLIP's loss
def test_clip_loss_matches_a_hand_computed_case():
    # two unit image embeddings and two unit text embeddings: cosine similarities [[1, 0], [0.6, 0.8]]
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.8, 0.6]]) * 3.0  # the scale of an embedding does not matter
    scale = torch.tensor(np.log(2.0))  # logits = 2 * cosine
    # logits = 2 * I T^T = [[2, 1.6], [0, 1.2]]
    # rows (image -> text):   -log softmax: row 0 picks 2 of (2, 1.6); row 1 picks 1.2 of (0, 1.2)
    # columns (text -> image): column 0 picks 2 of (2, 0); column 1 picks 1.2 of (1.6, 1.2)
    ce = lambda right, other: np.log(np.exp(right) + np.exp(other)) - right  # noqa: E731
    expected = (ce(2, 1.6) + ce(1.2, 0) + ce(2, 0) + ce(1.2, 1.6)) / 4
    assert llava.clip_loss(image, text, scale).item() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- the scenes
def test_a_shape_twin_differs_from_its_scene_in_one_shape_only():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = scenes.random_scene(rng)
        twin = scenes.shape_twin(scene, rng)
        changed = [i for i, (o, p) in enumerate(zip(scene, twin)) if o != p]
        assert len(changed) == 1 and len(twin) == len(scene)
        o, p = scene[changed[0]], twin[changed[0]]
        assert o["shape"] != p["shape"] and {**o, "shape": None} == {**p, "shape": None}
        assert len({(q["colour"], q["shape"]) for q in twin}) == len(twin)  # still no two alike
        captions = [scenes.caption(x, np.random.default_rng(1), long=True) for x in (scene, twin)]
        differ = [(a.strip(",."), b.strip(",.")) for a, b in zip(*(c.split() for c in captions)) if a != b]
        assert differ == [(o["shape"], p["shape"])]  # the caption differs in the shape word only


def test_every_object_lies_inside_one_patch():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = scenes.random_scene(rng)
        image = scenes.draw(scene)  # no noise: the background is 20 everywhere
        for o in scene:
            col, row = scenes.COLUMNS.index(o["column"]), int(o["y"] // 10)
            alone = scenes.draw([o])
            ys, xs = np.nonzero((alone != 20).any(-1))
            assert set(xs // 10) == {col} and set(ys // 10) == {row}
        assert (image != 20).any()


def test_conversation_answers_are_balanced_so_the_words_alone_give_chance():
    """Each kind of short question has its answers equally often (within sampling error), so the
    most frequent answer to a question text is right about 1 / (number of answers) of the time."""
    from collections import Counter, defaultdict
    rng = np.random.default_rng(0)
    by_template = defaultdict(Counter)
    for _ in range(6000):
        q, a = scenes.question(scenes.random_scene(rng), "conversation", rng)
        by_template[" ".join(q.split()[:2])][a] += 1
    expected = {"what colour": 5, "what shape": 4, "is there": 2, "where is": 3, "is the": 2, "how many": 3}
    assert set(by_template) == set(expected)
    for template, counts in by_template.items():
        n = sum(counts.values())
        assert len(counts) == expected[template], template
        assert max(counts.values()) / n < 1 / expected[template] + 0.06, (template, counts)
    talks = [scenes.conversation(scenes.random_scene(rng), rng, 3) for _ in range(300)]
    prior = scenes.text_prior(talks, np.random.default_rng(1), n=5000)
    assert 0.28 < prior["conversation"] < 0.42  # chance, averaged over the kinds of question: 0.35


# ----------------------------------------------------------------------------- image tokens
@pytest.mark.parametrize("seed", range(5))
def test_image_features_land_on_the_image_tokens_in_order(tok, seed):
    """Property: with 1-2 images in a batch at random places, position t holds the token's
    embedding unless input_ids[t] is the image token, and the k-th image token of the
    batch (row-major) holds feature k of the images in order."""
    rng = np.random.default_rng(seed)
    model = tiny_llava(tok)
    n = model.n_image_tokens
    rows, n_images = [], 0
    for b in range(2):
        words = list(rng.integers(len(llava.SPECIALS), tok.n_vocab, size=int(rng.integers(3, 12))))
        if b == 0 or rng.random() < 0.5:
            at = int(rng.integers(len(words) + 1))
            words[at:at] = [tok.image_token] * n
            n_images += 1
        rows.append(words)
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token] * (T - len(r)) for r in rows])
    pix = torch.randn(n_images, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    embeds = model.input_embeds(ids, pix)
    features = model.image_features(pix).reshape(-1, model.llm.config.n_embd)  # (n_images * n, C)
    k = 0
    for b in range(2):
        for t in range(T):
            if ids[b, t] == tok.image_token:
                assert torch.equal(embeds[b, t], features[k])
                k += 1
            else:
                assert torch.equal(embeds[b, t], model.llm.tok_embeddings.weight[ids[b, t]])
    assert k == n_images * n


def test_encode_conversation_puts_the_image_first_or_after_the_question_and_masks_the_user(tok):
    turns = [("what colour is the circle?", "red.", "conversation"),
             ("how many shapes are there?", "two.", "conversation")]
    for first in (True, False):
        ids, targets, _ = llava.encode_conversation(tok, turns, 9, image_first=first)
        image_at = ids.index(tok.image_token)
        assert image_at == (1 if first else 1 + len(tok.encode(turns[0][0])))
        assert ids[image_at:image_at + 9] == [tok.image_token] * 9 and ids.count(tok.image_token) == 9
        learned = tok.decode([t for t in targets if t != -100])
        assert learned == "red. </s> two. </s>"


def test_forward_refuses_image_tokens_without_their_images(tok):
    model = tiny_llava(tok)
    ids = torch.tensor([[tok.image_token] * model.n_image_tokens * 2])
    with pytest.raises(ValueError, match="18 image tokens but 1 image"):
        model(ids, torch.zeros(1, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE))


# ----------------------------------------------------------------------------- what each stage trains
def test_each_stage_trains_only_its_parts(tok):
    scenes, images = llava.make_scenes(16, 0)
    model = tiny_llava(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llava.train_stage(model, 1, tok, scenes, images, TINY)
    after1 = {k: v.clone() for k, v in model.state_dict().items()}
    changed = lambda a, b, part: {k for k in a if k.startswith(part) and not torch.equal(a[k], b[k])}  # noqa: E731
    assert changed(before, after1, "vision") == set() and changed(before, after1, "llm") == set()
    assert changed(before, after1, "projector") == {k for k in before if k.startswith("projector")}
    llava.train_stage(model, 2, tok, scenes, images, TINY)
    after2 = model.state_dict()
    assert changed(after1, after2, "vision") == set()
    assert "llm.layers.0.attention.wq.weight" in changed(after1, after2, "llm")
    assert changed(after1, after2, "projector") == {k for k in before if k.startswith("projector")}


def test_stage2_with_lora_folds_the_adapter_into_the_decoder(tok):
    scenes, images = llava.make_scenes(16, 0)
    model = tiny_llava(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llava.train_stage(model, 2, tok, scenes, images, TINY, lora=True)
    after = model.state_dict()
    assert set(after) == set(before)  # a plain LLaVA again: no lora_A / lora_B / base. names
    assert not torch.equal(after["llm.layers.0.attention.wq.weight"], before["llm.layers.0.attention.wq.weight"])
    assert torch.equal(after["llm.tok_embeddings.weight"], before["llm.tok_embeddings.weight"])  # LoRA: linears only
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("vision"))


# ----------------------------------------------------------------------------- Hugging Face
def test_logits_match_transformers_llava(tok, tmp_path):
    pytest.importorskip("transformers", reason="the HF Llava parity oracle needs transformers")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=scenes.IMAGE_SIZE, patch_size=scenes.IMAGE_SIZE // 3)
    text = LlamaConfig(vocab_size=tok.n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    theirs = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                       image_token_id=tok.image_token)).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # HF initializes norms at 1 and biases at 0: randomize them all
            p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "hf")
    ours = llava.LlavaModel.from_hf(str(tmp_path / "hf"))
    scene = scenes.random_scene(np.random.default_rng(0))
    pix = llava.pixel_values(np.stack([scenes.draw(scene), scenes.draw(scene[:1])]))
    rows = [llava.encode_prompt(tok, "what colour is the circle?", 1, 9),
            llava.encode_prompt(tok, "describe <image> the image.", 1, 9)]  # the image first, then inside
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token] * (T - len(r)) for r in rows])
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pix).logits
        assert (ours(ids, pix)[0] - expected).abs().max().item() < 1e-4
    ours.save_hf(str(tmp_path / "ours"))
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(input_ids=ids, pixel_values=pix).logits - expected).abs().max().item() < 1e-5


def test_a_linear_projector_cannot_be_exported(tok, tmp_path):
    with pytest.raises(ValueError, match="two-layer MLP projector only"):
        tiny_llava(tok, "linear").save_hf(str(tmp_path))


# ----------------------------------------------------------------------------- bad input, one line each
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("llava_run")
    llava.save(tiny_llava(tok), tok, str(out / "ckpt.pt"))
    scenes.write_png(scenes.draw(scenes.random_scene(np.random.default_rng(0))), str(out / "scene.png"))
    return out


def sample(run_dir, capsys, *args):
    """python sample.py ... in-process: (exit code, stdout, stderr)."""
    import sample as sample_py
    try:
        sample_py.main(["--out_dir", str(run_dir), "--max_new_tokens", "5", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_with_an_image_streams_an_answer(run_dir, capsys):
    code, out, err = sample(run_dir, capsys, "--image", run_dir / "scene.png", "--prompt", "What colour is the circle?",
                            "--temperature", "0")
    assert code == 0, err
    model, tok = llava.load(str(run_dir))
    ids = torch.tensor([llava.encode_prompt(tok, "what colour is the circle?", 1, model.n_image_tokens)])
    pix = llava.pixel_values(scenes.read_image(str(run_dir / "scene.png")))[None]
    greedy = [int(t[0]) for t in model.generate_tokens(ids, pix, 5, 0.0, eos_id=tok.eot_token)]
    greedy = greedy[:greedy.index(tok.eot_token)] if tok.eot_token in greedy else greedy  # </s> ends, unprinted
    assert out == "USER: what colour is the circle? ASSISTANT: " + tok.decode(greedy) + "\n"


@pytest.mark.parametrize("case", ["not_an_image", "too_many_tags", "unknown_word"])
def test_bad_input_is_one_error_line(run_dir, case, capsys):
    (run_dir / "notes.png").write_text("these are words, not pixels")
    image = run_dir / ("notes.png" if case == "not_an_image" else "scene.png")
    prompt = {"not_an_image": "what?", "too_many_tags": "<image> and <image>?", "unknown_word": "what is a dog?"}[case]
    code, _, err = sample(run_dir, capsys, "--image", image, "--prompt", prompt)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert {"not_an_image": "is not an image", "too_many_tags": "2 <image> tags but 1 image",
            "unknown_word": "'dog'"}[case] in err


def test_an_image_of_another_size_is_resized_with_a_note(run_dir, tmp_path, capsys):
    original = scenes.draw(scenes.random_scene(np.random.default_rng(1)))
    big = np.kron(original, np.ones((2, 2, 1), np.uint8))  # each pixel as a 2 x 2 block
    scenes.write_png(big, str(tmp_path / "big.png"))
    image = scenes.read_image(str(tmp_path / "big.png"))
    assert image.shape == original.shape
    assert np.abs(image.astype(int) - original).mean() < 8  # antialiased bilinear: close, edges blurred
    capsys.readouterr()
    code, _, err = sample(run_dir, capsys, "--image", tmp_path / "big.png", "--prompt", "what?")
    size = scenes.IMAGE_SIZE
    expected = f"note: {tmp_path / 'big.png'} is {2 * size}x{2 * size}, resized to the model's {size}x{size}\n"
    assert code == 0 and err == expected


# ----------------------------------------------------------------------------- the experiment's smoke run
@pytest.mark.slow  # the experiment: the slow set (conftest.py)
def test_experiment_quick_shows_clip_seeing_shapes(tmp_path, monkeypatch):
    """The --quick run already shows the effect's direction: CLIP's zero-shot shape accuracy above
    chance (25%) by more than three standard errors of 100 scenes."""
    import json
    import runpy
    monkeypatch.setenv("EXPERIMENTS_OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["llava.py", "--quick"])
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    sys.modules.pop("common", None)  # common.OUT is read from the environment when common is imported
    runpy.run_path(os.path.join(ROOT, "experiments", "llava.py"), run_name="__main__")
    results = json.loads((tmp_path / "llava_quick.json").read_text())
    assert results["quick"] and set(results["accuracy"]) == {"text prior", "text only", "stage 1 only",
                                                              "stage 2 only", "stage 1 + 2", "stage 1 + 2, linear"}
    for row in results["accuracy"].values():
        assert set(row) == set(scenes.KINDS) and all(len(v) == 1 and 0 <= v[0] <= 1 for v in row.values())
    assert len(results["examples"]) == 8 and {e["kind"] for e in results["examples"]} <= set(scenes.KINDS)
    assert (tmp_path / "llava_quick.png").stat().st_size > 1000
    [zero_shot] = results["zero_shot"]
    assert zero_shot["shape"] > 0.25 + 3 * (0.25 * 0.75 / 100) ** 0.5  # > 0.38
