"""Noto Color Emoji rendered with Pillow: about 1,900 colour images with names as captions.

The inventory is whatever the font really draws: single code points from its cmap plus the
sequences (ZWJ sequences, flags, keycaps, skin tones) its GSUB ligatures form, each checked to
render as one non-empty glyph. Captions are lower-case Unicode names ("grinning face",
"red apple"); sequences get joined names ("woman runner", "man with red hair", "flag of
japan", "flag of texas, united states", "keycap 7"). Flag names come from Debian's iso-codes when it is installed.

The test split is a fixed ~10% chosen by a hash of the code points (skin tones removed, so all
variants of one emoji land on the same side), independent of the seed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import unicodedata
from dataclasses import dataclass

from PIL import Image, ImageColor, ImageDraw, ImageFont

from data.config import DataConfig
from data.font_tables import character_map, ligatures
from data.keyed import KeyedImageDataset, RawSample

log = logging.getLogger(__name__)

DEFAULT_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian / Ubuntu fonts-noto-color-emoji
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",  # Fedora
)
BITMAP_PIXELS = 109  # the one size of Noto's CBDT bitmap strike (glyphs come out 136x128)
TEST_FRACTION_MODULUS = 10  # one emoji in ten is held out

ZWJ, VARIATION_16, KEYCAP, CANCEL_TAG, BLACK_FLAG = 0x200D, 0xFE0F, 0x20E3, 0xE007F, 0x1F3F4
FEMALE_SIGN, MALE_SIGN, RIGHT_ARROW = 0x2640, 0x2642, 0x27A1
SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
HAIR_COMPONENTS = range(0x1F9B0, 0x1F9B4)
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAG_LETTERS = range(0xE0020, 0xE007F)
# Pieces that only make sense inside a sequence; never samples on their own.
COMPONENT_NAME_PREFIXES = (
    "regional indicator", "emoji modifier", "emoji component", "tag ", "cancel tag",
    "combining", "variation selector", "zero width",
)
# Region codes in flag sequences that ISO 3166-1 does not name.
EXTRA_REGIONS = {
    "EU": "european union", "UN": "united nations", "XK": "kosovo", "AC": "ascension island",
    "CP": "clipperton island", "DG": "diego garcia", "EA": "ceuta and melilla",
    "IC": "canary islands", "TA": "tristan da cunha",
}
ISO_CODES_DIR = "/usr/share/iso-codes/json"


@dataclass(frozen=True)
class Emoji:
    text: str  # the code point sequence the font turns into one glyph
    name: str  # the caption


def find_emoji_font(path: str | None) -> str:
    """The colour emoji font to use: `path` if given, else the usual install locations."""
    if path:
        expanded = os.path.expanduser(path)
        if not os.path.isfile(expanded):
            raise FileNotFoundError(f"emoji font {expanded} does not exist")
        return expanded
    for candidate in DEFAULT_FONT_PATHS:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        "Noto Color Emoji not found (looked in " + ", ".join(DEFAULT_FONT_PATHS) + "): "
        "run `apt-get install fonts-noto-color-emoji` or set data.path to a NotoColorEmoji.ttf"
    )


@functools.lru_cache(maxsize=4)
def open_emoji_font(path: str) -> ImageFont.FreeTypeFont:
    """The font at its bitmap size, opened once per process (fonts are not shared with workers)."""
    try:
        return ImageFont.truetype(path, BITMAP_PIXELS)
    except OSError as error:
        raise ValueError(f"cannot open {path} as a colour bitmap font at {BITMAP_PIXELS} px: {error}") from None


@functools.lru_cache(maxsize=None)
def _region_names(kind: str) -> dict[str, str]:
    """{code: lower-case name} from iso-codes' ISO 3166-1 ("alpha_2") or 3166-2 ("code") lists."""
    try:
        with open(os.path.join(ISO_CODES_DIR, f"iso_{kind}.json"), encoding="utf-8") as file:
            entries = json.load(file)[kind]
    except (OSError, ValueError, KeyError):
        return {}
    key = "alpha_2" if kind == "3166-1" else "code"
    return {e[key].upper(): e.get("common_name", e["name"]).lower() for e in entries if key in e}


