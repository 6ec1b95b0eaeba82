"""ToyWorld CLIP and captioner: micro training runs, save/reload, exact resume, corruptions and metrics."""

import json
import logging
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BlipForConditionalGeneration,
    BlipProcessor,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from t2i_align.toyworld.experts import captioner as cap
from t2i_align.toyworld.pretraining.batches import (
    eval_texts,
    heldout_scenes,
    normalize,
    render_batch,
    sample_mix,
    step_batch,
    step_loader,
    to_float,
)
from t2i_align.toyworld.experts.clip_model import build_clip, clip_quality, contrastive_loss, train_clip
from t2i_align.toyworld.evaluation.metrics import score_image
from t2i_align.toyworld.world import COMPOSITIONAL, NATURAL, Phrase, PromptSpec, parse_prompt, place, render, sample_spec


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spatial(rel="to the left of"):
    return PromptSpec((Phrase("circle", colour="red"), Phrase("square", colour="blue")), rel, "spatial")


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- batches
def test_step_batches_are_a_function_of_seed_and_step_and_skip_eval_prompts():
    exclude = eval_texts(0)
    images, captions = step_batch("clip", 0, 3, 6, exclude)
    again = step_batch("clip", 0, 3, 6, exclude)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images, again[0]) and captions == again[1]
    assert step_batch("clip", 0, 4, 6, exclude)[1] != captions
    assert step_batch("captioner", 0, 3, 6, exclude)[1] != captions
    # worker processes deliver the same batches in step order
    serial = [c for _, c in step_loader("clip", 0, 2, 6, 2, exclude)]
    parallel = [c for _, c in step_loader("clip", 0, 2, 6, 2, exclude, num_workers=2)]
    assert parallel == serial == [step_batch("clip", 0, k, 2, exclude)[1] for k in range(2, 6)]
    # the mix skips excluded captions and draws both distributions
    frequent = Counter(s.caption for s in sample_mix(random.Random(0), 400)).most_common(3)
    banned = {c for c, _ in frequent}
    assert not banned & {s.caption for s in sample_mix(random.Random(0), 400, banned)}
    kinds = Counter(s.spec.template for s in sample_mix(random.Random(1), 400))
    assert kinds["single"] > 50 and kinds["multi"] > 30
    assert {s.caption for s in heldout_scenes("eval", 0, 50)} <= exclude


# ---------------------------------------------------------------------------------------------------- CLIP
def test_clip_contrastive_loss_treats_duplicate_captions_as_positives():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(4)
    standard = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(contrastive_loss(logits, ["a", "b", "c", "d"]), standard)
    targets = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])  # captions 0 and 2 equal
    expected = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.t().log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(contrastive_loss(logits, ["a", "b", "a", "d"]), expected)


def test_clip_micro_training_saves_a_loadable_clip(tmp_path):
    folder = train_clip(tmp_path / "run", steps=20, batch_size=8, log_every=10, warmup=5)
    model = CLIPModel.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) < 4_000_000
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    processor = CLIPProcessor.from_pretrained(folder)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.vision_config.image_size == CLIPImageProcessor.from_pretrained(folder).crop_size["height"] == 64
    initial = build_clip(0).state_dict()
    assert not torch.equal(model.state_dict()["text_projection.weight"], initial["text_projection.weight"])
    scenes = sample_mix(random.Random(5), 3)
    pil = [render(s)[0] for s in scenes]
    inputs = processor(text=[s.caption for s in scenes], images=pil, return_tensors="pt", padding=True)
    # the processor gives exactly the pixels training used (64 px renders: no resize or crop changes)
    assert torch.allclose(inputs.pixel_values, normalize(to_float(render_batch(scenes))), atol=1e-6)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (3, 3) and out.image_embeds.shape == (3, 128)
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())] == [10, 20]
    quality = clip_quality(folder, n=16, batch=8)
    assert set(quality) >= {"i2t_top1", "t2i_top1", "corruption_acc"} and 0 <= quality["i2t_top1"] <= 1
    assert quality["pairs"] > 0


