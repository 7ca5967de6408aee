"""Data: caption cleaning, transforms, JSON / WebDataset caption datasets, collate, sampler.

The demo corpus generator lives in `albef.data.synthetic` (imported on demand: it pulls in
transformers). See `albef.data.datasets` for the engine-facing API.
"""
from .captions import pre_caption
from .collate import Collator
from .datasets import (
    AnnotationError,
    BadDataError,
    BadSample,
    CaptionDataset,
    SampleError,
    ShardStream,
    SkipCounter,
    build_eval_loader,
    build_train_loader,
    check_bad_fraction,
    load_annotations,
    read_image,
    set_epoch,
    webdataset_pipeline,
)
from .sampler import ResumableDistributedSampler
from .transforms import eval_transform, train_transform

__all__ = [
    "AnnotationError", "BadDataError", "BadSample", "CaptionDataset", "Collator",
    "ResumableDistributedSampler", "SampleError", "ShardStream", "SkipCounter", "build_eval_loader",
    "build_train_loader", "check_bad_fraction", "eval_transform", "load_annotations", "pre_caption",
    "read_image", "set_epoch", "train_transform", "webdataset_pipeline",
]
