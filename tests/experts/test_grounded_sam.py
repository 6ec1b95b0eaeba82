"""Grounded-SAM: the shared geometry (threshold rule, boxes, SAM's frame, union), the transformers build from tiny
Grounding DINO and SAM configs through from_pretrained (shapes, thresholds against transformers' own post-processing,
known boxes -> known pixels), the original-package build when installed, and the VocabularyTagger."""

import inspect
import json
import re
from types import SimpleNamespace

import pytest
import torch

from t2i_align.experts.grounded_sam import (Grounding, GroundedSAMSegmenter, OriginalGroundedSAMSegmenter,
                                            cxcywh_to_xyxy, detector_input_size, grounding_caption, kept_boxes,
                                            non_phrase_ids, phrase_token_mask, sam_input_boxes, sam_input_size,
                                            sam_masks_to_image, union_by_phrase)
from t2i_align.experts.segmenter import Segmenter
from t2i_align.experts.tagger import Tagger
from t2i_align.experts.vocabulary_tagger import VocabularyTagger

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "red", "blue", "green", "cat", "dog", "car",
         "bird", "cup", "tree", "big", "small", "the"]
SAM_SIZE = 1024
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert_tokenizer(folder):
    from transformers import BertTokenizer

    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return BertTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> str:
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    folder = tmp_path_factory.mktemp("grounding_dino")
    tokenizer = tiny_bert_tokenizer(tmp_path_factory.mktemp("vocab"))
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=2, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12, num_feature_levels=3, encoder_n_points=1,
        decoder_n_points=1, max_text_len=32)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "GroundingDinoImageProcessor", "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
         "size": {"shortest_edge": 64, "longest_edge": 96}}))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> str:
    """A tiny SAM with the real 1024 input frame (64-pixel patches: a 16 x 16 embedding, 64 x 64 mask logits)."""
    from transformers import SamConfig, SamModel

    folder = tmp_path_factory.mktemp("sam")
    config = SamConfig(
        vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SAM_SIZE, patch_size=64, window_size=4, global_attn_indexes=[1], num_pos_feats=8,
                           mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=16, image_size=SAM_SIZE, patch_size=64, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16))
    torch.manual_seed(0)
    SamModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SamImageProcessor", "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
         "size": {"longest_edge": SAM_SIZE}, "pad_size": {"height": SAM_SIZE, "width": SAM_SIZE}}))
    return str(folder)


@pytest.fixture(scope="module")
def segmenter(tiny_dino, tiny_sam) -> GroundedSAMSegmenter:
    return GroundedSAMSegmenter(detector=tiny_dino, sam=tiny_sam)


def record_sam(monkeypatch, segmenter: GroundedSAMSegmenter, fill_boxes: bool = False) -> list:
    """Replace ``segmenter.sam_logits`` by a recorder; with ``fill_boxes`` it answers 256 x 256 logits (of the
    1024 frame) that are +10 inside each box and -10 outside, else it calls the real SAM."""
    calls, real = [], segmenter.sam_logits

    def fake(pixels, boxes):
        calls.append((pixels.clone(), boxes.clone()))
        if not fill_boxes:
            return real(pixels, boxes)
        centres = (torch.arange(256, dtype=torch.float32) + 0.5) * (SAM_SIZE / 256)
        x0, y0, x1, y1 = (v[:, None, None] for v in boxes.unbind(-1))
        inside = (centres[None, None, :] >= x0) & (centres[None, None, :] <= x1) & \
                 (centres[None, :, None] >= y0) & (centres[None, :, None] <= y1)
        return torch.where(inside, 10.0, -10.0)

    monkeypatch.setattr(segmenter, "sam_logits", fake)
    return calls


# --- the shared geometry ---------------------------------------------------------------------------------------------

def test_caption_and_phrase_tokens(tiny_dino):
    from transformers import AutoTokenizer

    assert grounding_caption("  A Red   CAT ") == "a red cat." and grounding_caption("dog.") == "dog."
    tokenizer = AutoTokenizer.from_pretrained(tiny_dino)
    text = tokenizer([grounding_caption("a red cat"), grounding_caption("dog")], padding="longest",
                     return_tensors="pt")
    period, special = tokenizer.convert_tokens_to_ids("."), non_phrase_ids(tokenizer)
    assert tokenizer.unk_token_id not in special and tokenizer.pad_token_id in special
    first = phrase_token_mask(text.input_ids[0], special, period, 10)
    second = phrase_token_mask(text.input_ids[1], special, period, 10)
    # [CLS] a red cat . [SEP]  /  [CLS] dog . [SEP] [PAD] [PAD]; columns beyond the text are False
    assert first.tolist() == [False, True, True, True, False, False, False, False, False, False]
    assert second.tolist() == [False, True] + [False] * 8
    inner = tokenizer("st. cat.", return_tensors="pt").input_ids[0]  # [UNK] counts, only the final "." is dropped
    assert phrase_token_mask(inner, special, period, 8).tolist() == [False, True, True, True, False, False, False,
                                                                     False]