def _resume_case(name, tmp_path, caplog):
    train = {"clip": train_clip, "captioner": cap.train_captioner}[name]
    load = {"clip": CLIPModel, "captioner": BlipForConditionalGeneration}[name]
    kwargs = dict(batch_size=3, log_every=3, warmup=2, checkpoint_every=100)
    with caplog.at_level(logging.INFO, logger="t2i_align.toyworld.pretraining.batches"):
        short = load.from_pretrained(train(tmp_path / "resumed", steps=6, **kwargs)).state_dict()
        assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 6
        resumed = train(tmp_path / "resumed", steps=12, **kwargs)
    assert "from step 6" in caplog.text
    logged = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert logged == [3, 6, 9, 12]  # the second call started at step 6
    straight = train(tmp_path / "straight", steps=12, **kwargs)
    a, b = load.from_pretrained(resumed).state_dict(), load.from_pretrained(straight).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], short[k]) for k in a)
    with pytest.raises(ValueError, match="batch_size"):
        train(tmp_path / "resumed", steps=20, **{**kwargs, "batch_size": 4})


@pytest.mark.parametrize("name", ["clip", "captioner"])
def test_resume_continues_from_the_checkpoint_and_matches_a_straight_run(name, tmp_path, caplog):
    _resume_case(name, tmp_path, caplog)


# ----------------------------------------------------------------------------------------------- captioner
def test_vocabulary_covers_every_caption_and_matches_the_config(tmp_path):
    tokenizer = cap.build_captioner_tokenizer(tmp_path)
    assert (tmp_path / "vocab.txt").read_text().splitlines()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    rng = random.Random(0)
    specs = [sample_spec(d, rng) for d in (NATURAL, COMPOSITIONAL) for _ in range(300)]
    specs += [c for s in specs for c in cap.corruptions(s)]
    texts = [s.text() for s in specs] + sorted(eval_texts(0))
    ids = tokenizer(texts).input_ids
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert all(len(row) == len(t.replace(",", " ,").split()) + 2 for row, t in zip(ids, texts))  # whole words
    assert tokenizer.decode(ids[0], skip_special_tokens=True).replace(" ,", ",") == texts[0]
    text_config = cap.build_captioner(0).config.text_config
    assert text_config.vocab_size == len(tokenizer)
    assert text_config.bos_token_id == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    assert text_config.sep_token_id == tokenizer.sep_token_id and text_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.bos_token_id not in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)


def test_caption_log_likelihood_matches_the_hf_lm_loss(tmp_path):
    model = cap.build_captioner(1).eval()
    processor = BlipProcessor(image_processor=cap.image_processor(), tokenizer=cap.build_captioner_tokenizer(tmp_path))
    scenes = sample_mix(random.Random(2), 3)
    texts = [s.caption for s in scenes]
    images = to_float(render_batch(scenes)).requires_grad_()
    ll = cap.caption_log_likelihood(model, processor, images, texts)
    assert ll.shape == (3,) and (ll < 0).all()
    ll.sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable in the image (CoMat's L_i2t)
    pil = cap.caption_log_likelihood(model, processor, [render(s)[0] for s in scenes], texts)
    assert torch.allclose(pil, ll.detach(), atol=1e-4)
    for i, text in enumerate(texts):  # one at a time (no padding): HF's mean loss x number of predicted tokens
        enc = processor.tokenizer([text], return_tensors="pt")
        ids = enc.input_ids.clone()
        ids[:, 0] = model.config.text_config.bos_token_id
        with torch.no_grad():
            loss = model(pixel_values=normalize(images[i:i + 1].detach()), input_ids=ids, labels=ids).loss
        assert torch.allclose(-loss * (ids.shape[1] - 1), ll[i].detach(), atol=1e-4)


def test_captioner_micro_training_saves_a_loadable_blip(tmp_path):
    folder = cap.train_captioner(tmp_path / "run", steps=20, batch_size=8, log_every=10, warmup=5)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = BlipProcessor.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) < 6_000_000
    assert (folder / "vocab.txt").exists() and processor.tokenizer.bos_token_id == model.config.text_config.bos_token_id
    scenes = sample_mix(random.Random(3), 4)
    pil = [render(s)[0] for s in scenes]
    inputs = processor(images=pil, return_tensors="pt")
    assert torch.allclose(inputs.pixel_values, normalize(to_float(render_batch(scenes))), atol=1e-6)
    ll = cap.caption_log_likelihood(model, processor, pil, [s.caption for s in scenes])
    assert ll.shape == (4,) and torch.isfinite(ll).all()
    out = model.generate(**inputs, max_new_tokens=6)
    assert out.shape[0] == 4 and (out[:, 0] == model.config.text_config.bos_token_id).all()
    assert len(cap.generate_captions(model, processor, pil, max_new_tokens=6)) == 4
    # 20 steps already make the true caption likelier than before training
    untrained = cap.caption_log_likelihood(cap.build_captioner(0).eval(), processor, pil, [s.caption for s in scenes])
    assert ll.mean() > untrained.mean()


