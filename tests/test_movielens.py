import zipfile

import numpy as np
import pytest

from data.movielens import (
    GENRES,
    TABLES,
    MovieLensFormatError,
    age_bucket,
    convert,
    extract_from_wheel,
    read_movielens,
)
from mlet.dataset import load_dataset, split_rows

# Four users, three items; 20 ratings so that the 80/10/10 split has 2 + 2 held-out rows.
USERS = [
    ("1", 24, "M", "technician", "85711"),
    ("2", 53, "F", "other", "94043"),
    ("3", 17, "M", "writer", "T8H1N"),
    ("4", 33, "F", "writer", "02138"),
]
ITEMS = [
    ("1", "Toy Story", "1995", ["Animation", "Children's", "Comedy"]),
    ("2", "GoldenEye", "1995", ["Action", "Adventure", "Thriller"]),
    ("3", "Mystery Film", "", []),
]
RATINGS = [
    (user, item, (user * 7 + item * 3) % 5 + 1, 1000 + 10 * row)
    for row, (user, item) in enumerate(
        [(u, i) for u in (1, 2, 3, 4) for i in (1, 2, 3)]
        + [(1, 1), (2, 2), (3, 3), (4, 1), (1, 2), (2, 3), (3, 1), (4, 2)]
    )
]


def write_grouplens(folder):
    folder.mkdir()
    (folder / "u.data").write_text(
        "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in reversed(RATINGS))
    )
    (folder / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in USERS))
    lines = []
    for item, title, year, genres in ITEMS:
        flags = "|".join("1" if g in genres else "0" for g in GENRES)
        date = f"01-Jan-{year}" if year else ""
        lines.append(f"{item}|{title} ({year})|{date}||http://x|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return folder


def recbole_files() -> dict[str, str]:
    return {
        "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS),
        "ml-100k.user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, a, g, o, z in USERS),
        "ml-100k.item": "\t".join(
            ("item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq\n")
        )
        # RecBole lists genres in its own order; the reader uses GroupLens's first genre.
        + "".join(f"{i}\t{t}\t{y or 'unkonwn'}\t{' '.join(reversed(g))}\n" for i, t, y, g in ITEMS),
    }


def write_recbole(folder):
    folder.mkdir()
    for name, text in recbole_files().items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def sources(tmp_path):
    return {
        "grouplens": write_grouplens(tmp_path / "grouplens"),
        "recbole": write_recbole(tmp_path / "recbole"),
    }


@pytest.mark.parametrize("layout", ["grouplens", "recbole"])
def test_reader_parses_ratings_users_and_items(sources, layout):
    ratings = read_movielens(sources[layout])
    assert ratings.layout == layout
    assert len(ratings.rating) == len(RATINGS)
    assert ratings.users["3"].zip_code == "T8H1N" and ratings.users["2"].age == 53
    assert ratings.items["1"].genre == "Animation"  # first in GroupLens's order
    assert ratings.items["2"].genre == "Action"
    assert ratings.items["3"].genre == "unknown" and ratings.items["3"].release_year == 0
    assert ratings.items["1"].release_year == 1995


def test_both_layouts_give_the_same_dataset(sources, tmp_path):
    convert(sources["grouplens"], tmp_path / "a")
    convert(sources["recbole"], tmp_path / "b")
    a, b = load_dataset(tmp_path / "a"), load_dataset(tmp_path / "b")
    assert a.schema.table_sizes == b.schema.table_sizes == (4, 3, 7, 2, 3, 4, len(GENRES))
    assert a.schema.table_names == TABLES
    for name in ("dense", "sparse", "labels"):
        assert np.array_equal(getattr(a, name), getattr(b, name))


def test_rows_labels_and_features(sources, tmp_path):
    convert(sources["recbole"], tmp_path / "d", split="time")
    data = load_dataset(tmp_path / "d")
    assert len(data) == len(RATINGS)
    # split "time": rows in timestamp order, which is the order RATINGS was written in
    expected_labels = [int(r >= 4) for _, _, r, _ in RATINGS]
    assert data.labels.tolist() == expected_labels
    first_user, first_item = RATINGS[0][0], RATINGS[0][1]
    assert data.sparse[0, 0] == first_user - 1 and data.sparse[0, 1] == first_item - 1
    assert data.dense[0].tolist() == [24.0, 95.0]  # age, years since 1900
    ages = {u: age_bucket(a) for u, a, *_ in USERS}
    assert data.sparse[:, 2].tolist() == [ages[str(u)] for u, *_ in RATINGS]
    assert data.schema.source["positive_rate"] == pytest.approx(np.mean(expected_labels))


def test_user_recent_split_holds_out_each_users_latest_ratings(sources, tmp_path):
    convert(sources["grouplens"], tmp_path / "d")
    data = load_dataset(tmp_path / "d")
    split = split_rows(len(data))
    # Each user has 5 ratings; the 4 held-out rows are each user's last one, in time order:
    # (1, 2) at t=1160, (2, 3) at 1170, (3, 1) at 1180, (4, 2) at 1190 (ids are value - 1).
    held_out = data.sparse[split.val.start :, :2].tolist()
    assert held_out == [[0, 1], [1, 2], [2, 0], [3, 1]]
    train = data.sparse[: split.train.stop, :2].tolist()
    assert len(train) == 16 and [0, 1] in train  # user 1's earlier rating of item 2 trains
    assert data.schema.source["test_rows_with_unseen_user"] == 0.0
    assert data.schema.source["split"] == "user-recent"


def test_age_buckets():
    assert [age_bucket(a) for a in (7, 17, 18, 24, 25, 44, 45, 50, 55, 56, 73)] == [
        0,
        0,
        1,
        1,
        2,
        3,
        4,
        5,
        5,
        6,
        6,
    ]


def test_wheel_extraction_takes_only_the_ml100k_files(tmp_path):
    wheel = tmp_path / "recbole-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in recbole_files().items():
            archive.writestr(f"recbole/dataset_example/ml-100k/{name}", text)
        archive.writestr("recbole/dataset_example/ml-100k/ml-100k.kg", "not wanted")
        archive.writestr("recbole/__init__.py", "")
    out = extract_from_wheel(wheel, tmp_path / "raw")
    assert sorted(p.name for p in out.iterdir()) == [
        "ml-100k.inter",
        "ml-100k.item",
        "ml-100k.user",
    ]
    convert(wheel, tmp_path / "d")
    convert(write_recbole(tmp_path / "folder"), tmp_path / "e")
    assert np.array_equal(load_dataset(tmp_path / "d").sparse, load_dataset(tmp_path / "e").sparse)


def test_missing_files_and_bad_lines_are_named(sources, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither the GroupLens files"):
        read_movielens(tmp_path)
    bad = sources["recbole"] / "ml-100k.inter"
    bad.write_text(bad.read_text() + "1\t2\tfive\t1\n")
    with pytest.raises(MovieLensFormatError, match=r"ml-100k.inter:22: 'five' is not a number"):
        read_movielens(sources["recbole"])
    user = sources["grouplens"] / "u.data"
    user.write_text(user.read_text() + "9\t1\t5\t1\n")
    with pytest.raises(MovieLensFormatError, match="users missing from the user file"):
        convert(sources["grouplens"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="not a readable wheel"):
        extract_from_wheel(tmp_path / "missing.whl", tmp_path / "raw")
