"""GroupLens ML-1M: `ratings.dat` and, when present, the genres of `movies.dat`."""

from __future__ import annotations

import pathlib

from vista_jax.data.eventlog import DEFAULT_OPTIONS, EventLog, EventLogError, EventLogOptions
from vista_jax.data.loaders import common, text_scan
from vista_jax.data.loaders.text_scan import Field

_LAYOUT = "UserID::MovieID::Rating::Timestamp"
_FIELDS = (
    Field("user", "int"),
    Field("item", "int"),
    Field("rating", "float"),
    Field("timestamp", "int"),
)


def load_movielens_1m(
    data_dir: common.PathLike, options: EventLogOptions = DEFAULT_OPTIONS
) -> EventLog:
    """Loads GroupLens ML-1M: `ratings.dat` and, when present, `movies.dat` genres."""
    data_dir = common.existing_dir(data_dir, "movielens_1m")
    ratings_path = data_dir / "ratings.dat"
    if not ratings_path.is_file():
        raise EventLogError(
            f"{ratings_path} not found. Fix: point --config.data.path at the unzipped GroupLens "
            "ml-1m directory (https://grouplens.org/datasets/movielens/1m/)."
        )
    columns = common.read_delimited(ratings_path, "::", _FIELDS, 0, _LAYOUT)
    movies_path = data_dir / "movies.dat"
    if movies_path.is_file():
        movie_ids, genres = _read_genres(movies_path)
        columns["category"] = common.categories_for_items(columns["item"], movie_ids, genres)
    return common.to_event_log(columns, text_scan.where_in_text(ratings_path, 0), options)


def _read_genres(path: pathlib.Path) -> tuple[list[int], list[str]]:
    """MovieID and first genre of each row of a latin-1 `MovieID::Title::Genres` file."""
    movie_ids, genres = [], []
    # GroupLens ships movies.dat as ISO-8859-1.
    for number, line in text_scan.text_lines(path, encoding="latin-1"):
        movie_id, _, rest = line.partition("::")
        _, sep, genre_list = rest.rpartition("::")  # Titles may hold ':'; genres are last.
        if not sep or not movie_id.strip().isdigit():
            bad = f"line {number}: expected MovieID::Title::Genres, found {line!r}"
            raise text_scan.malformed(path, (bad, text_scan.FIX_LINE), "")
        movie_ids.append(int(movie_id))
        genres.append(genre_list.split("|")[0].strip())
    return movie_ids, genres
