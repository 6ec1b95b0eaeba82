"""TIFA scoring on TIFA's own sample: scripted VQA answers reproduce the published sample result."""

import json
import math
import zlib

import pytest
import torch

from t2i_align.callbacks.tifa import nearest_choice, read_tifa_questions, score_answers, tifa_report
from t2i_align.experts.text_embedding import SentenceEmbedder


def number_aware_embed(texts):
    """A scripted sentence embedder: numbers lie on an arc (nearby numbers are similar), words one-hot."""
    rows = []
    for t in texts:
        v = torch.zeros(34)
        if t.strip().isdigit():
            angle = 0.3 * int(t)
            v[0], v[1] = math.cos(angle), math.sin(angle)
        else:
            v[2 + zlib.crc32(t.encode()) % 32] = 1.0
        rows.append(v / v.norm())
    return torch.stack(rows)


def test_sample_result_is_reproduced(benchmarks):
    sample = benchmarks / "tifa" / "sample"
    questions = read_tifa_questions(sample / "sample_question_answers.json")
    expected = json.loads((sample / "sample_evaluation_result.json").read_text())
    assert list(questions) == ["coco_301091", "drawbench_52"] and sum(map(len, questions.values())) == 19
    details = expected["question_details"]
    # the scripted VQA model: TIFA's recorded free-form answers
    scored = {pid: score_answers(qs, [details[pid][q.question]["free_form_vqa"] for q in qs], number_aware_embed)
              for pid, qs in questions.items()}
    for pid, qs in scored.items():
        for s in qs:
            assert s.choice == details[pid][s.question.question]["multiple_choice_vqa"]
            assert s.score == details[pid][s.question.question]["scores"]
    report = tifa_report(scored)
    assert report["tifa_average"] == pytest.approx(expected["tifa_average"])
    assert report["tifa_stdev"] == pytest.approx(expected["tifa_stdev"])
    assert report["caption_scores"] == pytest.approx(expected["caption_scores"])
    assert report["accuracy_by_type"] == pytest.approx(expected["accuracy_by_type"])


def test_nearest_choice_and_bad_files(tmp_path):
    assert nearest_choice("2", ["1", "2"], None) == "2"  # literal choices need no embedder
    assert nearest_choice("7", ["1", "6", "2"], number_aware_embed) == "6"
    assert nearest_choice("seven", ["1", "2"], None) == "seven"  # unsnapped: scores 0
    bad = tmp_path / "qa.json"
    bad.write_text(json.dumps([{"id": "a", "caption": "c", "question": "q", "choices": ["yes", "no"]}]))
    with pytest.raises(ValueError, match=r"qa.json: item 0: missing key\(s\) \['answer', 'element_type'\]"):
        read_tifa_questions(bad)
    bad.write_text(json.dumps([{"id": "a", "caption": "c", "question": "q", "choices": ["yes", "no"],
                                "answer": "maybe", "element_type": "object"}]))
    with pytest.raises(ValueError, match="answer 'maybe' is not among"):
        read_tifa_questions(bad)


def test_sentence_embedder_pools_over_real_tokens_only(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "two", "dogs", "a", "red", "circle", "on", "the", "grass"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path)
    embed = SentenceEmbedder(str(tmp_path))
    alone = embed(["two dogs"])
    batched = embed(["two dogs", "a red circle on the grass"])  # "two dogs" gets padded here
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)
