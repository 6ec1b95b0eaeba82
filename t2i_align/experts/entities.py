"""Entities of a prompt for CoMat's attribute concentration (CoMat Section 4.2, Eq. 4-5).

An entity is a noun and its attributes, ``e_i = (n_i, a_i)``, found with spaCy dependency rules.
The noun alone (never with its attributes) prompts the segmenter; the CLIP token positions of the
noun *and* its attributes are the tokens whose cross-attention the losses pull into the noun's mask.

Parsing rules of :func:`parse_entities` (``en_core_web_sm`` labels):

* **Entity nouns.** Every ``NOUN``/``PROPN`` token is an entity head unless it modifies another
  noun (``compound``/``amod``/``nummod``/``npadvmod`` whose head is a noun: then it is part of that
  noun's entity, see below) or it is an attribute of another entity (e.g. ``conj`` "gold" in "a red
  and gold car"). A ``VERB`` with the determiner "a"/"an" is taken as a noun too (the small model
  tags "rose", "acorn", "sled" as verbs in "a red rose", ...), and so is an adjective with "a"/"an"
  in a noun's place (``ROOT``/``conj``/``dobj``/``pobj``/``appos``: "square" in "a plain square").
  A colour/material/shape word, adjective or number that spaCy makes the ``nsubj`` of a noun (or of
  an attribute) after it, with only such words in between, modifies that word: "cyan" in "two big
  striped cyan triangles", "two" (subject of "striped") in "two striped triangles".
* **Compound nouns are folded into the noun**: "a fire hydrant" gives the noun "fire hydrant", so
  the segmenter is prompted with the object's full name ("stop sign", "teddy bear", "traffic
  light"; the head alone would be ambiguous or wrong). Only the contiguous run of ``compound``
  nouns right before the head is folded, and a compound that names a colour, material or shape
  (:data:`ATTRIBUTE_NOUNS`, or a token spaCy tags as an adjective, ``JJ*``) stays an attribute:
  T2I-CompBench writes textures and shapes as noun modifiers ("a leather wallet", "a glass coffee
  table" -> noun "coffee table", attribute "glass"). Words joined by hyphens without spaces
  ("t-shirt", "heart-shaped") are merged into one word first.
* **Attributes** of an entity: children of its noun tokens with dependency ``amod`` (adjectives
  and participles: "red", "wooden", "sleeping"), ``nummod`` (numbers: "two"), ``compound`` that is
  not folded, and ``nmod``/``npadvmod`` of the head that is a colour/material/shape word; then,
  recursively, ``conj`` of an attribute that is itself attribute-like ("a red and blue car" ->
  "red", "blue") and ``amod``/``npadvmod``/``compound``/``nummod`` children of an attribute (shade
  words such as "light" in "light blue" when spaCy hangs them under the colour, a count hung under
  an adjective). Adverbs (``advmod``: "very", "extremely") and determiners are not attributes,
  except an ``advmod`` of the noun or of an attribute that is an adjective or a listed quality word
  (:data:`ATTRIBUTE_NOUNS`: the small model reads "a plain red circle" as "plainly red", "a small
  striped square" as "smally striped").
* **Predicate adjectives**: an ``acomp`` (and its ``conj``) of a verb or copula is an attribute of
  the verb's ``nsubj`` noun and of the nouns conjoined with it ("the car is red", "the apple and
  the banana are yellow", "the car looks red"); in a relative clause whose subject is a relative
  pronoun, of the noun the clause modifies ("a dog that is red"). An ``acomp`` with a preposition
  is a relation and is skipped ("the apple was next to the plate"). An attribute can thus be shared
  by several entities; a token is otherwise never used twice, so repeated nouns ("a red cube and a
  blue cube") are separate entities with their own spans and positions.
* **Dropped nouns**: an entity whose head lemma (or head text, or whole noun) is in ``exclude``
  (default :data:`NON_OBJECT_NOUNS`) is dropped with all its attributes.
* Not handled (by design, kept simple): prepositional attributes ("a table made of wood" gives the
  entities "table" and "wood"; "a car of red color" loses "red" with the dropped noun "color"),
  adjectives that spaCy does not attach to the noun, and misparses of the small model (e.g.
  ``en_core_web_sm`` 3.8 parses "a fire hydrant" alone as noun "fire" + adverb "hydrant", while
  "a red fire hydrant" and "a fire hydrant and a dog" parse correctly; in ToyWorld, about 1 in 300
  of all its phrase combinations, e.g. "a striped cyan square below ..." -> noun "cyan", and "three
  striped cyan triangles above ..." -> "cyan" root with "triangles" as its apposition).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from t2i_align.diffusion.tokens import align_words

__all__ = ["ATTRIBUTE_NOUNS", "NON_OBJECT_NOUNS", "Entity", "parse_entities"]

#: Nouns that are not objects a segmenter can localise (lower-case lemmas). CoMat filters "abstract
#: (scene, atmosphere, language), difficult to identify their area (sunlight, noise, place), or
#: describe the background (morning, bathroom, party)" (Section 4.2); room and sky come from its public
#: code's list (CaraJ7/CoMat, attr_concen_utils/gsam_interface.py, update_nouns_attributes), which also
#: drops segmentable "stuff" (grass, water, snow, wall, street, mountain, sea, ...); those are kept here,
#: since prompts give them attributes ("green grass"). Groups:
NON_OBJECT_NOUNS: frozenset[str] = frozenset(
    # abstract, and words about the picture itself rather than something in it
    {"scene", "atmosphere", "language", "style", "mood", "concept", "idea", "dream", "emotion", "feeling",
     "beauty", "theme", "color", "colour", "shape", "texture", "size", "kind", "type", "photo",
     "photograph", "image", "view"}
    # hard to localise. Not "light": "traffic light" and "street light" are objects (a compound
    # noun is excluded only if its head is, see parse_entities).
    | {"sunlight", "moonlight", "lighting", "noise", "sound", "music", "smell", "air", "wind", "place",
       "space", "area", "surface", "shadow"}
    # background and time
    | {"background", "sky", "room", "bathroom", "kitchen", "party", "environment", "landscape",
       "scenery", "morning", "afternoon", "evening", "night", "day", "sunset", "sunrise", "time"}
    # relative positions of the spatial prompts ("on the left of", "on side of") and placeholders
    | {"left", "right", "top", "bottom", "side", "front", "middle", "center", "centre", "one", "thing",
       "lot", "group", "pair"}
)

#: Words that describe another noun's colour, material, texture or shape but that the small model may
#: tag as nouns (a ``compound``: "a leather wallet", "a gold clock", "an oval table", "a cyan circle") or
#: as adverbs (an ``advmod``: "plain" in "a plain red circle", read as "plainly red"): kept as attributes
#: instead of being folded into the noun or dropped (lower-case lemmas). ToyWorld's colour and texture
#: words are all here (tests/experts/test_entities.py checks every one of them).
ATTRIBUTE_NOUNS: frozenset[str] = frozenset(
    # colours the small model tags as nouns ("cyan" as a proper noun)
    {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
     "grey", "gold", "silver", "bronze", "violet", "beige", "turquoise", "teal", "maroon", "navy", "cyan",
     "magenta", "tan"}
    # materials and textures (T2I-CompBench's texture category; ToyWorld's "plain" and "striped")
    | {"leather", "rubber", "glass", "fabric", "plastic", "metal", "wood", "wooden", "paper", "stone",
       "steel", "iron", "copper", "cotton", "wool", "silk", "velvet", "denim", "ceramic", "porcelain",
       "marble", "brick", "concrete", "crystal", "diamond", "plain", "striped"}
    # shapes (T2I-CompBench's shape category)
    | {"oval", "round", "square", "circle", "circular", "triangle", "triangular", "rectangle",
       "rectangular", "cube", "cubic", "sphere", "spherical", "cylinder", "cylindrical", "cone",
       "conical", "pyramid", "pyramidal", "pentagonal", "hexagonal", "octagonal", "oblong", "teardrop",
       "star", "heart", "crescent"}
)

_NOUN_POS = frozenset({"NOUN", "PROPN"})
# Dependencies by which a noun modifies another noun (and so heads no entity of its own). Not
# ``nmod``: the small model mostly uses it for the first noun of misparsed coordinations ("a red apple
# and yellow bananas" -> apple nmod-> bananas), which is an object of its own.
_NOUN_MODIFIER_DEPS = frozenset({"compound", "amod", "nummod", "npadvmod"})
_ATTR_DEPS = frozenset({"amod", "nummod"})
# Children of an attribute that belong to it ("light" in "light blue", "pale" in "pale pink", "three"
# hung under "striped" in "three striped cyan triangles").
_ATTR_CHILD_DEPS = frozenset({"amod", "npadvmod", "compound", "nummod"})
_RELATIVE_TAGS = frozenset({"WDT", "WP"})
# Roles of a noun phrase's head in which an adjective with "a"/"an" can only be a mistagged noun.
_NOMINAL_DEPS = frozenset({"ROOT", "conj", "dobj", "pobj", "appos"})

Span = tuple[int, int]


@dataclass(frozen=True)
class Entity:
    """A noun of the prompt with its attributes.

    ``noun`` and ``attributes`` are the text as it appears in the prompt (case kept) and the spans
    are character spans into the prompt. ``noun_positions`` / ``positions`` are positions in the
    padded ``model_max_length``-long CLIP input (0 = start token), empty without a tokenizer;
    pieces past the 77-token limit are left out, so a fully truncated entity has no positions.
    """

    noun: str
    noun_span: Span
    attributes: tuple[str, ...] = ()
    attribute_spans: tuple[Span, ...] = ()
    noun_positions: tuple[int, ...] = ()
    positions: tuple[int, ...] = ()  # noun + attributes, sorted, no duplicates


def parse_entities(
    prompt: str, nlp: Any, tokenizer: Any = None, exclude: Iterable[str] = NON_OBJECT_NOUNS
) -> list[Entity]:
    """The entities (noun + attributes) of ``prompt``, in prompt order (rules in the module docstring).

    Args:
        prompt: the text prompt, as given to the text encoder.
        nlp: a spaCy pipeline with a tagger, lemmatizer and dependency parser
            (``t2i_align.diffusion.tokens.load_spacy("en_core_web_sm")``).
        tokenizer: a CLIP tokenizer; when given, ``noun_positions`` and ``positions`` are filled with
            :func:`t2i_align.diffusion.tokens.align_words` on the entities' character spans (all
            pieces of multi-piece words, a position is never used for two different words,
            77-token truncation respected).
        exclude: lower-case nouns whose entities are dropped (default :data:`NON_OBJECT_NOUNS`).

    Returns:
        One :class:`Entity` per kept noun, sorted by the noun's position in the prompt.
    """
    exclude = frozenset(w.lower() for w in exclude)
    doc = _merge_hyphenated(nlp(prompt))
    predicates = _predicate_attributes(doc)

    # Candidate heads with their noun tokens and attributes; then drop the candidates that are an
    # attribute of another one ("gold" in "a red and gold car") and the excluded nouns.
    candidates = []
    for head in doc:
        if not _is_noun(head) or _modifies_noun(head):
            continue
        noun = _fold_compounds(head)
        attrs = _attributes(head, noun) + predicates.get(head.i, [])
        attrs = sorted({t.i: t for t in attrs if t not in noun}.values(), key=lambda t: t.i)
        candidates.append((head, noun, attrs))
    claimed = {t.i for _, _, attrs in candidates for t in attrs}
    found = [(noun, attrs) for head, noun, attrs in candidates
             if head.i not in claimed and not _excluded(head, noun, exclude)]
    # a word is never both (part of) a kept noun and an attribute, so the spans never overlap
    in_nouns = {t.i for noun, _ in found for t in noun}
    found = [(noun, [t for t in attrs if t.i not in in_nouns]) for noun, attrs in found]

    noun_spans = [(noun[0].idx, noun[-1].idx + len(noun[-1].text)) for noun, _ in found]
    attr_spans = [[(t.idx, t.idx + len(t.text)) for t in attrs] for _, attrs in found]
    positions: dict[Span, tuple[int, ...]] = {}
    if tokenizer is not None:
        spans = sorted(set(noun_spans).union(*attr_spans))
        positions = {(w.start, w.end): w.positions for w in align_words(prompt, tokenizer, spans=spans)}

    entities = []
    for n_span, a_spans in zip(noun_spans, attr_spans):
        noun_pos = positions.get(n_span, ())
        all_pos = set(noun_pos).union(*(positions.get(s, ()) for s in a_spans))
        entities.append(
            Entity(
                noun=prompt[n_span[0] : n_span[1]],
                noun_span=n_span,
                attributes=tuple(prompt[s:e] for s, e in a_spans),
                attribute_spans=tuple(a_spans),
                noun_positions=noun_pos,
                positions=tuple(sorted(all_pos)),
            )
        )
    return entities


# --- internals ----------------------------------------------------------------------------------


def _merge_hyphenated(doc: Any) -> Any:
    """Merge words joined by hyphens without spaces ("t-shirt", "heart-shaped") into one token; the
    merged token keeps the syntactic role of the span's root (spaCy's ``retokenize`` default)."""
    runs, i = [], 0
    while i < len(doc):
        j = i
        # extend the run over "-" + word while no whitespace separates them
        while (j + 2 < len(doc) and doc[j + 1].text == "-" and not doc[j].whitespace_
               and not doc[j + 1].whitespace_ and not doc[j + 2].is_punct):
            j += 2
        if j > i:
            runs.append(doc[i : j + 1])
        i = j + 1
    if runs:
        with doc.retokenize() as retokenizer:
            for span in runs:
                retokenizer.merge(span)
    return doc


def _listed(tok: Any) -> bool:
    return tok.lemma_.lower() in ATTRIBUTE_NOUNS or tok.text.lower() in ATTRIBUTE_NOUNS


def _attribute_word(tok: Any, participles: bool = True) -> bool:
    """True if ``tok`` names a quality: adjective, number, colour/material/shape noun, and (if
    ``participles``) participle ("striped")."""
    return (tok.pos_ in ("ADJ", "NUM") or tok.tag_.startswith("JJ")
            or (participles and tok.tag_ in ("VBN", "VBG")) or _listed(tok))


def _quality_adverb(tok: Any) -> bool:
    """An ``advmod`` that names a quality: an adjective ("small" in "a small striped square") or a listed
    word ("plain" in "a plain red circle"), unlike the adverbs "very", "extremely"."""
    return tok.dep_ == "advmod" and _attribute_word(tok, participles=False)


def _is_noun(tok: Any) -> bool:
    """A noun, or a verb with an indefinite article: the small model tags some nouns as verbs ("a red
    rose", "a green acorn", "a blue sled"), and no verb takes "a"/"an" as its determiner; or an
    adjective with "a"/"an" in a noun's place (root, conjunct, object: "a plain square"). Other
    adjectives with "a" are not repaired: there the noun is usually lost elsewhere, as in "a white rose"
    -> "white" subject of the verb "rose"."""
    if tok.pos_ in _NOUN_POS:
        return True
    nominal = tok.pos_ == "VERB" or (tok.pos_ == "ADJ" and tok.dep_ in _NOMINAL_DEPS)
    return nominal and any(c.dep_ == "det" and c.lower_ in ("a", "an") for c in tok.children)


def _subject_modifier(tok: Any) -> bool:
    """A quality word parsed as the subject of a word after it with only quality words in between, as if
    that word were a verb ("cyan" -> "triangles" in "two big striped cyan triangles", "two" -> "striped"
    in "two striped cyan triangles"): a modifier of that word (noun or attribute)."""
    head = tok.head
    return (tok.dep_ == "nsubj" and tok.i < head.i and _attribute_word(tok, participles=False)
            and all(_attribute_word(t) for t in tok.doc[tok.i + 1 : head.i]))


def _modifies_noun(tok: Any) -> bool:
    return tok.head is not tok and _is_noun(tok.head) and (
        tok.dep_ in _NOUN_MODIFIER_DEPS or _subject_modifier(tok))


def _fold_compounds(head: Any) -> list[Any]:
    """The head noun plus the contiguous ``compound`` nouns right before it that name the object."""
    tokens = [head]
    i = head.i - 1
    while i >= 0:
        tok = head.doc[i]
        if (tok.dep_ != "compound" or tok.head not in tokens or tok.pos_ not in _NOUN_POS
                or _attribute_word(tok, participles=False)):  # "dining table" stays one noun
            break
        tokens.insert(0, tok)
        i -= 1
    return tokens


def _excluded(head: Any, noun: list[Any], exclude: frozenset[str]) -> bool:
    phrase = " ".join(t.text.lower() for t in noun)
    return head.lemma_.lower() in exclude or head.text.lower() in exclude or phrase in exclude


def _attributes(head: Any, noun: list[Any]) -> list[Any]:
    """Modifiers of the noun tokens (see the module docstring), expanded over conjuncts."""
    direct = []
    for tok in noun:
        for child in tok.children:
            if child in noun:
                continue
            modifier = (child.dep_ in _ATTR_DEPS or child.dep_ == "compound" or _quality_adverb(child)
                        or _subject_modifier(child))
            # nmod/npadvmod only when it names a quality ("rubber" in a misparsed "a rubber eraser")
            quality = tok is head and child.dep_ in ("nmod", "npadvmod") and _attribute_word(child)
            if modifier or quality:
                direct.append(child)
    return _expand(direct)


def _expand(attrs: list[Any]) -> list[Any]:
    """Add conjuncts of attribute words ("red and blue") and modifiers of attributes ("light" blue)."""
    out, stack = [], list(attrs)
    while stack:
        tok = stack.pop()
        if tok in out:
            continue
        out.append(tok)
        for child in tok.children:
            if ((child.dep_ == "conj" and _attribute_word(child)) or child.dep_ in _ATTR_CHILD_DEPS
                    or _quality_adverb(child) or _subject_modifier(child)):
                stack.append(child)
    return out


def _predicate_attributes(doc: Any) -> dict[int, list[Any]]:
    """Predicate adjectives (``acomp`` of a verb/copula) by the index of the subject noun(s)."""
    out: dict[int, list[Any]] = {}
    for verb in doc:
        # an acomp with a preposition is a relation, not a quality ("the apple was next to the plate")
        acomps = [c for c in verb.children if c.dep_ == "acomp" and not any(g.dep_ == "prep" for g in c.children)]
        subjects = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")]
        if not acomps or not subjects:
            continue
        nouns = []
        for subj in subjects:
            if subj.tag_ in _RELATIVE_TAGS and verb.dep_ == "relcl":  # "a dog that is red"
                subj = verb.head
            if subj.pos_ not in _NOUN_POS:
                continue
            nouns.append(subj)
            nouns.extend(c for c in subj.conjuncts if c.pos_ in _NOUN_POS)  # "the apple and the banana"
        for noun in nouns:
            out.setdefault(noun.i, []).extend(_expand(acomps))
    return out
