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


def hex_keys(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Keys int(value, 16) and the missing mask (empty values) of a binary column."""
    offsets, data = binary_parts(array)
    lengths = np.diff(offsets)
    present = lengths != 0
    keys = np.zeros(len(array), np.uint64)
    if not present.any():
        return keys, ~present
    if np.all((lengths == 8) | ~present):
        # Criteo's values are all 8 digits: read each as one 64-bit word (SWAR), no loop.
        words = data[offsets[0] : offsets[-1]].copy().view("<u8")  # copied to align
        values, valid = hex_words(words)
        if not valid.all():
            raise BadValue(int(np.flatnonzero(present)[np.argmin(valid)]), "not hexadecimal")
        keys[present] = values
        return keys, ~present
    return distinct_value_keys(array, present, parse_hex)


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


def parse_hex(values: list[bytes]) -> np.ndarray:
    try:
        return np.array([int(v, 16) for v in values], dtype=np.uint64)
    except (ValueError, OverflowError) as e:
        raise ValueError("not hexadecimal (or above 64 bits)") from e


def distinct_value_keys(
    array: pa.Array, present: np.ndarray, key_of
) -> tuple[np.ndarray, np.ndarray]:
    """Keys through the batch's distinct values: Python touches each distinct value once."""
    encoded = array.dictionary_encode()
    distinct = encoded.dictionary.to_pylist()
    try:
        distinct_keys = key_of(distinct)
    except ValueError as e:
        bad = next(i for i, v in enumerate(distinct) if v and not_parsed(key_of, v))
        row = int(np.flatnonzero(encoded.indices.to_numpy(zero_copy_only=False) == bad)[0])
        raise BadValue(row, str(e)) from e
    keys = distinct_keys[encoded.indices.to_numpy(zero_copy_only=False)]
    keys[~present] = 0
    return keys, ~present


def not_parsed(key_of, value) -> bool:
    try:
        key_of([value])
    except ValueError:
        return True
    return False


def string_keys(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """FNV-1a 64 keys of a binary column's values and its missing mask (empty values)."""
    offsets, _ = binary_parts(array)
    present = np.diff(offsets) != 0
    encoded = array.dictionary_encode()
    check_utf8(encoded)
    distinct = fnv1a64(encoded.dictionary)
    keys = distinct[encoded.indices.to_numpy(zero_copy_only=False)]
    keys[~present] = 0
    return keys, ~present


def check_utf8(encoded: pa.DictionaryArray) -> None:
    """Refuse undecodable bytes; only the distinct values are checked (in C++)."""
    try:
        encoded.dictionary.view(pa.string()).validate(full=True)
    except pa.ArrowInvalid:
        bad = next(i for i, v in enumerate(encoded.dictionary.to_pylist()) if not_utf8(v))
        indices = encoded.indices.to_numpy(zero_copy_only=False)
        row = int(np.flatnonzero(indices == bad)[0])
        raise BadValue(row, f"undecodable bytes (not UTF-8): {encoded.dictionary[bad]}") from None


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

    def encode(self, keys: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """int32 ids of `keys` (any shape); missing values get id 0."""
        hashing = self.encoding == "hash"
        ids = hashed(keys, self.hash_size) if hashing else self.vocabulary_ids(keys)
        ids[missing] = MISSING_ID
        return ids.astype(np.int32)

    def vocabulary_ids(self, keys: np.ndarray) -> np.ndarray:
        vocabulary = self.vocabulary
        if len(vocabulary) == 0:
            return np.full(keys.shape, OOV_ID, np.int64)
        # Look up each distinct key once: a batch repeats its frequent values many times.
        distinct, positions = distinct_keys(keys.ravel())
        return self.lookup(distinct)[positions].reshape(keys.shape)

    def lookup(self, distinct: np.ndarray) -> np.ndarray:
        """Vocabulary ids (or the OOV id) of distinct keys."""
        vocabulary = self.vocabulary
        if len(vocabulary) == 0:
            return np.full(len(distinct), OOV_ID, np.int32)
        order = np.argsort(distinct)  # sorted needles walk the vocabulary in order: cache-friendly
        position = np.empty(len(distinct), np.int64)
        position[order] = np.searchsorted(vocabulary, distinct[order])
        position = np.minimum(position, len(vocabulary) - 1)
        found = vocabulary[position] == distinct
        return np.where(found, position + FIRST_VOCAB_ID, OOV_ID).astype(np.int32)


def distinct_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, each key's position among them), by pyarrow's hash table; 32-bit
    keys (Criteo's) are hashed as such, which is half the memory traffic."""
    narrow = keys.size and int(keys.max()) < 2**32
    encoded = pa.array(keys.astype(np.uint32) if narrow else keys).dictionary_encode()
    distinct = encoded.dictionary.to_numpy().astype(np.uint64)
    return distinct, encoded.indices.to_numpy()


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
    return vocabulary


class KeyCounter:
    """Counts of keys over many batches, merged as it grows (a map-reduce in one process)."""

    def __init__(self, merge_above: int = 1_000_000) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.size = 0
        self.merge_above = merge_above

    def add_counts(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Distinct `keys` seen `counts` times (zero counts are dropped)."""
        seen = counts > 0
        self.parts.append((keys[seen], counts[seen].astype(np.int64)))
        self.size += int(seen.sum())
        if self.size > self.merge_above:
            self.parts = [self.merged()]
            self.size = len(self.parts[0][0])
            self.merge_above = max(self.merge_above, 2 * self.size)

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct keys, counts), keys ascending."""
        if not self.parts:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        keys = np.concatenate([k for k, _ in self.parts])
        counts = np.concatenate([c for _, c in self.parts])
        grouped = pa.table({"k": keys, "c": counts}).group_by("k").aggregate([("c", "sum")])
        order = np.argsort(grouped.column("k").to_numpy())
        return grouped.column("k").to_numpy()[order], grouped.column("c_sum").to_numpy()[order]

    def vocabulary(self, min_count: int) -> np.ndarray:
        keys, counts = self.merged()
        return np.ascontiguousarray(keys[counts >= min_count], dtype=np.uint64)
