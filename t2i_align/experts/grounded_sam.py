"""Grounded-SAM behind the :class:`~t2i_align.experts.segmenter.Segmenter` interface: Grounding DINO finds the boxes a
phrase names, SAM segments each box, and a phrase's mask is the union of its instances (TokenCompose's and CoMat's
segmentation expert).

Two builds share the geometry below (threshold rule, box conversion, union, empty mask):
:class:`GroundedSAMSegmenter` on transformers (``GroundingDinoForObjectDetection`` + ``SamModel``) and
:class:`OriginalGroundedSAMSegmenter` on the original ``groundingdino`` and ``segment_anything`` packages. Images stay
float tensors end to end: resized and normalised here, never through PIL or uint8. transformers' image
processors are not used because their fast versions need torchvision; the sizes, mean and std come from each model's
``preprocessor_config.json`` and the geometry reproduces ``SamProcessor`` / ``SamImageProcessor.post_process_masks``.
"""

from __future__ import annotations

import inspect
import itertools
import json
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.experts.base import ExpertModule, check_images

# Thresholds: the values of Grounding DINO's README ("Running with Python": BOX_TRESHOLD = 0.35, TEXT_TRESHOLD = 0.25;
# IDEA-Research/GroundingDINO). Grounded-Segment-Anything's grounded_sam_demo.py defaults to --box_threshold 0.3
# --text_threshold 0.25.
BOX_THRESHOLD = 0.35
TEXT_THRESHOLD = 0.25
MASK_THRESHOLD = 0.0  # SAM's mask logit threshold (Sam.mask_threshold, SamImageProcessor.post_process_masks)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the original Grounding DINO transform (groundingdino.util.inference)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Grounding(NamedTuple):
    """Grounding DINO's raw answer for one phrase: ``boxes`` ``Q x 4`` normalised (cx, cy, w, h) in [0, 1] of the
    image; ``scores`` each box's best token probability (sigmoid); ``phrase_scores`` its best probability over the
    phrase's own tokens (not [CLS], [SEP], padding or the appended ".")."""

    boxes: torch.Tensor
    scores: torch.Tensor
    phrase_scores: torch.Tensor


def grounding_caption(phrase: str) -> str:
    """Grounding DINO's text for a phrase: lower case, single spaces, ending with "." (as its demo and transformers'
    ``GroundingDinoProcessor`` prepare labels)."""
    text = " ".join(phrase.lower().split())
    return text if text.endswith(".") else text + "."


def phrase_token_mask(input_ids: torch.Tensor, special_ids: Sequence[int], period_id: int | None,
                      width: int) -> torch.Tensor:
    """Bool mask over the ``width`` logit columns: True at the phrase's own tokens of ``input_ids`` (one caption),
    False at ``special_ids`` (see :func:`non_phrase_ids`), at the caption's final "." and beyond the text."""
    ids = input_ids[:width]
    mask = ~torch.isin(ids, torch.as_tensor(list(special_ids), dtype=ids.dtype, device=ids.device))
    words = mask.nonzero().flatten()
    if period_id is not None and len(words) and ids[words[-1]] == period_id:
        mask[words[-1]] = False
    return F.pad(mask, (0, width - len(mask)), value=False)


def non_phrase_ids(tokenizer) -> list[int]:
    """Token ids that are never part of a phrase: the tokenizer's special tokens ([CLS], [SEP], [PAD], ...) except
    [UNK], which stands for a word of the phrase."""
    return [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id]


def grounding_from_logits(logits: torch.Tensor, boxes: torch.Tensor, token_mask: torch.Tensor) -> Grounding:
    """One caption's ``Q x T`` token logits and ``Q x 4`` boxes -> :class:`Grounding` (``token_mask``: the phrase's
    columns, see :func:`phrase_token_mask`)."""
    probs = logits.float().sigmoid()
    phrase = probs.masked_fill(~token_mask.to(probs.device), 0.0)
    return Grounding(boxes.float(), probs.max(-1).values, phrase.max(-1).values)


