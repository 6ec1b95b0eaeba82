"""BLIP VQA through transformers from a local folder: answers are per image, independent of the batch."""

import pytest
import torch

from t2i_align.experts.vqa import BlipVQA, VQAModel


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory):
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor

    from t2i_align.toyworld.experts.captioner import (
        DEC,
        build_captioner_tokenizer,
        caption_vocabulary,
        image_processor,
    )

    folder = tmp_path_factory.mktemp("blip_vqa")
    tokenizer = build_captioner_tokenizer(folder / "tok")
    ids = {w: i for i, w in enumerate(caption_vocabulary())}
    # large initial weights: a random model whose answers vary with the image and question
    text = dict(vocab_size=len(ids), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                initializer_range=1.0,
                bos_token_id=ids[DEC], eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"])
    vision = dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, initializer_range=1.0)
    torch.manual_seed(0)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)
    config.decoder_start_token_id = ids[DEC]  # BLIP VQA starts decoding from the bos token
    BlipForQuestionAnswering(config).save_pretrained(folder)
    BlipProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def test_answers_do_not_depend_on_batch_composition(tiny_vqa):
    vqa = BlipVQA(tiny_vqa, max_new_tokens=4)
    assert isinstance(vqa, VQAModel)
    torch.manual_seed(1)
    images = torch.rand(3, 3, 48, 48)  # resized to the tower's 64 px
    questions = ["is there a red circle?", "how many blue squares are there?", "is the red circle above the star?"]
    together = vqa.answer(images, questions)
    alone = [vqa.answer(images[i:i + 1], questions[i:i + 1])[0] for i in range(3)]
    assert len(set(together)) > 1  # the answers depend on the inputs, so the comparison below means something
    assert together == alone
    with pytest.raises(ValueError, match=r"BlipVQA: expected images in \[0, 1\]"):
        vqa.answer(images * 2 - 1, questions)