def test_box_and_text_thresholds():
    grounding = Grounding(boxes=torch.arange(20.0).view(5, 4), scores=torch.tensor([0.9, 0.9, 0.3, 0.36, 0.35]),
                          phrase_scores=torch.tensor([0.9, 0.2, 0.3, 0.26, 0.35]))
    kept = kept_boxes(grounding, box_threshold=0.35, text_threshold=0.25)
    assert kept.tolist() == [grounding.boxes[0].tolist(), grounding.boxes[3].tolist()]  # strict >, both rules
    assert len(kept_boxes(grounding, 0.0, 0.0)) == 5 and len(kept_boxes(grounding, 1.0, 0.0)) == 0


def test_box_conversion_and_union():
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5]])
    assert cxcywh_to_xyxy(boxes, height=48, width=64).tolist() == [[16, 12, 48, 36], [0, 24, 32, 48]]
    instances = torch.zeros(3, 4, 5, dtype=torch.bool)
    instances[0, 0, 0] = instances[1, 3, 4] = instances[2, 1, 1] = True
    union = union_by_phrase(instances, [2, 0, 1])
    assert union.shape == (3, 4, 5) and union.dtype == torch.bool
    assert union[0].nonzero().tolist() == [[0, 0], [3, 4]] and not union[1].any() and union[2].nonzero().tolist() == \
        [[1, 1]]
    with pytest.raises(ValueError, match="counts sum to 2 but there are 3 masks"):
        union_by_phrase(instances, [1, 1])


@pytest.mark.parametrize("size, resized", [((48, 64), (768, 1024)), ((64, 48), (1024, 768)), ((30, 50), (614, 1024)),
                                           ((512, 512), (1024, 1024))])
def test_sam_frame(size, resized):
    assert sam_input_size(*size, SAM_SIZE) == resized
    h, w = size
    boxes = torch.tensor([[0.0, 0.0, w, h], [w / 4, h / 2, w / 2, h]])
    scale = torch.tensor([resized[1] / w, resized[0] / h] * 2)
    assert torch.allclose(sam_input_boxes(boxes, h, w, SAM_SIZE), boxes * scale)  # per axis, the rounded size
    assert sam_input_boxes(boxes, h, w, SAM_SIZE)[0].tolist() == [0, 0, resized[1], resized[0]]


def test_sam_masks_crop_the_padding_before_resizing():
    # logits of the padded 8 x 8 frame; the content is the top 4 x 8 (a 2 x 4 image doubled); padding says True
    logits = torch.full((1, 8, 8), 5.0)
    logits[0, :4, :] = -5.0
    logits[0, :4, 4:] = 5.0
    masks = sam_masks_to_image(logits, input_size=(4, 8), original_size=(2, 4), pad_size=(8, 8))
    assert masks.tolist() == [[[False, False, True, True], [False, False, True, True]]]


def test_detector_input_size_follows_transformers():
    assert detector_input_size(480, 640, 800, 1333) == (800, 1066)
    assert detector_input_size(512, 512, 800, 1333) == (800, 800)
    assert detector_input_size(100, 400, 800, 1333) == (333, 1333)  # the longest side caps the size


# --- the transformers build ------------------------------------------------------------------------------------------

def test_every_init_parameter_is_documented():
    for cls in (GroundedSAMSegmenter, OriginalGroundedSAMSegmenter, VocabularyTagger):
        doc = cls.__doc__.split("Args:")[1]
        for name in list(inspect.signature(cls.__init__).parameters)[1:]:
            assert f"\n        {name}: " in doc, (cls.__name__, name)


