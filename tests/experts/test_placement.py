"""Experts follow the module's device (issue 27): every expert that holds models moves all of them with ``.to(device)``
(so :class:`FrozenExperts` moves them when fit, validate, test or predict start, on every rank), composites move their
parts, frozen experts stay in eval mode, and the ReFL benchmark moves its reward with the module.

Models are tiny random ones built from small configs and saved like real checkpoints; they are moved to the ``meta``
device, which every tensor can go to and none starts on."""

import importlib
import importlib.util
import inspect
import itertools
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from t2i_align.lightning_modules.base import AlignmentModule, FrozenExperts
from tests.experts.test_grounded_sam import tiny_dino, tiny_sam  # noqa: F401  (fixtures)
from tests.helpers import REPO_ROOT, save_tiny_captioner

META = torch.device("meta")
DINO_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "cat", "dog"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_moved(expert, models: list[torch.nn.Module], device: torch.device = META) -> None:
    """``FrozenExperts(expert=expert).to(device)`` puts every parameter and buffer of ``models`` (the models the
    expert holds, named explicitly so that a model the expert does not register still counts) on ``device``; they
    stay frozen and in eval mode, also when a surrounding module switches to training."""
    def devices() -> list[str]:  # read again after the move: a move to meta replaces the parameters
        return [t.device.type for m in models for t in itertools.chain(m.parameters(), m.buffers())]

    assert devices() and set(devices()) == {"cpu"}  # loaded on the CPU by default
    assert FrozenExperts(expert=expert).to(device)["expert"] is expert
    assert set(devices()) == {device.type}
    assert not any(p.requires_grad for m in models for p in m.parameters())
    torch.nn.Sequential(expert).train()  # a frozen expert stays in eval mode (dropout off)
    assert not any(sub.training for m in models for sub in m.modules())


