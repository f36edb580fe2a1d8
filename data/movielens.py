"""MovieLens-100k as click prediction, in the project's dataset format.

A rating of 4 or 5 is a click (label 1), 1 to 3 is not. Each rating becomes a row with

    tables  user, item, age_bucket, gender, occupation, zip_prefix, genre
    dense   age (years), release_year (years since 1900; 0 when unknown), log1p-transformed

genre is the item's first listed genre, in GroupLens's genre order. zip_prefix is the
first character of the zip code (a US zone digit, or a letter for the few non-US codes).
Ids of every table are the sorted distinct values of the user and item files, so the two
source formats give identical datasets.

The project's split is contiguous with the test rows last (80/10/10), so the order rows
are written in is the split rule. Two rules are offered:

- "user-recent" (default): each user's most recent ratings are held out. Every rating gets
  its position within its user's history (rank / count, in time order); the 20% of
  ratings with the latest positions (later timestamps first among ties) go to the end of
  the file in time order, so validation and test hold the users' latest ratings, the test
  rows the later half of them. Training never sees a rating a user made after the ones of
  theirs it is tested on, and every user is seen in training, so the user table matters.
- "time": all rows in time order, so the test rows are the most recent 10% overall. On
  MovieLens-100k most of those come from users who joined late and have no training rows
  (86%), which leaves the user table untested; the schema records that share.

Ties within a rule are broken by timestamp, then user, then item, so the output is
deterministic.

Two source layouts are read:

- GroupLens: u.data (user, item, rating, timestamp; tab-separated), u.user
  (user|age|gender|occupation|zip), u.item (item|title|release date|video release|URL|
  19 genre flags; latin-1);
- RecBole atomic files: ml-100k.inter, ml-100k.user, ml-100k.item, tab-separated with a
  header of name:type fields (item classes are space-separated genre names), in a folder
  or read straight from RecBole's wheel (`pip download --no-deps recbole`), which carries
  them under recbole/dataset_example/ml-100k/.
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlet.dataset import DataSchema, save_dataset, split_rows
from mlet.files import staged_directory

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
AGE_BUCKETS = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's: under 18, 18-24, ..., 56 and over
TABLES = ("user", "item", "age_bucket", "gender", "occupation", "zip_prefix", "genre")
DENSE = ("age", "release_year")
CLICK_RATING = 4
SPLITS = ("user-recent", "time")


class MovieLensFormatError(ValueError):
    """A MovieLens file that cannot be read."""


@dataclass(frozen=True)
class User:
    age: int
    gender: str
    occupation: str
    zip_code: str


@dataclass(frozen=True)
class Item:
    release_year: int  # 0 when unknown
    genre: str


@dataclass
class Ratings:
    """Raw ratings and side information, as read from either layout."""

    user: list[str]
    item: list[str]
    rating: list[int]
    timestamp: list[int]
    users: dict[str, User]
    items: dict[str, Item]
    layout: str


def find_layout(source: Path) -> str:
    if all((source / name).is_file() for name in ("u.data", "u.user", "u.item")):
        return "grouplens"
    if all((source / f"ml-100k.{ext}").is_file() for ext in ("inter", "user", "item")):
        return "recbole"
    raise FileNotFoundError(
        f"{source} holds neither the GroupLens files (u.data, u.user, u.item) nor RecBole's "
        "atomic files (ml-100k.inter, ml-100k.user, ml-100k.item); `make movielens` fetches "
        "the latter"
    )


WHEEL_FOLDER = "recbole/dataset_example/ml-100k/"
WHEEL_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")


def extract_from_wheel(wheel: str | Path, out: str | Path) -> Path:
    """Copy RecBole's three ml-100k atomic files (and nothing else) out of its wheel."""
    wheel, out = Path(wheel), Path(out)
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, FileNotFoundError) as e:
        raise FileNotFoundError(f"{wheel} is not a readable wheel: {e}") from e
    with archive:
        names = set(archive.namelist())
        missing = [n for n in WHEEL_FILES if WHEEL_FOLDER + n not in names]
        if missing:
            raise MovieLensFormatError(f"{wheel} lacks {WHEEL_FOLDER}{missing}")
        out.mkdir(parents=True, exist_ok=True)
        for name in WHEEL_FILES:
            (out / name).write_bytes(archive.read(WHEEL_FOLDER + name))
    return out


def read_movielens(source: str | Path) -> Ratings:
    """Ratings from a folder of either layout, or from a RecBole wheel."""
    source = Path(source)
    if source.suffix == ".whl":
        with tempfile.TemporaryDirectory() as folder:
            return read_movielens(extract_from_wheel(source, folder))
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder")
    layout = find_layout(source)
    reader = read_grouplens if layout == "grouplens" else read_recbole
    return reader(source)


