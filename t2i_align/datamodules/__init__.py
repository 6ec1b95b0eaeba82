"""Data: prompt-file readers, image-caption(-mask) pairs, resumable samplers and the LightningDataModule."""

from .datamodule import T2IDataModule
from .export import BenchmarkExportData
from .pairs import PAIR_FORMATS, PairDataset, PairFileError, PairRecord, PairSource, collate_pairs
from .ranked import RankedPairsData
from .prompts import (
    PROMPT_FORMATS,
    Prompt,
    PromptDataset,
    PromptFileError,
    PromptSource,
    collate_prompts,
    load_prompt_sources,
    read_prompts,
    sniff_format,
)
from .sampler import PaddedCollate, PaddedDataset, PaddingIndex, ShardSampler, StreamSampler, real_rows

__all__ = [
    "BenchmarkExportData",
    "RankedPairsData",
    "PAIR_FORMATS",
    "PROMPT_FORMATS",
    "PairDataset",
    "PairFileError",
    "PairRecord",
    "PairSource",
    "PaddedCollate",
    "PaddedDataset",
    "PaddingIndex",
    "Prompt",
    "PromptDataset",
    "PromptFileError",
    "PromptSource",
    "ShardSampler",
    "StreamSampler",
    "T2IDataModule",
    "collate_pairs",
    "collate_prompts",
    "load_prompt_sources",
    "read_prompts",
    "real_rows",
    "sniff_format",
]