def test_loads_through_from_pretrained_and_answers_per_phrase(tiny_dino, tiny_sam, monkeypatch):
    images = torch.rand(3, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    phrases = [["a red cat", "dog"], [], ["blue car"]]
    everything = GroundedSAMSegmenter(detector=tiny_dino, sam=tiny_sam, box_threshold=0.0, text_threshold=0.0)
    assert isinstance(everything, Segmenter)
    assert not everything.detector.training and not any(p.requires_grad for p in everything.sam.parameters())
    calls = record_sam(monkeypatch, everything)
    masks = everything.masks(images, phrases)
    assert [tuple(m.shape) for m in masks] == [(2, 48, 64), (0, 48, 64), (1, 48, 64)]
    assert all(m.dtype == torch.bool for m in masks)
    queries = everything.detector.config.num_queries
    assert [len(boxes) for _, boxes in calls] == [2 * queries, queries]  # every box of every phrase, one call a image
    assert all(p.shape == (1, 3, SAM_SIZE, SAM_SIZE) for p, _ in calls)

    nothing = GroundedSAMSegmenter(detector=tiny_dino, sam=tiny_sam, box_threshold=1.0)
    calls = record_sam(monkeypatch, nothing)
    masks = nothing.masks(images, phrases)
    assert [tuple(m.shape) for m in masks] == [(2, 48, 64), (0, 48, 64), (1, 48, 64)]
    assert not any(m.any() for m in masks) and calls == []  # no box: all False, SAM not run
    with pytest.raises(ValueError, match="GroundedSAMSegmenter: 3 images but 2 text entries"):
        nothing.masks(images, phrases[:2])


def test_thresholds_match_transformers_post_processing(segmenter, monkeypatch):
    """Boxes kept here = transformers' ``post_process_grounded_object_detection`` boxes (same threshold) whose label
    (the tokens above the text threshold) names a word of the phrase."""
    from transformers import GroundingDinoProcessor

    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(1))
    phrases = ["a red cat", "big dog", "green tree"]
    outputs = []
    hook = segmenter.detector.register_forward_hook(lambda module, args, kwargs_out: outputs.append(kwargs_out))
    try:
        groundings = segmenter.boxes(image, phrases)
    finally:
        hook.remove()
    scores = torch.cat([g.scores for g in groundings])
    box_threshold = scores.quantile(0.3).item()
    phrase = torch.cat([g.phrase_scores for g in groundings])
    text_threshold = phrase[scores > box_threshold].quantile(0.5).item()
    text = segmenter.tokenizer([grounding_caption(p) for p in phrases], padding="longest", return_tensors="pt")
    post = GroundingDinoProcessor.post_process_grounded_object_detection(
        SimpleNamespace(batch_decode=segmenter.tokenizer.batch_decode), outputs[0], input_ids=text.input_ids,
        threshold=box_threshold, text_threshold=text_threshold, target_sizes=[(40, 56)] * len(phrases))
    dropped_by_text = 0
    for g, p, result in zip(groundings, phrases, post):
        mine = cxcywh_to_xyxy(kept_boxes(g, box_threshold, text_threshold), 40, 56)
        named = torch.tensor([bool(set(re.findall(r"\w+", label)) & set(p.split())) for label in result["text_labels"]])
        dropped_by_text += int((~named).sum())
        assert torch.allclose(mine, result["boxes"][named], atol=1e-4)
    assert dropped_by_text > 0  # the text rule was exercised