def _code_name(code: int) -> str | None:
    name = unicodedata.name(chr(code), "").lower()
    return name.removeprefix("emoji component ") if name else None


def sequence_name(codes: tuple[int, ...]) -> str | None:
    """A caption for an emoji sequence, or None if part of it has no Unicode name here."""
    codes = tuple(c for c in codes if c != VARIATION_16)
    if len(codes) == 2 and all(c in REGIONAL_INDICATORS for c in codes):
        region = "".join(chr(ord("A") + c - REGIONAL_INDICATORS.start) for c in codes)
        return "flag of " + (_region_names("3166-1").get(region) or EXTRA_REGIONS.get(region) or region.lower())
    if len(codes) > 2 and codes[0] == BLACK_FLAG and codes[-1] == CANCEL_TAG:
        if not all(c in TAG_LETTERS for c in codes[1:-1]):
            return None
        tag = "".join(chr(c - 0xE0000) for c in codes[1:-1]).upper()
        region = _region_names("3166-2").get(f"{tag[:2]}-{tag[2:]}", f"{tag[:2]}-{tag[2:]}".lower())
        country = _region_names("3166-1").get(tag[:2])
        return f"flag of {region}, {country}" if country else f"flag of {region}"
    if len(codes) == 2 and codes[1] == KEYCAP:
        return f"keycap {chr(codes[0])}"
    elements, current = [], []
    for code in codes + (ZWJ,):
        if code == ZWJ:
            elements.append(current)
            current = []
        else:
            current.append(code)
    genders, words, suffix = [], [], []
    for base, *modifiers in (e for e in elements if e):
        if base in (FEMALE_SIGN, MALE_SIGN) and not modifiers:
            genders.append("woman" if base == FEMALE_SIGN else "man")
            continue
        if base == RIGHT_ARROW and not modifiers:
            suffix.append("facing right")
            continue
        name = _code_name(base)
        if name is None or any(m not in SKIN_TONES for m in modifiers):
            return None
        if base in HAIR_COMPONENTS:
            name = f"with {name}"
        words.append(" ".join([name] + [f"with {SKIN_TONES[m]}" for m in modifiers]))
    return " ".join(genders + words + suffix) or None


def _misplaced_parts(codes: tuple[int, ...]) -> int:
    """How far a sequence is from canonical order: skin tones not right after their base, or a
    gender sign / hair / arrow in front. Noto lists reversed right-to-left forms next to the
    canonical ones; this picks the canonical."""
    count = int(codes[0] in SKIN_TONES or codes[0] in (FEMALE_SIGN, MALE_SIGN, RIGHT_ARROW))
    count += int(codes[0] in HAIR_COMPONENTS)
    return count + sum(1 for a, b in zip(codes, codes[1:]) if b in SKIN_TONES and a == ZWJ)


def _renders(font: ImageFont.FreeTypeFont, text: str, one_glyph_width: float) -> bool:
    """True if `text` draws something and lays out as a single glyph (its ligature applied)."""
    try:
        left, top, right, bottom = font.getbbox(text)
        width = font.getlength(text)
    except (RuntimeError, OSError):  # e.g. raqm cannot lay out a control character
        return False
    return right > left and bottom > top and width <= 1.5 * one_glyph_width