def kept_boxes(grounding: Grounding, box_threshold: float, text_threshold: float) -> torch.Tensor:
    """The boxes of a phrase: best token probability > ``box_threshold`` (Grounding DINO's and transformers'
    ``post_process_grounded_object_detection`` rule) and some token of the phrase itself > ``text_threshold``.

    The second rule is the text threshold as both apply it, read for one phrase per caption: there it only selects the
    tokens that label a box, so a box none of whose phrase tokens passes would get an empty label (or only "[SEP]"/"."):
    it is not a detection of the phrase. Neither library drops such a box itself; with ``box_threshold`` above
    ``text_threshold`` this only removes boxes whose best token is a special token or the final "."."""
    keep = (grounding.scores > box_threshold) & (grounding.phrase_scores > text_threshold)
    return grounding.boxes[keep]


def cxcywh_to_xyxy(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised (cx, cy, w, h) -> pixel (x0, y0, x1, y1) of a ``height x width`` image (``center_to_corners_format``
    then scaling, as both Grounded-SAM builds do)."""
    cx, cy, w, h = boxes.float().unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    return corners * torch.tensor([width, height, width, height], dtype=corners.dtype, device=corners.device)


def empty_masks(count: int, height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``count`` all-False masks: the answer for phrases with no box (SAM is not run)."""
    return torch.zeros(count, height, width, dtype=torch.bool, device=device)


def union_by_phrase(instances: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """``N x H x W`` bool instance masks, phrase ``k`` owning the next ``counts[k]`` of them -> ``len(counts) x H x W``:
    per phrase the union of its instances (all False for a count of 0)."""
    if sum(counts) != len(instances):
        raise ValueError(f"union_by_phrase: counts sum to {sum(counts)} but there are {len(instances)} masks")
    out = empty_masks(len(counts), *instances.shape[-2:], device=instances.device)
    for k, part in enumerate(instances.split(list(counts))):
        if len(part):
            out[k] = part.any(0)
    return out


def detector_input_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """Grounding DINO's input size: shortest side ``shortest_edge`` unless the longest would pass ``longest_edge``
    (transformers' ``get_size_with_aspect_ratio``, the DETR rule of the original ``RandomResize([800], 1333)``)."""
    from transformers.image_transforms import get_size_with_aspect_ratio

    return tuple(get_size_with_aspect_ratio((height, width), shortest_edge, longest_edge))


def sam_input_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """SAM's resized size: longest side ``longest_edge``, the other rounded half up (``ResizeLongestSide`` and
    ``SamImageProcessor._get_preprocess_shape``)."""
    scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_input_boxes(xyxy: torch.Tensor, height: int, width: int, longest_edge: int) -> torch.Tensor:
    """Pixel boxes of a ``height x width`` image -> SAM's input frame: x scaled by new_w / w, y by new_h / h (with
    the rounded new size, as ``SamProcessor`` and ``ResizeLongestSide.apply_boxes`` do)."""
    new_h, new_w = sam_input_size(height, width, longest_edge)
    scale = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32, device=xyxy.device)
    return xyxy.float() * scale


def sam_masks_to_image(logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int],
                       pad_size: tuple[int, int], threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """SAM's low-resolution mask logits ``N x h x w`` -> bool ``N x H x W`` masks of the original image: upsample to
    the padded input, crop the padding, resize to the original size, threshold (``post_process_masks``' geometry)."""
    x = F.interpolate(logits[:, None].float(), pad_size, mode="bilinear", align_corners=False)
    x = x[..., :input_size[0], :input_size[1]]
    x = F.interpolate(x, original_size, mode="bilinear", align_corners=False)
    return x[:, 0] > threshold


def resize_normalise(images: torch.Tensor, size: tuple[int, int], mean, std,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float images in [0, 1] -> bilinear (antialiased) resize to ``size`` (h, w) and mean/std normalisation: what
    the fast image processors do (torchvision antialiased bilinear), without PIL."""
    x = images.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).to(dtype)


class _BoxesThenMasks:
    """The shared ``masks`` loop: per image, ``boxes`` for all its phrases, the kept boxes in pixels, one ``segment``
    call for every kept box of the image (none when nothing is kept), and the union per phrase."""

    who = "GroundedSAM"
    box_threshold: float
    text_threshold: float

    def boxes(self, image: torch.Tensor, phrases: Sequence[str]) -> list[Grounding]:
        raise NotImplementedError

    def segment(self, image: torch.Tensor, xyxy: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def masks(self, images: torch.Tensor, phrases: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """``images``: ``B x 3 x H x W`` in [0, 1]; ``phrases[i]``: the phrases of image ``i``. Returns, per image, a
        bool tensor ``len(phrases[i]) x H x W``: the union of the phrase's instances."""
        check_images(images, phrases, self.who)
        h, w = images.shape[-2:]
        out = []
        for image, texts in zip(images, phrases):
            texts = list(texts)
            groundings = self.boxes(image, texts) if texts else []
            if len(groundings) != len(texts):
                raise RuntimeError(f"{self.who}.boxes: {len(texts)} phrases but {len(groundings)} answers")
            xyxy = [cxcywh_to_xyxy(kept_boxes(g, self.box_threshold, self.text_threshold), h, w) for g in groundings]
            counts = [len(b) for b in xyxy]
            if not sum(counts):
                out.append(empty_masks(len(texts), h, w, device=images.device))
                continue
            instances = self.segment(image, torch.cat(xyxy))
            out.append(union_by_phrase(instances.to(images.device), counts))
        return out


def _preprocessor_config(pretrained: str) -> dict:
    """A model's ``preprocessor_config.json`` (hub id or folder)."""
    from transformers.utils import cached_file

    path = cached_file(pretrained, "preprocessor_config.json")
    with open(path) as f:
        return json.load(f)


def _need(config: dict, key: str, pretrained: str, who: str, expected: str):
    if key not in config:
        raise ValueError(f"{who}: {pretrained}/preprocessor_config.json has no {key!r} (expected {expected})")
    return config[key]


class GroundedSAMSegmenter(_BoxesThenMasks, ExpertModule):
    """Grounded-SAM on transformers: ``GroundingDinoForObjectDetection`` + its tokenizer, then ``SamModel``.

    Per image, Grounding DINO reads each phrase as its own caption (lower case, ending with "."; one batched forward per
    image); a box is kept by :func:`kept_boxes`; the kept boxes of all phrases go to SAM in one prompt batch on one
    image embedding, single-mask output (``multimask_output=False``, as Grounded-SAM's demo); a phrase's mask is the
    union of its boxes' masks, all False when it has none. Override :meth:`boxes` or :meth:`sam_logits` to replace
    either model (the tests do).

    Args:
        detector: hub id or folder of a Grounding DINO model (model, tokenizer, ``preprocessor_config.json`` with
            ``size`` {shortest_edge, longest_edge}, ``image_mean``, ``image_std``).
        sam: hub id or folder of a SAM model (model and ``preprocessor_config.json`` with ``size`` {longest_edge},
            ``pad_size``, ``image_mean``, ``image_std``).
        box_threshold: minimum best-token probability of a box.
        text_threshold: minimum probability of some token of the phrase itself.
        device: where both models are loaded; frozen and not children of any LightningModule, they are moved to the
            module's device when fit, validate, test or predict start (:class:`~t2i_align.experts.base.ExpertModule`).
        dtype: weight dtype of both models.
    """

    who = "GroundedSAMSegmenter"

    def __init__(self, detector: str = "IDEA-Research/grounding-dino-base", sam: str = "facebook/sam-vit-base",
                 box_threshold: float = BOX_THRESHOLD, text_threshold: float = TEXT_THRESHOLD, device: str = "cpu",
                 dtype: str = "float32") -> None:
        super().__init__()
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection, SamModel

        torch_dtype = getattr(torch, dtype)
        detector = resolve_pretrained(detector, "Grounding DINO model")
        self.detector = GroundingDinoForObjectDetection.from_pretrained(detector, dtype=torch_dtype)
        self.detector.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(detector)
        sam = resolve_pretrained(sam, "SAM model")
        self.sam = SamModel.from_pretrained(sam, dtype=torch_dtype)
        self.sam.to(device).eval().requires_grad_(False)
        self.box_threshold, self.text_threshold = box_threshold, text_threshold

        pre = _preprocessor_config(detector)
        size = _need(pre, "size", detector, self.who, "{'shortest_edge': int, 'longest_edge': int}")
        longest = size.get("longest_edge", pre.get("max_size")) if isinstance(size, dict) else None
        if not isinstance(size, dict) or "shortest_edge" not in size or longest is None:
            raise ValueError(f"{self.who}: {detector}/preprocessor_config.json: expected size "
                             f"{{'shortest_edge': int, 'longest_edge': int}}, got {size!r}")
        self.detector_edges = (int(size["shortest_edge"]), int(longest))
        self.detector_mean = _need(pre, "image_mean", detector, self.who, "three floats")
        self.detector_std = _need(pre, "image_std", detector, self.who, "three floats")

        pre = _preprocessor_config(sam)
        size = _need(pre, "size", sam, self.who, "{'longest_edge': int}")
        if not isinstance(size, dict) or "longest_edge" not in size:
            raise ValueError(f"{self.who}: {sam}/preprocessor_config.json: expected size {{'longest_edge': int}}, "
                             f"got {size!r}")
        self.sam_longest = int(size["longest_edge"])
        pad = pre.get("pad_size", {"height": self.sam_longest, "width": self.sam_longest})
        self.sam_pad = (int(pad["height"]), int(pad["width"]))
        self.sam_mean = _need(pre, "image_mean", sam, self.who, "three floats")
        self.sam_std = _need(pre, "image_std", sam, self.who, "three floats")
        model_size = self.sam.config.prompt_encoder_config.image_size
        if self.sam_pad != (model_size, model_size) or self.sam_longest != model_size:
            raise ValueError(f"{self.who}: {sam}: the preprocessor's longest_edge {self.sam_longest} and pad_size "
                             f"{self.sam_pad} must match the model's input size {model_size}")

    @torch.no_grad()
    def boxes(self, image: torch.Tensor, phrases: Sequence[str]) -> list[Grounding]:
        """Grounding DINO on one image ``3 x H x W`` in [0, 1], one caption per phrase: per phrase its raw
        :class:`Grounding` (every query's box, unthresholded)."""
        model = self.detector
        size = detector_input_size(*image.shape[-2:], *self.detector_edges)
        pixels = resize_normalise(image[None].to(model.device), size, self.detector_mean, self.detector_std,
                                  model.dtype)
        text = self.tokenizer([grounding_caption(p) for p in phrases], padding="longest", truncation=True,
                              max_length=model.config.max_text_len, return_tensors="pt").to(model.device)
        out = model(pixel_values=pixels.expand(len(phrases), -1, -1, -1), input_ids=text.input_ids,
                    attention_mask=text.attention_mask, token_type_ids=text.get("token_type_ids"))
        period = self.tokenizer.convert_tokens_to_ids(".")
        return [grounding_from_logits(out.logits[k], out.pred_boxes[k],
                                      phrase_token_mask(text.input_ids[k], non_phrase_ids(self.tokenizer), period,
                                                        out.logits.shape[-1]))
                for k in range(len(phrases))]

    @torch.no_grad()
    def sam_logits(self, pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """SAM on one prepared image ``1 x 3 x pad_h x pad_w`` with ``N x 4`` boxes in its input frame -> the
        ``N x h x w`` low-resolution mask logits of the padded frame (single-mask output)."""
        embeddings = self.sam.get_image_embeddings(pixels)
        out = self.sam(image_embeddings=embeddings, input_boxes=boxes[None], multimask_output=False)
        return out.pred_masks[0, :, 0]

    def segment(self, image: torch.Tensor, xyxy: torch.Tensor) -> torch.Tensor:
        """SAM masks ``N x H x W`` (bool) of the ``N x 4`` pixel boxes of one image ``3 x H x W``: resize the longest
        side to SAM's size, normalise, pad bottom/right; boxes to that frame; masks back to ``H x W``."""
        h, w = image.shape[-2:]
        size = sam_input_size(h, w, self.sam_longest)
        pixels = resize_normalise(image[None].to(self.sam.device), size, self.sam_mean, self.sam_std, self.sam.dtype)
        pixels = F.pad(pixels, (0, self.sam_pad[1] - size[1], 0, self.sam_pad[0] - size[0]))
        boxes = sam_input_boxes(xyxy.to(self.sam.device), h, w, self.sam_longest)
        return sam_masks_to_image(self.sam_logits(pixels, boxes), size, (h, w), self.sam_pad)


class OriginalGroundedSAMSegmenter(_BoxesThenMasks, ExpertModule):
    """Grounded-SAM on the original packages (``groundingdino`` and ``segment_anything``), for checkpoints in their
    format; the same thresholds, geometry and union as :class:`GroundedSAMSegmenter`. Grounding DINO gets the image
    resized as its demo's ``RandomResize([800], max_size=1333)`` with ImageNet mean/std; SAM gets it through
    ``SamPredictor.set_torch_image`` (float, longest side resized, no uint8 round trip).

    Args:
        config_file: Grounding DINO's config (``GroundingDINO_SwinT_OGC.py``, ``GroundingDINO_SwinB_cfg.py``).
        grounding_checkpoint: its weights (``groundingdino_swint_ogc.pth``).
        sam_checkpoint: SAM's weights (``sam_vit_h_4b8939.pth``).
        sam_model_type: key of ``segment_anything.sam_model_registry`` (vit_h, vit_l, vit_b).
        box_threshold: minimum best-token probability of a box.
        text_threshold: minimum probability of some token of the phrase itself.
        device: where both models are loaded; they are moved to the module's device when fit, validate, test or
            predict start (:class:`~t2i_align.experts.base.ExpertModule`: both are submodules, ``sam`` also
            ``predictor.model``).
    """

    who = "OriginalGroundedSAMSegmenter"

    def __init__(self, config_file: str, grounding_checkpoint: str, sam_checkpoint: str, sam_model_type: str = "vit_h",
                 box_threshold: float = BOX_THRESHOLD, text_threshold: float = TEXT_THRESHOLD,
                 device: str = "cpu") -> None:
        super().__init__()
        try:
            from groundingdino.util.inference import load_model
            from segment_anything import SamPredictor, sam_model_registry
        except ImportError as e:
            raise ImportError(
                f"{self.who} needs the original packages groundingdino and segment_anything ({e}): "
                'pip install "t2i-align[grounded-sam-original]". groundingdino builds a CUDA extension and pins its '
                "own torch: install it in a separate environment, or use GroundedSAMSegmenter (transformers)."
            ) from e
        if sam_model_type not in sam_model_registry:
            raise ValueError(f"{self.who}: sam_model_type must be one of {sorted(sam_model_registry)}, "
                             f"got {sam_model_type!r}")
        if "device" in inspect.signature(load_model).parameters:
            self.detector = load_model(config_file, grounding_checkpoint, device=device)
        else:
            self.detector = load_model(config_file, grounding_checkpoint)
        self.detector.to(device).eval().requires_grad_(False)
        self.sam = sam_model_registry[sam_model_type](checkpoint=sam_checkpoint)
        self.sam.to(device).eval().requires_grad_(False)
        self.predictor = SamPredictor(self.sam)  # the same module: it moves with this one
        self.box_threshold, self.text_threshold = box_threshold, text_threshold

    @property
    def device(self) -> torch.device:
        """Where the models are now."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @torch.no_grad()
    def boxes(self, image: torch.Tensor, phrases: Sequence[str]) -> list[Grounding]:
        """Grounding DINO on one image ``3 x H x W`` in [0, 1], one caption per phrase (``model(images,
        captions=...)``, as its demo): per phrase its raw :class:`Grounding`."""
        size = detector_input_size(*image.shape[-2:], 800, 1333)
        pixels = resize_normalise(image[None].to(self.device), size, IMAGENET_MEAN, IMAGENET_STD)
        captions = [grounding_caption(p) for p in phrases]
        out = self.detector(pixels.expand(len(captions), -1, -1, -1), captions=captions)
        tokenizer = self.detector.tokenizer
        text = tokenizer(captions, padding="longest", return_tensors="pt")
        period = tokenizer.convert_tokens_to_ids(".")
        logits = out["pred_logits"]
        return [grounding_from_logits(logits[k], out["pred_boxes"][k],
                                      phrase_token_mask(text.input_ids[k], non_phrase_ids(tokenizer), period,
                                                        logits.shape[-1]))
                for k in range(len(captions))]

    @torch.no_grad()
    def segment(self, image: torch.Tensor, xyxy: torch.Tensor) -> torch.Tensor:
        """``SamPredictor`` masks ``N x H x W`` (bool) of the ``N x 4`` pixel boxes of one image ``3 x H x W``."""
        predictor = self.predictor
        h, w = image.shape[-2:]
        longest = predictor.model.image_encoder.img_size
        resized = F.interpolate(image[None].float().to(self.device) * 255, sam_input_size(h, w, longest),
                                mode="bilinear", align_corners=False, antialias=True)
        predictor.set_torch_image(resized, (h, w))
        boxes = sam_input_boxes(xyxy.to(self.device), h, w, longest)
        masks, _, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
        return masks[:, 0]
