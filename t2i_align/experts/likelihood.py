"""The likelihood judge of FineRewards' SAM reward: how likely is each tagged object in the scene a prompt
describes? ``judge(prompt, tags) -> list of "certain" | "may" | "unlikely"``.

:class:`CausalLMJudge` asks any transformers causal LM (FineRewards: Vicuna-7B) one question per tag, each
in a fresh context (no chat history, so an answer never depends on the tags asked before), with greedy
decoding, and parses the free-form answer with :func:`parse_likelihood`. ToyWorld's rule-based judge is
:class:`t2i_align.toyworld.sam_reward.ToyLikelihoodJudge`.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence, runtime_checkable

import torch

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


def parse_likelihood(answer: str, default: str = "may") -> str:
    """The label of the earliest recognised word of ``answer`` ("Certainly." -> certain, "It might be" ->
    may, "Unlikely" -> unlikely, "No." -> unlikely); ``default`` when none is found."""
    found = _REGEX.search(answer)
    if found is None:
        return default
    return _PATTERNS[int(found.lastgroup[1:])][0]


@runtime_checkable
class LikelihoodJudge(Protocol):
    def __call__(self, prompt: str, tags: Sequence[str]) -> list[str]:
        ...


class CausalLMJudge:
    """Args:
        pretrained: hub id or folder of a causal LM (e.g. ``lmsys/vicuna-7b-v1.5``).
        template: the question, with ``{prompt}`` and ``{tag}``.
        max_new_tokens: answer length limit.
        device, dtype: where and in what precision the LM runs.
    """

    def __init__(self, pretrained: str, template: str = DEFAULT_TEMPLATE, max_new_tokens: int = 8, device: str = "cpu",
                 dtype: str = "float32") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.template, self.max_new_tokens = template, max_new_tokens
        self.unparsed = 0  # answers with no recognised word (scored as "may")

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
                self.unparsed += 1
                label = "may"
            labels.append(label)
        return labels