@pytest.mark.parametrize("size", [(48, 64), (30, 50)])
def test_known_boxes_give_known_pixels(segmenter, monkeypatch, size):
    """Detector answers replaced by known boxes, SAM by masks that fill its boxes: the boxes SAM gets are the
    SamProcessor coordinates, and the masks come back as the boxes' pixels, united per phrase."""
    h, w = size
    pixel_boxes = {"cat": [[8, 4, 24, 20], [30, 14, 46, 28]], "bird": [[16, 18, 32, 28]]}

    def normalised(boxes):
        b = torch.tensor(boxes, dtype=torch.float32)
        return torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h, (b[:, 2] - b[:, 0]) / w,
                            (b[:, 3] - b[:, 1]) / h], dim=-1)

    answers = {  # cat: two kept, one under the box threshold; dog: one under each threshold; bird: one kept
        "cat": Grounding(normalised([*pixel_boxes["cat"], [0, 0, 10, 10]]), torch.tensor([0.9, 0.5, 0.2]),
                         torch.tensor([0.9, 0.5, 0.2])),
        "dog": Grounding(normalised([[0, 0, 20, 20], [10, 10, 30, 30]]), torch.tensor([0.9, 0.3]),
                         torch.tensor([0.1, 0.3])),
        "bird": Grounding(normalised(pixel_boxes["bird"]), torch.tensor([0.8]), torch.tensor([0.8]))}
    monkeypatch.setattr(segmenter, "boxes", lambda image, phrases: [answers[p] for p in phrases])
    calls = record_sam(monkeypatch, segmenter, fill_boxes=True)
    images = torch.ones(2, 3, h, w)
    masks = segmenter.masks(images, [["cat", "dog", "bird"], ["dog"]])

    assert len(calls) == 1  # image 2 has no box: SAM is not run
    pixels, sam_boxes = calls[0]
    new_h, new_w = sam_input_size(h, w, SAM_SIZE)
    expected = [[x0 * new_w / w, y0 * new_h / h, x1 * new_w / w, y1 * new_h / h]
                for x0, y0, x1, y1 in [*pixel_boxes["cat"], *pixel_boxes["bird"]]]
    assert torch.allclose(sam_boxes, torch.tensor(expected), atol=1e-3)
    if size == (48, 64):
        assert torch.allclose(sam_boxes[0], torch.tensor([128.0, 64.0, 384.0, 320.0]), atol=1e-3)
    content = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)  # a white image lands top-left
    assert torch.allclose(pixels[0, :, :new_h, :new_w], content.view(3, 1, 1).expand(3, new_h, new_w), atol=1e-5)
    assert not pixels[0, :, new_h:, :].any() and not pixels[0, :, :, new_w:].any()  # zero padding

    assert [tuple(m.shape) for m in masks] == [(3, h, w), (1, h, w)]
    for k, name in enumerate(["cat", "dog", "bird"]):
        want = torch.zeros(h, w, dtype=torch.bool)
        for x0, y0, x1, y1 in pixel_boxes.get(name, []):
            want[y0:y1, x0:x1] = True
        assert torch.equal(masks[0][k], want), name
    assert not masks[1].any()


def test_sam_settings_must_match_the_model(tiny_dino, tiny_sam, tmp_path):
    import shutil

    folder = tmp_path / "sam"
    shutil.copytree(tiny_sam, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "size": {"longest_edge": 512}}))
    with pytest.raises(ValueError, match="longest_edge 512 .* must match the model's input size 1024"):
        GroundedSAMSegmenter(detector=tiny_dino, sam=str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "size": 1024}))
    with pytest.raises(ValueError, match="expected size {'longest_edge': int}"):
        GroundedSAMSegmenter(detector=tiny_dino, sam=str(folder))


# --- the original packages -------------------------------------------------------------------------------------------

def test_original_backend_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_groundingdino(name, *args, **kwargs):
        if name.split(".")[0] == "groundingdino":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_groundingdino)
    with pytest.raises(ImportError, match=r'pip install "t2i-align\[grounded-sam-original\]".*CUDA extension.*torch'):
        OriginalGroundedSAMSegmenter("config.py", "grounding.pth", "sam.pth")


def test_sam_frame_matches_segment_anything():
    transforms = pytest.importorskip("segment_anything.utils.transforms",
                                     reason="segment_anything (extra grounded-sam-original) not installed")
    for h, w in [(48, 64), (30, 50), (333, 500), (1080, 1920)]:
        assert sam_input_size(h, w, 1024) == transforms.ResizeLongestSide.get_preprocess_shape(h, w, 1024)
        boxes = torch.tensor([[1.5, 2.0, w - 3.0, h - 1.0], [0.0, 0.0, w / 3, h / 2]])
        assert torch.allclose(sam_input_boxes(boxes, h, w, 1024),
                              transforms.ResizeLongestSide(1024).apply_boxes_torch(boxes, (h, w)))