# --------------------------------------------------------------------------------------------- corruptions
def test_corruptions_of_a_spatial_prompt():
    got = {(kind, c.text()) for kind, c in cap.typed_corruptions(spatial())}
    assert got == {
        ("attribute", "a blue circle to the left of a red square"),
        ("relation", "a red circle to the right of a blue square"),
        ("count", "two red circles to the left of a blue square"),
        ("count", "a red circle to the left of two blue squares"),
    }
    assert cap.corruptions(spatial("above"))[1].relation == "below"


def test_corruptions_skip_same_meaning_and_out_of_world_counts():
    spec = parse_prompt("two red circles and two blue circles")
    got = {(kind, c.text()) for kind, c in cap.typed_corruptions(spec)}
    # swapping the colours says the same thing; 3 + 2 objects exceed the world's 4
    assert got == {("count", "a red circle and two blue circles"), ("count", "two red circles and a blue circle")}
    assert cap.corruptions(parse_prompt("a red circle"))[0].text() == "two red circles"
    sized = parse_prompt("a big striped red circle and a small plain blue square")
    kinds = Counter(kind for kind, _ in cap.typed_corruptions(sized))
    assert kinds == {"attribute": 3, "count": 2}
    partly = parse_prompt("a big red circle and a blue square")  # the square's size is not named: no size swap
    assert Counter(kind for kind, _ in cap.typed_corruptions(partly))["attribute"] == 1


def test_corruptions_are_valid_different_and_false_in_the_scene():
    rng = random.Random(4)
    seen = Counter()
    for _ in range(300):
        dist = NATURAL if rng.random() < 0.5 else COMPOSITIONAL
        spec = sample_spec(dist, rng)
        scene = place(spec, dist, rng)
        for kind, c in cap.typed_corruptions(spec):
            seen[kind] += 1
            assert c.text() != spec.text() and parse_prompt(c.text()) == c
            assert c.num_objects <= 4 and len({(p.shape, p.colour) for p in c.phrases}) == len(c.phrases)
            assert score_image(c, scene.objects)["all_clauses"] == 0, (spec.text(), c.text())
            if kind == "attribute":
                assert [p.shape for p in c.phrases] == [p.shape for p in spec.phrases]
                assert Counter(map(repr, c.phrases)) != Counter(map(repr, spec.phrases))
            elif kind == "relation":
                assert c.phrases == spec.phrases and c.relation == cap.OPPOSITE[spec.relation]
            else:
                diffs = [abs(a.count - b.count) for a, b in zip(c.phrases, spec.phrases)]
                assert sorted(diffs)[-1] == 1 and sum(diffs) == 1
    assert min(seen.values()) > 20


# ------------------------------------------------------------------------------------------------ metrics
def _keyed_scorer(scenes, images, table):
    """A fake model: score(image, text) from ``table[(caption of the image's scene, text)]``, default -1."""
    def score(ims, texts):
        out = []
        for im, text in zip(ims, texts):
            owner = [k for k in range(len(scenes)) if torch.equal(images[k], im)]
            assert len(owner) == 1  # the metric pairs each text with its scene's image
            out.append(table.get((scenes[owner[0]].caption, text), -1.0))
        return torch.tensor(out)
    return score


def test_sensitivity_on_a_hand_made_fake_model():
    specs = [spatial(), parse_prompt("four red stars"), parse_prompt("a blue square")]
    scenes = [place(s, COMPOSITIONAL, random.Random(i)) for i, s in enumerate(specs)]
    images = to_float(render_batch(scenes))
    table = {(s.caption, s.caption): 0.0 for s in scenes}
    table[(spatial().text(), "two red circles to the left of a blue square")] = 1.0  # the fake errs on one count
    table[("four red stars", "three red stars")] = 0.0  # a tie is not a win
    out = cap.sensitivity(scenes, images, _keyed_scorer(scenes, images, table), batch=3)
    # pairs: spatial 4 (attribute, relation, 2 counts), four stars 1 (count), blue square 1 (count)
    assert out["pairs"] == 6 and out["pairs/count"] == 4 and out["pairs/attribute"] == out["pairs/relation"] == 1
    assert out["sensitivity"] == pytest.approx(4 / 6)
    assert out["sensitivity/count"] == pytest.approx(2 / 4)
    assert out["sensitivity/attribute"] == out["sensitivity/relation"] == 1.0


