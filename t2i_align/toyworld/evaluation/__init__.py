"""Evaluation on ToyWorld: the toy metrics of an image (``metrics``), scoring a generator on prompt sets
(``scoring``), a pipeline folder end to end (``pipeline``) and the quality bars of every model (``quality``)."""
