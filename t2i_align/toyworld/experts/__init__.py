"""ToyWorld's experts: the exact judge and the experts it answers for (segmenter, VQA, tagger, likelihood), and
the two learned models (CLIP, captioner) with their training code."""