def _fields(path: Path, separator: str, count: int, encoding: str = "utf-8", skip: int = 0):
    """(line number, fields) of each non-empty line; at least `count` fields required."""
    with open(path, encoding=encoding) as f:
        for number, line in enumerate(f, start=1):
            if number <= skip or not line.strip():
                continue
            fields = line.rstrip("\r\n").split(separator)
            if len(fields) < count:
                raise MovieLensFormatError(
                    f"{path}:{number}: expected {count} fields, got {len(fields)}"
                )
            yield number, fields


def _int(text: str, where: str) -> int:
    try:
        return int(float(text))
    except ValueError as e:
        raise MovieLensFormatError(f"{where}: {text!r} is not a number") from e


def _year(text: str) -> int:
    """A four-digit year, or 0 for the placeholders the files use ("", "unkonwn", "V")."""
    return int(text) if len(text) == 4 and text.isdigit() else 0


def _ratings_from(path: Path, separator: str, skip: int) -> tuple[list, list, list, list]:
    users, items, ratings, stamps = [], [], [], []
    for number, (user, item, rating, stamp, *_) in _fields(path, separator, 4, skip=skip):
        where = f"{path}:{number}"
        users.append(user.strip())
        items.append(item.strip())
        ratings.append(_int(rating, where))
        stamps.append(_int(stamp, where))
    return users, items, ratings, stamps


def _user(fields: list[str], where: str) -> User:
    age, gender, occupation, zip_code = (f.strip() for f in fields[1:5])
    return User(age=_int(age, where), gender=gender, occupation=occupation, zip_code=zip_code)


def read_grouplens(source: Path) -> Ratings:
    users = {
        f[0].strip(): _user(f, f"{source / 'u.user'}:{n}")
        for n, f in _fields(source / "u.user", "|", 5, encoding="latin-1")
    }
    items = {}
    for number, fields in _fields(source / "u.item", "|", 5 + len(GENRES), encoding="latin-1"):
        flags = fields[5 : 5 + len(GENRES)]
        if any(flag not in ("0", "1") for flag in flags):
            raise MovieLensFormatError(f"{source / 'u.item'}:{number}: genre flags must be 0/1")
        genre = GENRES[flags.index("1")] if "1" in flags else "unknown"
        year = _year(fields[2].strip()[-4:])  # e.g. 01-Jan-1995, empty when unknown
        items[fields[0].strip()] = Item(release_year=year, genre=genre)
    return Ratings(*_ratings_from(source / "u.data", "\t", 0), users, items, "grouplens")


