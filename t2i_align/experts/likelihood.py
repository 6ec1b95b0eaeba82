"""The likelihood judge of FineRewards' SAM reward and RealignDiff's fine stage: how likely is each tagged object
in the scene a prompt describes? ``judge(prompt, tags) -> list of "certain" | "may" | "unlikely"``. The fine stage
also asks for each tag's local description, the prompt's words for it with their attributes (RealignDiff, Fig. 3):
``judge.describe(prompt, tags) -> list of str | None`` (None: the prompt does not name it).

:class:`CausalLMJudge` asks any transformers causal LM (FineRewards: Vicuna-7B; RealignDiff: GPT-4) one question
per tag, each in a fresh context (no chat history, so an answer never depends on the tags asked before), with greedy
decoding, and parses the free-form answer (:func:`parse_likelihood`, :func:`parse_description`); an answer it
cannot parse is reported in a warning naming the question and the answer, and counted. ToyWorld's rule-based judge
is :class:`t2i_align.toyworld.experts.sam_reward.ToyLikelihoodJudge`.
"""

from __future__ import annotations

import re
import warnings
from typing import Protocol, Sequence, runtime_checkable

import torch

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.diffusion.tokens import phrase_pattern
from t2i_align.experts.base import ExpertModule

LABELS = ("certain", "may", "unlikely")

# Word stems in the order they are tried at each position: the uncertain phrases that contain a negation
# ("not sure") before the negations ("not"), "unlikely" before "likely".
_PATTERNS = [
    ("may", r"not\s+sure|not\s+certain|uncertain|unsure"),
    ("unlikely", r"unlikely|improbable|impossible|not\s+likely|not\s+present|no\b|not\b|absent"),
    ("may", r"may\b|maybe|might|possibl[ey]|perhaps|likely|could|probabl[ey]"),
    ("certain", r"certain(ly)?|definitely|sure(ly)?|yes\b|absolutely|must"),
]
_REGEX = re.compile("|".join(f"(?P<g{i}>{pattern})" for i, (_, pattern) in enumerate(_PATTERNS)), re.IGNORECASE)

DEFAULT_TEMPLATE = (
    'A picture was generated for the description: "{prompt}".\n'
    'Is the object "{tag}" likely to be in this picture? Answer with one word: certain, may, or unlikely.\n'
    "Answer:"
)
# RealignDiff's Fig. 3 asks for all tags at once and a JSON answer; one tag per fresh context keeps small LMs usable
DESCRIBE_TEMPLATE = (
    'A picture was generated for the description: "{prompt}".\n'
    'An object detector found "{tag}" in the picture. Copy the words of the description that describe this object, '
    'with their attributes, or answer none if the description does not mention it.\n'
    "Answer:"
)


def parse_likelihood(answer: str, default: str = "may") -> str:
    """The label of the earliest recognised word of ``answer`` ("Certainly." -> certain, "It might be" ->
    may, "Unlikely" -> unlikely, "No." -> unlikely); ``default`` when none is found."""
    found = _REGEX.search(answer)
    if found is None:
        return default
    return _PATTERNS[int(found.lastgroup[1:])][0]


def parse_description(answer: str, prompt: str) -> str | None:
    """The words of ``prompt`` that ``answer``'s first line quotes (case-insensitive, on word boundaries; quotes,
    a leading article and end punctuation ignored), as the prompt spells them; "" when the answer is "none";
    None when the answer cannot be read as a part of the prompt."""
    line = (answer.strip().splitlines() or [""])[0].strip().strip("\"'`.,;:!").strip()
    if line.lower() in ("none", "no", "n/a", ""):
        return ""
    for text in (re.sub(r"^(a|an|the)\s+", "", line, flags=re.IGNORECASE), line):
        found = phrase_pattern(text.split()).search(prompt) if text.split() else None
        if found:
            return found.group(0)
    return None


@runtime_checkable
class LikelihoodJudge(Protocol):
    def __call__(self, prompt: str, tags: Sequence[str]) -> list[str]:
        ...


@runtime_checkable
class LocalJudge(LikelihoodJudge, Protocol):
    """The fine stage's judge: the likelihood labels and each tag's local description."""

    def describe(self, prompt: str, tags: Sequence[str]) -> list[str | None]:
        ...


class CausalLMJudge(ExpertModule):
    """A transformers causal LM as the likelihood judge and the local describer.

    Args:
        pretrained: hub id or folder of a causal LM (e.g. ``lmsys/vicuna-7b-v1.5``).
        template: the likelihood question, with ``{prompt}`` and ``{tag}``.
        describe_template: the local-description question (the fine stage), with ``{prompt}`` and ``{tag}``.
        max_new_tokens: answer length limit.
        device: where the LM is loaded; a method moves it to the module's device when fit, validate, test or predict
            start (:class:`~t2i_align.experts.base.ExpertModule`).
        dtype: the LM's weight dtype.
    """

    def __init__(self, pretrained: str, template: str = DEFAULT_TEMPLATE, describe_template: str = DESCRIBE_TEMPLATE,
                 max_new_tokens: int = 16, device: str = "cpu", dtype: str = "float32") -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        pretrained = resolve_pretrained(pretrained, "language model")
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.template, self.describe_template, self.max_new_tokens = template, describe_template, max_new_tokens
        self.unparsed = 0  # answers that could not be parsed (a label: "may"; a description: None)

    @torch.no_grad()
    def answer(self, question: str) -> str:
        """Greedy answer to one question in its own context."""
        ids = self.tokenizer(question, return_tensors="pt").to(self.model.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)

    def __call__(self, prompt: str, tags: Sequence[str]) -> list[str]:
        labels = []
        for tag in tags:
            text = self.answer(self.template.format(prompt=prompt, tag=tag))
            label = parse_likelihood(text, default="")
            if not label:
                self._unparsed(f"likelihood of {tag!r} for {prompt!r}", text, 'scored as "may"')
                label = "may"
            labels.append(label)
        return labels

    def describe(self, prompt: str, tags: Sequence[str]) -> list[str | None]:
        """Each tag's local description: the prompt's words for it, None when the prompt does not name it."""
        out = []
        for tag in tags:
            text = self.answer(self.describe_template.format(prompt=prompt, tag=tag))
            words = parse_description(text, prompt)
            if words is None:
                self._unparsed(f"description of {tag!r} for {prompt!r}", text, "no description (the words are not "
                               "in the prompt)")
            out.append(words or None)
        return out

    def _unparsed(self, question: str, answer: str, outcome: str) -> None:
        self.unparsed += 1
        warnings.warn(f"CausalLMJudge: cannot parse the answer to the {question}: {answer!r}; {outcome}", stacklevel=3)
