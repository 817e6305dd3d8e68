"""Just enough OpenType parsing to list what a colour-emoji font can draw.

fontTools is not a dependency, and Pillow cannot list a font's glyphs, so this reads the two
tables that say it: `cmap` (format 12: code point -> glyph) for single characters, and the
ligature substitutions of `GSUB` (lookup type 4, possibly behind extension lookups, type 7) that
turn emoji sequences (ZWJ sequences, flags, keycaps, skin tones) into one glyph.
Layout reference: the OpenType specification, chapters "cmap" and "GSUB".
"""
from __future__ import annotations

import struct
from collections import defaultdict


def table_directory(font: bytes) -> dict[str, tuple[int, int]]:
    """{table tag: (offset, length)} of a TrueType/OpenType file (not a collection)."""
    if font[:4] == b"ttcf":
        raise ValueError("font collections (.ttc) are not supported: give the path of a single .ttf font")
    (count,) = struct.unpack_from(">H", font, 4)
    tables = {}
    for k in range(count):
        tag, _checksum, offset, length = struct.unpack_from(">4sIII", font, 12 + 16 * k)
        tables[tag.decode("latin-1")] = (offset, length)
    return tables


def character_map(font: bytes) -> dict[int, int]:
    """{code point: glyph id} from the font's format-12 (full Unicode) cmap subtable."""
    tables = table_directory(font)
    if "cmap" not in tables:
        raise ValueError("the font has no cmap table")
    base = tables["cmap"][0]
    _version, subtables = struct.unpack_from(">HH", font, base)
    for k in range(subtables):
        _platform, _encoding, offset = struct.unpack_from(">HHI", font, base + 4 + 8 * k)
        start = base + offset
        if struct.unpack_from(">H", font, start)[0] != 12:
            continue
        (groups,) = struct.unpack_from(">I", font, start + 12)
        mapping = {}
        for g in range(groups):
            first, last, glyph = struct.unpack_from(">III", font, start + 16 + 12 * g)
            for code in range(first, last + 1):
                mapping[code] = glyph + code - first
        return mapping
    raise ValueError("the font has no format-12 cmap subtable (not a full-Unicode emoji font)")


def _coverage(font: bytes, offset: int) -> list[int]:
    """Glyph ids of a Coverage table, in coverage-index order."""
    fmt, count = struct.unpack_from(">HH", font, offset)
    if fmt == 1:
        return list(struct.unpack_from(f">{count}H", font, offset + 4))
    glyphs: list[int] = []
    for k in range(count):
        first, last, _start_index = struct.unpack_from(">HHH", font, offset + 4 + 6 * k)
        glyphs.extend(range(first, last + 1))
    return glyphs


def ligatures(font: bytes) -> dict[int, list[tuple[int, ...]]]:
    """{ligature glyph id: [component glyph sequences that form it, in table order]}.

    A glyph can be reachable from several sequences: Noto also lists reversed forms for
    right-to-left text, which callers need to tell apart from the canonical one.
    """
    tables = table_directory(font)
    found: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    if "GSUB" not in tables:
        return found
    base = tables["GSUB"][0]
    lookup_list = base + struct.unpack_from(">H", font, base + 8)[0]
    (lookup_count,) = struct.unpack_from(">H", font, lookup_list)
    for k in range(lookup_count):
        lookup = lookup_list + struct.unpack_from(">H", font, lookup_list + 2 + 2 * k)[0]
        lookup_type, _flags, subtable_count = struct.unpack_from(">HHH", font, lookup)
        for s in range(subtable_count):
            subtable = lookup + struct.unpack_from(">H", font, lookup + 6 + 2 * s)[0]
            kind = lookup_type
            if kind == 7:  # extension: the real subtable is at a 32-bit offset
                _fmt, kind, extension_offset = struct.unpack_from(">HHI", font, subtable)
                subtable += extension_offset
            if kind != 4:
                continue
            _fmt, coverage_offset, set_count = struct.unpack_from(">HHH", font, subtable)
            first_glyphs = _coverage(font, subtable + coverage_offset)
            for j in range(set_count):
                ligature_set = subtable + struct.unpack_from(">H", font, subtable + 6 + 2 * j)[0]
                (ligature_count,) = struct.unpack_from(">H", font, ligature_set)
                for m in range(ligature_count):
                    ligature = ligature_set + struct.unpack_from(">H", font, ligature_set + 2 + 2 * m)[0]
                    glyph, component_count = struct.unpack_from(">HH", font, ligature)
                    rest = struct.unpack_from(f">{component_count - 1}H", font, ligature + 4)
                    found[glyph].append((first_glyphs[j], *rest))
    return found