def _header(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [name.split(":")[0] for name in f.readline().rstrip("\r\n").split("\t")]


def _require(path: Path, names: tuple[str, ...]) -> list[int]:
    header = _header(path)
    missing = [n for n in names if n not in header]
    if missing:
        raise MovieLensFormatError(f"{path}: header lacks {missing} (has {header})")
    return [header.index(n) for n in names]


def read_recbole(source: Path) -> Ratings:
    inter = source / "ml-100k.inter"
    order = _require(inter, ("user_id", "item_id", "rating", "timestamp"))
    if order != [0, 1, 2, 3]:
        raise MovieLensFormatError(f"{inter}: expected user_id, item_id, rating, timestamp first")
    user_file, item_file = source / "ml-100k.user", source / "ml-100k.item"
    u_cols = _require(user_file, ("user_id", "age", "gender", "occupation", "zip_code"))
    users = {}
    for number, fields in _fields(user_file, "\t", len(_header(user_file)), skip=1):
        users[fields[u_cols[0]].strip()] = _user(
            [fields[c] for c in u_cols], f"{user_file}:{number}"
        )
    i_cols = _require(item_file, ("item_id", "release_year", "class"))
    items = {}
    for number, fields in _fields(item_file, "\t", len(_header(item_file)), skip=1):
        year_text = fields[i_cols[1]].strip()
        classes = fields[i_cols[2]].split()
        unknown = [c for c in classes if c not in GENRES]
        if unknown:
            raise MovieLensFormatError(f"{item_file}:{number}: unknown genres {unknown}")
        # GroupLens's order, so that both layouts agree on the first genre.
        genre = min(classes, key=GENRES.index) if classes else "unknown"
        year = _year(year_text)
        items[fields[i_cols[0]].strip()] = Item(release_year=year, genre=genre)
    return Ratings(*_ratings_from(inter, "\t", 1), users, items, "recbole")


def age_bucket(age: int) -> int:
    return int(np.searchsorted(AGE_BUCKETS, age, side="right"))


def _vocabulary(values) -> dict[str, int]:
    """Sorted distinct values -> ids 0..n-1 (numeric strings in numeric order)."""
    distinct = set(values)
    key = (lambda v: (0, int(v), "")) if all(v.isdigit() for v in distinct) else None
    ordered = sorted(distinct, key=key) if key else sorted(distinct)
    return {value: index for index, value in enumerate(ordered)}


def time_key(ratings: Ratings, row: int) -> tuple:
    return (ratings.timestamp[row], _sort_key(ratings.user[row]), _sort_key(ratings.item[row]))


def row_order(ratings: Ratings, split: str) -> list[int]:
    """Row indices in the order to write them (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    by_time = sorted(range(len(ratings.rating)), key=lambda r: time_key(ratings, r))
    if split == "time":
        return by_time
    history: dict[str, list[int]] = {}
    for row in by_time:
        history.setdefault(ratings.user[row], []).append(row)
    position = {}
    for rows in history.values():
        for rank, row in enumerate(rows, start=1):
            position[row] = rank / len(rows)
    held_out_rows = len(by_time) - split_rows(len(by_time)).val.start
    latest = sorted(by_time, key=lambda r: (-position[r], *(-v for v in _numeric(ratings, r))))
    held_out = set(latest[:held_out_rows])
    return [r for r in by_time if r not in held_out] + [r for r in by_time if r in held_out]


def _numeric(ratings: Ratings, row: int) -> tuple[int, int, int]:
    """(timestamp, user, item) as numbers where they are, for descending tie-breaks."""
    user, item = ratings.user[row], ratings.item[row]
    return (
        ratings.timestamp[row],
        int(user) if user.isdigit() else 0,
        int(item) if item.isdigit() else 0,
    )


def build_arrays(
    ratings: Ratings, split: str = "user-recent"
) -> tuple[DataSchema, dict[str, np.ndarray]]:
    """Rows in time order; the schema records the rule and the cold-start shares."""
    for kind, ids, known in (
        ("user", ratings.user, ratings.users),
        ("item", ratings.item, ratings.items),
    ):
        missing = sorted(set(ids) - set(known), key=_sort_key)
        if missing:
            raise MovieLensFormatError(
                f"ratings name {kind}s missing from the {kind} file: {missing[:5]}"
            )
    order = row_order(ratings, split)
    users, items = ratings.users, ratings.items
    columns = {
        "user": lambda u, i: u,
        "item": lambda u, i: i,
        "age_bucket": lambda u, i: str(age_bucket(users[u].age)),
        "gender": lambda u, i: users[u].gender,
        "occupation": lambda u, i: users[u].occupation,
        "zip_prefix": lambda u, i: users[u].zip_code[:1] or "?",
        "genre": lambda u, i: items[i].genre,
    }
    all_values = {
        "user": list(users),
        "item": list(items),
        "age_bucket": [str(b) for b in range(len(AGE_BUCKETS) + 1)],
        "gender": [u.gender for u in users.values()],
        "occupation": [u.occupation for u in users.values()],
        "zip_prefix": [u.zip_code[:1] or "?" for u in users.values()],
        "genre": list(GENRES),
    }
    vocab = {name: _vocabulary(all_values[name]) for name in TABLES}
    sparse = np.array(
        [
            [vocab[name][columns[name](ratings.user[r], ratings.item[r])] for name in TABLES]
            for r in order
        ],
        dtype=np.int32,
    ).reshape(len(order), len(TABLES))
    dense = np.array(
        [
            [users[ratings.user[r]].age, max(items[ratings.item[r]].release_year - 1900, 0)]
            for r in order
        ],
        dtype=np.float32,
    ).reshape(len(order), len(DENSE))
    labels = np.array([ratings.rating[r] >= CLICK_RATING for r in order], dtype=np.uint8)
    schema = DataSchema(
        num_dense=len(DENSE),
        table_sizes=tuple(len(vocab[name]) for name in TABLES),
        dense_transform="log1p",
        dense_names=DENSE,
        table_names=TABLES,
        rows=len(order),
        source={
            "kind": "movielens-100k",
            "layout": ratings.layout,
            "label": f"rating >= {CLICK_RATING}",
            "split": split,
            "positive_rate": float(labels.mean()) if len(labels) else 0.0,
            **cold_start_shares(sparse),
        },
    )
    return schema, {"dense": dense, "sparse": sparse, "labels": labels}


def cold_start_shares(sparse: np.ndarray) -> dict[str, float]:
    """Share of the default test split's rows whose user / item never occurs in training."""
    if len(sparse) < 10:
        return {}
    split = split_rows(len(sparse))
    train, test = sparse[: split.train.stop], sparse[split.test.start :]
    return {
        f"test_rows_with_unseen_{name}": float(np.mean(~np.isin(test[:, column], train[:, column])))
        for column, name in enumerate(TABLES[:2])
    }


def _sort_key(value: str) -> tuple:
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


def convert(
    source: str | Path, out: str | Path, split: str = "user-recent", overwrite: bool = False
) -> DataSchema:
    """Read MovieLens-100k from `source` (either layout) and write a dataset folder `out`."""
    ratings = read_movielens(source)
    if not ratings.rating:
        raise MovieLensFormatError(f"{source} holds no ratings")
    schema, arrays = build_arrays(ratings, split)
    with staged_directory(out, replace=overwrite) as staging:
        save_dataset(staging, schema, arrays)
    return schema