# --- tiny models --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    return save_tiny_captioner(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory) -> str:
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor

    from t2i_align.toyworld.experts.captioner import (
        DEC,
        build_captioner_tokenizer,
        caption_vocabulary,
        image_processor,
    )

    folder = tmp_path_factory.mktemp("blip_vqa")
    ids = {w: i for i, w in enumerate(caption_vocabulary())}
    text = dict(vocab_size=len(ids), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                bos_token_id=ids[DEC], eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"])
    vision = dict(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=16,
                                        image_text_hidden_size=16)).save_pretrained(folder)
    BlipProcessor(image_processor=image_processor(), tokenizer=build_captioner_tokenizer(folder / "tok")
                  ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_owl(tmp_path_factory) -> str:
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection

    from t2i_align.diffusion.tiny import TINY_TOKENIZER_DIR

    folder = tmp_path_factory.mktemp("owlv2")
    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    config = Owlv2Config(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=16)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(DINO_WORDS)}).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(DINO_WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_spacy(monkeypatch):
    """CaptionNounTagger without a spaCy model installed: placement does not parse captions."""
    monkeypatch.setattr("t2i_align.diffusion.tokens.load_spacy", lambda name: object())


# --- each expert moves every model it holds ----------------------------------------------------------------------

def test_caption_noun_tagger(tiny_blip, no_spacy):
    from t2i_align.experts.tagger import CaptionNounTagger

    tagger = CaptionNounTagger(tiny_blip)
    assert_moved(tagger, [tagger.model])


def test_causal_lm_judge(tiny_lm):
    from t2i_align.experts.likelihood import CausalLMJudge

    judge = CausalLMJudge(tiny_lm)
    assert_moved(judge, [judge.model])


def test_grounded_sam(tiny_dino, tiny_sam):
    from t2i_align.experts.grounded_sam import GroundedSAMSegmenter

    segmenter = GroundedSAMSegmenter(detector=tiny_dino, sam=tiny_sam)
    assert_moved(segmenter, [segmenter.detector, segmenter.sam])


def test_original_grounded_sam(monkeypatch):
    """Stand-ins for the original packages (not installed here): their loaders build small modules."""
    from t2i_align.experts.grounded_sam import OriginalGroundedSAMSegmenter

    class StandInSam(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder = torch.nn.Linear(2, 2)
            self.register_buffer("pixel_mean", torch.zeros(3))

    class SamPredictor:  # segment_anything's holds the model and reads its device from it
        def __init__(self, model):
            self.model = model

    packages = {name: types.ModuleType(name) for name in
                ("groundingdino", "groundingdino.util", "groundingdino.util.inference", "segment_anything")}
    packages["groundingdino.util.inference"].load_model = lambda config, checkpoint, device="cuda": torch.nn.Linear(3, 3)
    packages["segment_anything"].SamPredictor = SamPredictor
    packages["segment_anything"].sam_model_registry = {"vit_b": lambda checkpoint: StandInSam()}
    for name, package in packages.items():
        monkeypatch.setitem(sys.modules, name, package)
    segmenter = OriginalGroundedSAMSegmenter("config.py", "grounding.pth", "sam.pth", sam_model_type="vit_b")
    assert_moved(segmenter, [segmenter.detector, segmenter.predictor.model])
    assert segmenter.device == META  # where boxes() and segment() send the images


def test_blip_vqa(tiny_vqa):
    from t2i_align.experts.vqa import BlipVQA

    vqa = BlipVQA(tiny_vqa)
    assert_moved(vqa, [vqa.model])


def test_owlv2_detector(tiny_owl):
    from t2i_align.experts.detector import OwlV2Detector

    detector = OwlV2Detector(tiny_owl)
    assert_moved(detector, [detector.model])


def test_sentence_embedder(tiny_bert):
    from t2i_align.experts.text_embedding import SentenceEmbedder

    embed = SentenceEmbedder(tiny_bert)
    assert_moved(embed, [embed.model])


# --- composites move their parts ---------------------------------------------------------------------------------

class RecordingPart:
    """A part that is not a module but has its own ``to`` (a third-party expert)."""

    def __init__(self):
        self.moved_to = []

    def to(self, device):
        self.moved_to.append(device)
        return self

    def found(self, images, labels):
        return [[False] * len(lab) for lab in labels]

    def tags(self, images):
        return [[] for _ in images]

    def __call__(self, prompt, tags):
        return ["may"] * len(tags)


def test_vocabulary_tagger_moves_its_detector(tiny_owl):
    from t2i_align.experts.detector import OwlV2Detector
    from t2i_align.experts.vocabulary_tagger import VocabularyTagger

    tagger = VocabularyTagger(OwlV2Detector(tiny_owl), ["cat", "dog"])
    assert_moved(tagger, [tagger.detector.model])
    plain = RecordingPart()
    FrozenExperts(tagger=VocabularyTagger(plain, ["cat"])).to(META)
    assert plain.moved_to == [META]


def test_sam_reward_moves_tagger_and_judge(tiny_blip, tiny_lm, no_spacy):
    from t2i_align.experts.likelihood import CausalLMJudge
    from t2i_align.experts.tagger import CaptionNounTagger
    from t2i_align.rewards import SAMReward, WeightedSum

    reward = SAMReward(CaptionNounTagger(tiny_blip), CausalLMJudge(tiny_lm))
    assert_moved(reward, [reward.tagger.model, reward.judge.model])
    nested = WeightedSum({"sam": SAMReward(CaptionNounTagger(tiny_blip), CausalLMJudge(tiny_lm))})
    assert_moved(nested, [nested.rewards["sam"].tagger.model, nested.rewards["sam"].judge.model])
    tagger, judge = RecordingPart(), RecordingPart()
    FrozenExperts(reward=SAMReward(tagger, judge)).to(META)
    assert tagger.moved_to == judge.moved_to == [META]


def test_model_free_toy_experts_answer_to():
    """ToyWorld's experts hold no model: ``to`` moves nothing, so every expert can be moved the same way."""
    from t2i_align.rewards import SAMReward
    from t2i_align.toyworld.experts.sam_reward import ToyLikelihoodJudge, ToyTagger
    from t2i_align.toyworld.experts.segmenter import ToyDetector, ToySegmenter
    from t2i_align.toyworld.experts.vqa import ToyVQA

    experts = [ToyTagger(), ToyLikelihoodJudge(), ToySegmenter(), ToyDetector(), ToyVQA()]
    assert all(expert.to(META) is expert for expert in experts)
    FrozenExperts(reward=SAMReward(ToyTagger(), ToyLikelihoodJudge()), tagger=ToyTagger()).to(META)


EXPERT_METHODS = ("tags", "masks", "found", "answer", "log_likelihood", "describe", "score")
EXPERT_MODULES = [*(f"t2i_align.experts.{p.stem}" for p in Path(REPO_ROOT, "t2i_align", "experts").glob("*.py")),
                  *(f"t2i_align.rewards.{p.stem}" for p in Path(REPO_ROOT, "t2i_align", "rewards").glob("*.py")),
                  "t2i_align.toyworld.experts.sam_reward", "t2i_align.toyworld.experts.segmenter",
                  "t2i_align.toyworld.experts.vqa", "t2i_align.toyworld.experts.judge_reward"]


def test_every_expert_class_can_be_moved():
    """Every class that answers an expert interface (or embeds text) has ``to``: FrozenExperts moves it; one that
    loads models is an ExpertModule (frozen, eval) or another nn.Module."""
    checked = []
    for name in EXPERT_MODULES:
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or cls_name.startswith("_") or getattr(cls, "_is_protocol", False):
                continue
            if any(hasattr(cls, m) for m in EXPERT_METHODS) or cls_name.endswith("Embedder"):
                checked.append(cls_name)
                assert callable(getattr(cls, "to", None)), f"{name}.{cls_name} has no to(device)"
                if "from_pretrained(" in inspect.getsource(cls):
                    assert issubclass(cls, torch.nn.Module), f"{name}.{cls_name} loads models but is no nn.Module"
    assert {"CaptionNounTagger", "CausalLMJudge", "GroundedSAMSegmenter", "BlipVQA", "OwlV2Detector",
            "SentenceEmbedder", "VocabularyTagger", "SAMReward", "ToyTagger"} <= set(checked)


# --- the module moves its experts --------------------------------------------------------------------------------

@pytest.fixture
def module(monkeypatch, tiny_blip, no_spacy):
    """An AlignmentModule whose generator is a stand-in layer, with a real expert and a recording one."""
    from t2i_align.experts.tagger import CaptionNounTagger
    from t2i_align.lightning_modules import base

    monkeypatch.setattr(base, "Generator", lambda config: torch.nn.Linear(1, 1))
    module = AlignmentModule(generator=None)
    module.experts = FrozenExperts(tagger=CaptionNounTagger(tiny_blip), recorder=RecordingPart())
    return module


@pytest.mark.parametrize("hook", ["on_validation_start", "on_test_start", "on_predict_start"])
def test_module_moves_its_experts_to_its_device(module, hook):
    module.to(META)  # the device Lightning gives the rank
    assert module.device == META
    getattr(module, hook)()
    assert module.experts["recorder"].moved_to == [META]
    tagger = module.experts["tagger"].model
    assert {p.device.type for p in itertools.chain(tagger.parameters(), tagger.buffers())} == {"meta"}


def test_validate_moves_the_experts(module, tmp_path):
    """Through Lightning: the hook runs with the rank's device."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    data = torch.utils.data.DataLoader([{"prompts": ["a red circle"]}], batch_size=None)
    trainer.validate(module, data, verbose=False)
    assert module.experts["recorder"].moved_to == [torch.device("cpu")]


# --- the benchmarks ------------------------------------------------------------------------------------------------

def test_refl_benchmark_moves_the_reward_with_the_module(monkeypatch):
    """refl_step.py trains without a Trainer: it moves the experts itself (the reward is no child of the module)."""
    from t2i_align.lightning_modules.refl import ReFL

    class Placed(Exception):
        pass

    def refl_loss(self, prompts, gen):
        reward = self.experts["reward"]
        raise Placed({t.device.type for t in itertools.chain(reward.parameters(), reward.buffers())})

    monkeypatch.setattr(ReFL, "refl_loss", refl_loss)
    path = Path(REPO_ROOT) / "experiments" / "benchmarks" / "refl_step.py"
    spec = importlib.util.spec_from_file_location("refl_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(Placed) as placed:
        script.main(["--device", "meta", "--steps", "1"])
    assert placed.value.args[0] == {"meta"}
