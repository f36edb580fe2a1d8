"""Categorical values -> table ids, vectorised: keys, vocabularies and hashing.

Every categorical value first becomes a 64-bit key:

    hex      int(value, 16), for Criteo's 32-bit hexadecimal hashes (DLRM's rule)
    string   FNV-1a 64 of the value's UTF-8 bytes (stable across runs and machines)
    integer  the value itself (the derived hour_of_day and day_of_week tables)

and the key becomes an id of its table by one of two encodings:

    vocab    0 = missing, 1 = out of vocabulary (rarer than --min-count or never seen in
             the training rows), 2 + i = the i-th key of the sorted vocabulary
    hash     0 = missing, 1 + key mod SIZE (the table has SIZE + 1 rows)

A vocabulary is stored as `vocab.<table>.npy`: a sorted uint64 array of keys, memory-
mappable, so the id of a key is 2 + its index (numpy.searchsorted finds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MISSING_ID = 0
OOV_ID = 1
FIRST_VOCAB_ID = 2
# Below this many keys (a served request's) sorting the needles first costs more than it saves.
FEW_KEYS = 64
ENCODINGS = ("vocab", "hash")
FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


class BadValue(ValueError):
    """A value that cannot be encoded; `row` is its index within the batch."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


def binary_parts(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n + 1], bytes) of a binary or string array, without copying."""
    offsets = np.frombuffer(array.buffers()[1], np.int32)[
        array.offset : array.offset + len(array) + 1
    ]
    data = array.buffers()[2]
    return offsets, (np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8))


@dataclass
class ColumnKeys:
    """One table's keys in a batch as a dictionary: B rows, H slots per row, D distinct.

    Each distinct value's key is computed once. An empty slot points at an entry marked
    `missing` (its key means nothing), so no per-slot mask is ever built. Two spellings
    of one key (say "0a" and "a") may both be in `distinct`, which the vocabulary counts
    and lookups allow for.
    """

    distinct: np.ndarray  # uint64 [D]
    missing: np.ndarray  # bool [D], the entries that stand for an empty slot
    positions: np.ndarray  # int32 [B, H], each slot's index into `distinct`
    _counts: np.ndarray | None = None

    def rows(self, start: int, stop: int) -> ColumnKeys:
        if start == 0 and stop >= len(self.positions):
            return self
        return ColumnKeys(self.distinct, self.missing, self.positions[start:stop])

    def counts(self) -> np.ndarray:
        """How many slots hold each distinct entry [D] (computed once)."""
        if self._counts is None:
            self._counts = np.bincount(self.positions.ravel(), minlength=len(self.distinct))
        return self._counts

    def empty_rows(self) -> int:
        """Rows with no value in any slot."""
        if self.positions.shape[1] == 1:
            return int(self.counts()[self.missing].sum())
        return int(self.missing[self.positions].all(axis=1).sum())

    def with_empty_slots(self, empty: np.ndarray) -> ColumnKeys:
        """These keys with the `empty` slots [B, H] pointing at an added missing entry."""
        positions = np.where(empty, len(self.distinct), self.positions).astype(np.int32)
        distinct = np.append(self.distinct, np.uint64(0))
        return ColumnKeys(distinct, np.append(self.missing, True), positions)

    def widened(self, hotness: int) -> ColumnKeys:
        """A single-valued column as H slots: its value in the first, the others empty."""
        if self.positions.shape[1] == hotness:
            return self
        positions = np.repeat(self.positions[:, :1], hotness, axis=1)
        empty = np.zeros(positions.shape, bool)
        empty[:, 1:] = True
        return ColumnKeys(self.distinct, self.missing, positions).with_empty_slots(empty)


def stacked_positions(keys: list[ColumnKeys]) -> np.ndarray:
    """int32 [B, T, H]: every table's positions side by side."""
    return np.stack([k.positions for k in keys], axis=1)


