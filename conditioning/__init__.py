"""Conditioning for the diffusion model: prompts to cross-attention context.

Heavy libraries (transformers, open_clip) are imported only when a pretrained encoder is built.
"""
from .caption_dropout import drop_captions
from .config import TextEncoderConfig, build_text_encoder
from .pretrained_text_encoders import FrozenCLIPTextEncoder, FrozenOpenCLIPTextEncoder, HFTextEncoder
from .text_encoders import TextEncoder, TransformerTextEncoder
from .tokenizer import CONTEXT_LENGTH, END_OF_TEXT_ID, START_OF_TEXT_ID, VOCAB_SIZE, CLIPBPETokenizer

__all__ = [
    "CLIPBPETokenizer",
    "CONTEXT_LENGTH",
    "END_OF_TEXT_ID",
    "FrozenCLIPTextEncoder",
    "FrozenOpenCLIPTextEncoder",
    "HFTextEncoder",
    "START_OF_TEXT_ID",
    "TextEncoder",
    "TextEncoderConfig",
    "TransformerTextEncoder",
    "VOCAB_SIZE",
    "build_text_encoder",
    "drop_captions",
]