def test_original_backend_end_to_end(tmp_path, monkeypatch):
    """Original SAM (random vit_b weights saved as a checkpoint) behind a stand-in Grounding DINO with known
    answers: "cat" finds one box, "dog" none."""
    inference = pytest.importorskip("groundingdino.util.inference",
                                    reason="groundingdino (extra grounded-sam-original) not installed")
    segment_anything = pytest.importorskip("segment_anything",
                                           reason="segment_anything (extra grounded-sam-original) not installed")
    tokenizer = tiny_bert_tokenizer(tmp_path)

    class StandInDino(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, samples, captions):
            logits = torch.full((len(captions), 3, 256), -5.0)
            for k, caption in enumerate(captions):
                if "cat" in caption:
                    logits[k, 0, 1] = 5.0  # [CLS] cat . [SEP]: the box names "cat"
                    logits[k, 1, 2] = 5.0  # a box that only names "."
            boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]])
            return {"pred_logits": logits, "pred_boxes": boxes.expand(len(captions), -1, -1)}

    def load_model(config_file, checkpoint, device="cuda"):
        assert (config_file, checkpoint) == ("config.py", "grounding.pth")
        return StandInDino()

    monkeypatch.setattr(inference, "load_model", load_model)
    torch.manual_seed(0)
    sam_checkpoint = tmp_path / "sam_vit_b.pth"
    torch.save(segment_anything.sam_model_registry["vit_b"]().state_dict(), sam_checkpoint)
    segmenter = OriginalGroundedSAMSegmenter("config.py", "grounding.pth", str(sam_checkpoint), sam_model_type="vit_b")
    assert isinstance(segmenter, Segmenter)
    seen = []
    predict = segmenter.predictor.predict_torch
    monkeypatch.setattr(segmenter.predictor, "predict_torch",
                        lambda *args, **kwargs: seen.append(kwargs["boxes"].clone()) or predict(*args, **kwargs))
    masks = segmenter.masks(torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0)), [["cat", "dog"]])
    assert len(seen) == 1 and torch.allclose(seen[0], torch.tensor([[256.0, 192.0, 768.0, 576.0]]), atol=1e-3)
    assert masks[0].shape == (2, 48, 64) and masks[0].dtype == torch.bool and not masks[0][1].any()
    segmenter.box_threshold = 0.999
    assert not segmenter.masks(torch.rand(1, 3, 48, 64), [["cat"]])[0].any() and len(seen) == 1


# --- the VocabularyTagger --------------------------------------------------------------------------------------------

class FakeDetector:
    """Finds the labels of ``present[i]`` in image ``i``; records every call."""

    def __init__(self, present: list[set[str]]):
        self.present, self.calls = present, []

    def found(self, images, labels):
        self.calls.append([list(lab) for lab in labels])
        return [[label in self.present[i] for label in lab] for i, lab in enumerate(labels)]


def test_vocabulary_tagger_keeps_what_the_detector_finds(tmp_path):
    vocabulary = tmp_path / "tags.txt"
    vocabulary.write_text("cat\n\n  dog \ncar\ncat\ntree\n")
    detector = FakeDetector([{"dog", "tree", "horse"}, set(), {"cat"}])
    tagger = VocabularyTagger(detector, vocabulary, chunk_size=3)
    assert isinstance(tagger, Tagger) and tagger.vocabulary == ["cat", "dog", "car", "tree"]
    assert tagger.tags(torch.rand(3, 3, 8, 8)) == [["dog", "tree"], [], ["cat"]]
    assert detector.calls == [[["cat", "dog", "car"]] * 3, [["tree"]] * 3]  # chunks, the same labels for every image
    assert VocabularyTagger(FakeDetector([{"b"}]), ["a", "b"]).tags(torch.rand(1, 3, 8, 8)) == [["b"]]


def test_vocabulary_tagger_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty_tags.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty_tags.txt has no label"):
        VocabularyTagger(FakeDetector([]), empty)
    with pytest.raises(FileNotFoundError, match="missing_tags.txt"):
        VocabularyTagger(FakeDetector([]), str(tmp_path / "missing_tags.txt"))
    binary = tmp_path / "binary_tags.txt"
    binary.write_bytes(b"\xff\xfe\x00cat")
    with pytest.raises(ValueError, match="cannot read the vocabulary file .*binary_tags.txt"):
        VocabularyTagger(FakeDetector([]), binary)
    with pytest.raises(ValueError, match="non-empty list"):
        VocabularyTagger(FakeDetector([]), [])


def test_annotation_command_runs_with_grounded_sam(tiny_dino, tiny_sam, tiny_pairs, tmp_path):
    """`python -m t2i_align.commands.annotate_masks` with the transformers Grounded-SAM (tiny models through from_pretrained):
    every noun gets a mask entry; with a threshold no box passes, every entry is null (nothing found); with every box
    kept, the (random) SAM masks are written as PNG files."""
    import json

    from t2i_align.commands.annotate_masks import main

    def annotate(out, threshold):
        main([tiny_pairs, str(out), "--limit", "3", "--segmenter", "t2i_align.experts.grounded_sam.GroundedSAMSegmenter",
              "--segmenter-args", json.dumps({"detector": tiny_dino, "sam": tiny_sam, "box_threshold": threshold,
                                              "text_threshold": threshold})])
        return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]

    records = annotate(tmp_path / "none", 1.0)
    assert len(records) == 3 and all(r["attn_list"] for r in records)
    assert all(mask is None for r in records for _, mask in r["attn_list"])
    masks = [m for r in annotate(tmp_path / "all", 0.0) for _, m in r["attn_list"] if m is not None]
    assert masks and all((tmp_path / "all" / m).is_file() for m in masks)