def gathered_ids(lookups: list[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """Ids [B, T, H] from each table's ids of its distinct entries (`lookups`, one per
    table) and the slots' positions among them [B, T, H]: one gather for all tables."""
    offsets = np.cumsum([0] + [len(lookup) for lookup in lookups[:-1]], dtype=np.int64)
    return np.concatenate(lookups)[positions + offsets[None, :, None]]


def dictionary_keys(array: pa.Array, key_of) -> ColumnKeys:
    """The keys of a binary column's values, one slot per row, through its dictionary.

    pyarrow's hash table finds the distinct values and every value's position among them
    (in C++); only the distinct values are then decoded by `key_of` (hex_keys or
    string_keys), so a batch's frequent values cost one lookup each, not one decode each.
    """
    encoded = array.dictionary_encode(null_encoding="encode")
    positions = encoded.indices.to_numpy(zero_copy_only=False)
    try:
        distinct, missing = key_of(encoded.dictionary)
    except BadValue as e:  # its row is an index into the dictionary: name the first row
        raise BadValue(int(np.argmax(positions == e.row)), str(e)) from e
    return ColumnKeys(distinct, missing, positions[:, None])


def hex_column_keys(array: pa.Array) -> ColumnKeys:
    """The keys of a column of hexadecimal values, one slot per row.

    When every value is 8 digits or empty (Criteo's are), each is read as one 64-bit word
    and the words are dictionary-encoded instead of the strings (integers hash in about
    half the time); only the distinct words are then decoded and checked.
    """
    offsets, data = binary_parts(array)
    lengths = np.diff(offsets)
    eight = lengths == 8
    if not np.array_equal(eight, lengths != 0):  # other lengths (a null has length 0)
        return dictionary_keys(array, hex_keys)
    words = np.zeros(len(array), "<u8")  # an empty value is word 0, as 8 NUL bytes are
    words[eight] = data[offsets[0] : offsets[-1]].copy().view("<u8")
    encoded = pa.array(words).dictionary_encode()
    positions = encoded.indices.to_numpy()
    distinct_words = encoded.dictionary.to_numpy()
    keys, valid = hex_words(distinct_words)
    missing = distinct_words == 0
    bad = ~(valid | missing)
    if bad.any():
        raise BadValue(int(np.argmax(positions == np.argmax(bad))), "not hexadecimal")
    column = ColumnKeys(keys, missing, positions[:, None])
    if column.counts()[missing].sum() != len(eight) - eight.sum():
        raise BadValue(int(np.argmax(eight & (words == 0))), "not hexadecimal (NUL bytes)")
    return column


def present_values(array: pa.Array, offsets: np.ndarray) -> np.ndarray:
    """Values that are neither empty nor null."""
    present = np.diff(offsets) != 0
    if array.null_count:
        present &= array.is_valid().to_numpy(zero_copy_only=False)
    return present


def hex_keys(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Keys int(value, 16) and the missing mask (empty values) of a binary column."""
    offsets, data = binary_parts(array)
    lengths = np.diff(offsets)
    present = present_values(array, offsets)
    keys = np.zeros(len(array), np.uint64)
    if not present.any():
        return keys, ~present
    if np.array_equal(lengths == 8, present):
        # Criteo's values are all 8 digits: read each as one 64-bit word (SWAR), no loop.
        words = data[offsets[0] : offsets[-1]].copy().view("<u8")  # copied to align
        values, valid = hex_words(words)
        if not valid.all():
            raise BadValue(int(np.flatnonzero(present)[np.argmin(valid)]), "not hexadecimal")
        keys[present] = values
        return keys, ~present
    values = array.to_pylist()  # other lengths: Python's int(), once per value given
    for row in np.flatnonzero(present):
        try:
            keys[row] = int(values[row], 16)
        except (ValueError, OverflowError):
            raise BadValue(int(row), "not hexadecimal (or above 64 bits)") from None
    return keys, ~present


def pair_table() -> np.ndarray:
    """Two ASCII hex digits, read as one little-endian uint16 -> their byte value (or 0xFFFF)."""
    digits = np.frombuffer(b"0123456789abcdefABCDEF", np.uint8).astype(np.int64)
    values = np.array([int(chr(c), 16) for c in digits])
    table = np.full(1 << 16, 0xFFFF, np.uint16)
    table[(digits[:, None] | (digits[None, :] << 8)).ravel()] = (
        (values[:, None] << 4) | values[None, :]
    ).ravel()
    return table


HEX_PAIRS = pair_table()


def hex_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8 ASCII hex digits per little-endian uint64 word -> (value, valid) per word.

    One table lookup per digit pair (a 128 KiB table that stays in cache) does the work.
    """
    pairs = HEX_PAIRS[words.view("<u2")]  # [4 * m], each a byte value or 0xFFFF
    valid = (pairs.reshape(-1, 4) <= 0xFF).all(axis=1) if pairs.max(initial=0) > 0xFF else None
    values = pairs.astype(np.uint8).view(">u4").astype(np.uint64)
    return values, valid if valid is not None else np.ones(len(words), bool)


def string_keys(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """FNV-1a 64 keys of a binary column's values and its missing mask (empty values);
    refuses undecodable bytes."""
    offsets, _ = binary_parts(array)
    present = present_values(array, offsets)
    try:
        array.view(pa.string()).validate(full=True)
    except pa.ArrowInvalid:
        values = array.to_pylist()
        bad = next(i for i, v in enumerate(values) if v is not None and not_utf8(v))
        raise BadValue(bad, f"undecodable bytes (not UTF-8): {values[bad]!r}") from None
    keys = fnv1a64(array)
    keys[~present] = 0
    return keys, ~present


def not_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def fnv1a64(array: pa.Array) -> np.ndarray:
    """FNV-1a 64 of each value's bytes, one numpy pass per byte position (not per value)."""
    offsets, data = binary_parts(array)
    lengths = np.diff(offsets)
    hashes = np.full(len(array), FNV_OFFSET, np.uint64)
    for position in range(int(lengths.max(initial=0))):
        active = np.flatnonzero(lengths > position)
        byte = data[offsets[active] + position].astype(np.uint64)
        hashes[active] = (hashes[active] ^ byte) * FNV_PRIME
    return hashes


def split_multi_hot(array: pa.Array, separator: str, hotness: int) -> tuple[pa.Array, np.ndarray]:
    """A column of SEP-joined values -> (flat values [n * H], present [n, H]).

    The first H values of each row are kept, empty slots are missing (id 0, which is also
    the padding of rows with fewer than H values).
    """
    lists = pc.split_pattern(array, pattern=separator.encode())
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    starts = np.frombuffer(lists.buffers()[1], np.int32)[
        lists.offset : lists.offset + len(lists) + 1
    ]
    flat = lists.values
    slots = np.arange(hotness)
    take = starts[:-1, None] + slots[None, :]  # [n, H]
    present = slots[None, :] < np.minimum(lengths, hotness)[:, None]
    index = np.where(present, take, 0).ravel()
    values = flat.take(pa.array(index)) if len(flat) else pa.array([b""] * len(index), pa.binary())
    return values, present


def hour_keys(hours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Avazu's YYMMDDHH -> (hour of day 0..23, day of week 0..6, Monday 0) as keys."""
    hour = hours % 100
    day = (hours // 100) % 100
    month = (hours // 10_000) % 100
    year = 2000 + hours // 1_000_000
    bad = (hour > 23) | (day < 1) | (day > 31) | (month < 1) | (month > 12)
    if bad.any():
        raise BadValue(int(np.argmax(bad)), f"not a YYMMDDHH hour: {int(hours[np.argmax(bad)])}")
    dates = (
        (year - 1970).astype("datetime64[Y]").astype("datetime64[M]")
        + (month - 1).astype("timedelta64[M]")
    ).astype("datetime64[D]") + (day - 1).astype("timedelta64[D]")
    weekday = (dates.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    return hour.astype(np.uint64), weekday.astype(np.uint64)


@dataclass
class TableEncoder:
    """Maps the keys of one table to ids; `vocabulary` is set for the vocab encoding."""

    name: str
    encoding: str
    hash_size: int = 0
    vocabulary: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.encoding == "hash" and self.hash_size < 1:
            raise ValueError(f"table {self.name}: hash size must be positive")

    @property
    def rows(self) -> int:
        if self.encoding == "hash":
            return self.hash_size + 1
        return FIRST_VOCAB_ID + len(self.vocabulary)

    def encode(self, keys: ColumnKeys) -> np.ndarray:
        """int32 ids [B, H]; empty slots get id 0."""
        return self.distinct_ids(keys.distinct, keys.missing)[keys.positions]

    def distinct_ids(self, distinct: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """int32 ids of distinct keys; the missing entries get id 0."""
        if self.encoding == "hash":
            ids = hashed(distinct, self.hash_size).astype(np.int32)
        else:
            ids = self.lookup(distinct)
        ids[missing] = MISSING_ID
        return ids

    def lookup(self, distinct: np.ndarray) -> np.ndarray:
        """Vocabulary ids (or the OOV id) of distinct keys."""
        vocabulary = self.vocabulary
        if len(vocabulary) == 0:
            return np.full(len(distinct), OOV_ID, np.int32)
        if len(distinct) <= FEW_KEYS:
            position = np.searchsorted(vocabulary, distinct)
        else:
            # sorted needles walk the vocabulary in order: cache-friendly
            order = np.argsort(distinct)
            position = np.empty(len(distinct), np.int64)
            position[order] = np.searchsorted(vocabulary, distinct[order])
        position = np.minimum(position, len(vocabulary) - 1)
        found = vocabulary[position] == distinct
        return np.where(found, position + FIRST_VOCAB_ID, OOV_ID).astype(np.int32)


def hashed(keys: np.ndarray, size: int) -> np.ndarray:
    """1 + key mod size; in 32 bits when the keys fit (Criteo's do), which divides faster."""
    if size < 2**32 and keys.size and int(keys.max()) < 2**32:
        return (keys.astype(np.uint32) % np.uint32(size)).astype(np.int64) + 1
    return (keys % np.uint64(size)).astype(np.int64) + 1


def vocabulary_file(folder: Path, table: str) -> Path:
    return Path(folder) / f"vocab.{table}.npy"


def load_vocabulary(folder: Path, table: str) -> np.ndarray:
    path = vocabulary_file(folder, table)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the vocabulary of table {table!r}")
    vocabulary = np.load(path, mmap_mode="r")
    if vocabulary.dtype != np.uint64 or vocabulary.ndim != 1:
        raise ValueError(f"{path}: a vocabulary is a 1-d uint64 array, got {vocabulary.dtype}")
    # a plain array over the same mapped pages: np.memmap's indexing costs microseconds a
    # call, which a served request pays once per table
    return np.asarray(vocabulary)


def value_counts(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, ids equal to the OOV id) per table [T] of ids [B, T(, H)]: every id but
    the missing id 0 is a value; the OOV id means out of vocabulary in vocab tables only."""
    by_table = ids.reshape(len(ids), ids.shape[1], -1)
    values = (by_table != MISSING_ID).sum(axis=(0, 2))
    return values, (by_table == OOV_ID).sum(axis=(0, 2))