@functools.lru_cache(maxsize=4)
def emoji_inventory(font_path: str, skin_tones: bool) -> tuple[Emoji, ...]:
    """Every emoji the font draws, sorted by code points (cached per process)."""
    with open(font_path, "rb") as file:
        font_bytes = file.read()
    try:
        cmap = character_map(font_bytes)
        sequences = ligatures(font_bytes)
    except (ValueError, IndexError, UnicodeDecodeError) as error:  # struct.error is a ValueError
        raise ValueError(f"{font_path} is not a usable emoji font: {error}") from None
    font = open_emoji_font(font_path)
    glyph_width = font.getlength("\U0001F600")
    glyph_to_code: dict[int, int] = {}
    for code in sorted(cmap):
        glyph_to_code.setdefault(cmap[code], code)

    found: dict[str, str] = {}
    for code in sorted(cmap):
        name = _code_name(code)
        if code < 0x80 or code in SKIN_TONES or not name or name.startswith(COMPONENT_NAME_PREFIXES):
            continue
        if _renders(font, chr(code), glyph_width):
            found[chr(code)] = name
    unnamed = 0
    for forms in sequences.values():
        candidates = [tuple(glyph_to_code.get(g) for g in form) for form in forms]
        candidates = [c for c in reversed(candidates) if None not in c]  # later forms win ties
        if not candidates:
            continue
        codes = min(candidates, key=_misplaced_parts)
        if not skin_tones and any(c in SKIN_TONES for c in codes):
            continue
        name = sequence_name(codes)
        text = "".join(map(chr, codes))
        if name is None:
            unnamed += 1
        elif text not in found and _renders(font, text, glyph_width):
            found[text] = name
    if unnamed:
        log.info("%d emoji sequences in %s have no name in this Python's Unicode %s tables; left out",
                 unnamed, font_path, unicodedata.unidata_version)
    if not found:
        raise ValueError(f"{font_path} draws no emoji with Pillow (is it a colour bitmap emoji font?)")
    return tuple(Emoji(text, name) for text, name in sorted(found.items()))


def is_held_out(text: str) -> bool:
    """Whether an emoji belongs to the test split: a stable hash, shared by its skin-tone variants."""
    base = "".join(c for c in text if ord(c) not in SKIN_TONES and ord(c) != VARIATION_16)
    digest = hashlib.sha256(base.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % TEST_FRACTION_MODULUS == 0


def render_emoji(font: ImageFont.FreeTypeFont, text: str, background: tuple[int, int, int]) -> Image.Image:
    """The glyph composited on `background`, centred on a square RGB canvas (136x136 for Noto)."""
    _, _, width, height = font.getbbox(text)
    glyph = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), text, font=font, embedded_color=True)
    side = max(width, height)
    canvas = Image.new("RGBA", (side, side), background + (255,))
    canvas.alpha_composite(glyph, ((side - width) // 2, (side - height) // 2))
    return canvas.convert("RGB")


class EmojiDataset(KeyedImageDataset):
    """The emoji of one split; renders are cached at cfg.size per dataset (a few ms each)."""

    def __init__(self, cfg: DataConfig):
        self.font_path = find_emoji_font(cfg.path)
        super().__init__(cfg, where=self.font_path)
        try:
            self.background = ImageColor.getrgb(cfg.emoji_background)[:3]
        except ValueError:
            raise ValueError(f"data.emoji_background {cfg.emoji_background!r} is not a colour name or #rrggbb") from None
        held_out = cfg.split == "test"
        self.emoji = [e for e in emoji_inventory(self.font_path, cfg.emoji_skin_tones) if is_held_out(e.text) == held_out]
        if not self.emoji:
            raise ValueError(f"no emoji for split {cfg.split!r} in {self.font_path}")
        self._rendered: dict[int, Image.Image] = {}

    def num_samples(self) -> int:
        return len(self.emoji)

    def describe(self, index: int) -> str:
        return f"{self.font_path} [{self.emoji[index].name}]"

    def load(self, index: int) -> RawSample:
        image = self._rendered.get(index)
        if image is None:
            image = render_emoji(open_emoji_font(self.font_path), self.emoji[index].text, self.background)
            size = self.cfg.size
            image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
            self._rendered[index] = image
        return RawSample(image=image, caption=self.emoji[index].name)