def test_captioner_quality_plumbing_with_a_fake_model(monkeypatch, tmp_path):
    scenes = heldout_scenes("mix", 7, 12)
    by_image = {render_batch([s]).numpy().tobytes(): s for s in scenes}

    def caption_of(im):
        return by_image[(im * 255).round().to(torch.uint8).numpy().tobytes()].caption

    def fake_ll(model, processor, images, texts):  # prefers any caption with another number of objects
        def score(im, text):
            true = caption_of(im)
            if parse_prompt(text).num_objects != parse_prompt(true).num_objects:
                return 1.0
            return 0.0 if text == true else -1.0
        return torch.tensor([score(im, t) for im, t in zip(images, texts)])

    monkeypatch.setattr(cap, "load_captioner", lambda model_dir, device="cpu": (None, None))
    monkeypatch.setattr(cap, "caption_log_likelihood", fake_ll)
    monkeypatch.setattr(cap, "generate_captions", lambda m, p, images: [caption_of(im) for im in images])
    out = cap.captioner_quality(tmp_path, n=12, seed=7, batch=5)
    assert out["caption_exact"] == out["caption_satisfied"] == 1.0
    assert out["sensitivity/attribute"] == 1.0 and out["sensitivity/count"] == 0.0 and out["pairs/count"] > 0
    assert out["sensitivity"] == pytest.approx(1 - out["pairs/count"] / out["pairs"])


def test_caption_accuracy_compares_scenes_not_strings():
    scene = place(spatial(), COMPOSITIONAL, random.Random(0))
    big = scene.objects[0].size
    assert cap.caption_matches(scene.caption, scene) == {"parsed": True, "satisfied": True, "exact": True,
                                                         "relation": True}
    assert cap.caption_matches(f"a {big} red circle to the left of a blue square", scene)["exact"]  # extra true word
    assert cap.caption_matches("a blue square to the right of a red circle", scene)["exact"]  # same scene, reworded
    # the right objects without the relation: exact (the image does not say whether to name it), no relation
    assert cap.caption_matches("a red circle and a blue square", scene) == {"parsed": True, "satisfied": True,
                                                                            "exact": True, "relation": False}
    assert cap.caption_matches("a red circle", scene)["satisfied"] and not cap.caption_matches("a red circle", scene)["exact"]
    assert not cap.caption_matches("a red circle to the right of a blue square", scene)["satisfied"]
    assert not cap.caption_matches("a blue circle to the left of a red square", scene)["satisfied"]
    assert not cap.caption_matches("a red circle and a blue circle", scene)["exact"]
    assert cap.caption_matches("circle circle left", scene) == {"parsed": False, "satisfied": False, "exact": False,
                                                                "relation": False}
    single = place(PromptSpec((Phrase("star", colour="cyan"),), None, "single"), COMPOSITIONAL, random.Random(0))
    acc = cap.caption_accuracy([scene, scene, scene, single], [scene.caption, "a red circle", "a red circle and a blue square",
                                                                "a cyan star"])
    assert acc == {"caption_parsed": 1.0, "caption_satisfied": 1.0, "caption_exact": 0.75, "caption_relation": 1 / 3}


def test_hold_cosine_schedule_extends_a_constant_run_with_a_decay():
    from t2i_align.toyworld.pretraining.batches import LoopConfig, lr_at

    held = LoopConfig(6000, 8, 5e-4, warmup=200, schedule="hold_cosine", decay_start=4000)
    constant = LoopConfig(4000, 8, 5e-4, warmup=200)
    assert [lr_at(held, s) for s in range(0, 4000, 37)] == [lr_at(constant, s) for s in range(0, 4000, 37)]
    assert lr_at(held, 5000) == pytest.approx(2.5e-4) and lr_at(held, 5999) < 1e-9
