"""The models of the framework and their one factory (albef/models/factory.py), which reads
`cfg.model` only; a whole Config is bound to a model in albef/build.py."""

from __future__ import annotations

from albef.masking import TokenIds
from albef.models.albef import ALBEF
from albef.models.bert import TextEncoder
from albef.models.factory import (Encoders, build_albef, build_classifier, build_encoders, build_text_assignment,
                                  build_text_encoder, build_tokenizer, build_vqa_model, checked_tokenizer,
                                  compile_blocks)
from albef.models.vision import build_vision_encoder

__all__ = ["ALBEF", "TextEncoder", "TokenIds", "Encoders", "build_albef", "build_classifier", "build_encoders",
           "build_text_assignment", "build_text_encoder", "build_tokenizer", "build_vqa_model", "checked_tokenizer",
           "build_vision_encoder", "compile_blocks"]
