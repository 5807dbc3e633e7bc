"""The request log: one row per image the model server answered, in SQLite or PostgreSQL.

The server (`serve/recorder.py`) appends rows in batches, off the request path; `mnist-pipeline
monitor` reads windows of them. A row holds what was answered (model, version, predicted
class, calibrated confidence, entropy, whether it abstained) and seven statistics of the
input (`features.INPUT_STATISTICS`), never the picture unless `image_sample_rate` keeps a
sample of them.

- Bounded: each append deletes the rows older than the newest `max_rows`.
- Crash-safe: each batch is one transaction. SQLite runs in WAL mode (`synchronous=NORMAL`): a
  committed batch survives the process being killed, and a batch being written when it dies
  is rolled back whole when the file is next opened. No torn rows, whatever the moment.
- One owner: this module is the only code that knows the table. SQLAlchemy Core speaks to
  both stores; `postgresql://` uses psycopg 3, as the rest of the team stack does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from .. import project
from ..errors import DataError, describe_error
from .drift import Outputs
from .features import INPUT_STATISTICS

LOG_ENV = "MNIST_MONITORING_LOG"  # the log's URL; wins over params.yaml (team stack)
DEFAULT_FILE = "monitoring/requests.db"
TABLE = "requests"

_metadata = sa.MetaData()
REQUESTS = sa.Table(
    TABLE,
    _metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("time", sa.Float, nullable=False),  # Unix seconds, when answered
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("request", sa.BigInteger, nullable=False),  # the server process's request number
    sa.Column("predicted", sa.SmallInteger, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),  # calibrated
    sa.Column("entropy", sa.Float, nullable=False),  # nats
    sa.Column("unsure", sa.Boolean, nullable=False),  # below the abstention threshold
    *(sa.Column(name, sa.Float, nullable=False) for name in INPUT_STATISTICS),
    sa.Column("image", sa.LargeBinary, nullable=True),  # 784 uint8 pixels, when sampled
    sqlite_autoincrement=True,  # ids never reused after trimming
)
sa.Index("requests_by_version", REQUESTS.c.model, REQUESTS.c.version, REQUESTS.c.id)


def log_url(configured: str | None, root: str | os.PathLike[str] | None = None) -> str:
    """The log's URL: MNIST_MONITORING_LOG, else `configured`, else SQLite in the repo."""
    url = os.environ.get(LOG_ENV) or configured
    if url:
        return url
    return f"sqlite:///{(Path(root) if root else project.root()) / DEFAULT_FILE}"


def display(url: str) -> str:
    """`url` without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


@dataclass(frozen=True)
class Rows:
    """Answered images, as arrays of one length: what one append writes."""

    time: np.ndarray  # float64 Unix seconds
    request: np.ndarray  # int64
    predicted: np.ndarray  # int64
    confidence: np.ndarray  # float32
    entropy: np.ndarray  # float32
    unsure: np.ndarray  # bool
    inputs: np.ndarray  # float32 (N, len(INPUT_STATISTICS))
    images: list[bytes | None] | None = None

    def __len__(self) -> int:
        return len(self.predicted)


@dataclass(frozen=True)
class Window:
    """Consecutive rows of one served version, oldest first."""

    model: str
    version: str
    ids: np.ndarray
    times: np.ndarray
    unsure: np.ndarray
    outputs: Outputs

    @property
    def first_id(self) -> int:
        return int(self.ids[0])

    @property
    def last_id(self) -> int:
        return int(self.ids[-1])

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: Any) -> Window:
        """The rows `index` selects (a slice, indices or a mask), as a window."""
        return Window(
            model=self.model,
            version=self.version,
            ids=self.ids[index],
            times=self.times[index],
            unsure=self.unsure[index],
            outputs=self.outputs.take(index),
        )


class RequestLog:
    """A connection to the log at `url`; `create=True` makes the table (and SQLite's folder)."""

    def __init__(self, url: str, *, create: bool = False) -> None:
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise DataError(
                f"request log {url!r}: not a database URL; expected "
                "sqlite:///path.db or postgresql://user@host:port/db"
            ) from None
        self.sqlite = parsed.get_backend_name() == "sqlite"
        if self.sqlite:
            database = parsed.database or ""
            if not create and not Path(database).is_file():
                raise DataError(
                    f"request log {display(url)}: no such file; the model server "
                    "writes it (make serve) once it has answered requests"
                )
            if create:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        elif parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.engine = sa.create_engine(
            parsed,
            poolclass=sa.pool.NullPool if self.sqlite else sa.pool.QueuePool,
            pool_pre_ping=not self.sqlite,
        )
        if self.sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_writer if create else _sqlite_reader)
        if create:
            _metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- writing (the server) --------------------------------------------------------------

    def append(self, model: str, version: str, rows: Rows, max_rows: int) -> None:
        """Write `rows` in one transaction and keep only the newest `max_rows` rows."""
        images = rows.images or [None] * len(rows)
        columns = [
            rows.time.tolist(),
            rows.request.tolist(),
            rows.predicted.tolist(),
            rows.confidence.tolist(),
            rows.entropy.tolist(),
            rows.unsure.tolist(),
            *(rows.inputs[:, i].tolist() for i in range(len(INPUT_STATISTICS))),
        ]
        names = [
            "time",
            "request",
            "predicted",
            "confidence",
            "entropy",
            "unsure",
            *INPUT_STATISTICS,
        ]
        records = [
            {
                "model": model,
                "version": version,
                "image": image,
                **dict(zip(names, values, strict=True)),
            }
            for image, *values in zip(images, *columns, strict=True)
        ]
        with self.engine.begin() as conn:
            conn.execute(REQUESTS.insert(), records)
            newest = conn.execute(sa.select(sa.func.max(REQUESTS.c.id))).scalar_one()
            conn.execute(REQUESTS.delete().where(REQUESTS.c.id <= newest - max_rows))

    # --- reading (the monitor) -------------------------------------------------------------

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(REQUESTS)).scalar_one())

    def latest_version(self) -> tuple[str, str] | None:
        """(model, version) of the newest row; None for an empty log."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(REQUESTS.c.model, REQUESTS.c.version)
                .order_by(REQUESTS.c.id.desc())
                .limit(1)
            ).first()
        return (row.model, row.version) if row else None

    def rows(
        self, model: str, version: str, *, newest: int | None = None, after_id: int = 0
    ) -> Window:
        """Rows of one version with id > `after_id`, oldest first; only the newest `newest`."""
        wanted = [
            REQUESTS.c.id,
            REQUESTS.c.time,
            REQUESTS.c.predicted,
            REQUESTS.c.confidence,
            REQUESTS.c.entropy,
            REQUESTS.c.unsure,
            *(REQUESTS.c[name] for name in INPUT_STATISTICS),
        ]
        query = (
            sa.select(*wanted)
            .where(
                REQUESTS.c.model == model, REQUESTS.c.version == version, REQUESTS.c.id > after_id
            )
            .order_by(REQUESTS.c.id.desc() if newest else REQUESTS.c.id)
        )
        if newest:
            query = query.limit(newest)
        with self.engine.connect() as conn:
            fetched = conn.execute(query).all()
        if newest:
            fetched = fetched[::-1]
        table = np.array([tuple(row) for row in fetched], dtype=np.float64).reshape(
            len(fetched), len(wanted)
        )
        return Window(
            model=model,
            version=version,
            ids=table[:, 0].astype(np.int64),
            times=table[:, 1],
            unsure=table[:, 5].astype(bool),
            outputs=Outputs(
                predicted=table[:, 2].astype(np.int64),
                confidence=table[:, 3].astype(np.float32),
                entropy=table[:, 4].astype(np.float32),
                inputs=table[:, 6:].astype(np.float32),
            ),
        )

    def images(self, first_id: int, last_id: int) -> list[tuple[int, bytes]]:
        """The kept pixels of rows `first_id`..`last_id` (only sampled rows have them)."""
        with self.engine.connect() as conn:
            return [
                (row.id, row.image)
                for row in conn.execute(
                    sa.select(REQUESTS.c.id, REQUESTS.c.image)
                    .where(REQUESTS.c.id.between(first_id, last_id), REQUESTS.c.image.is_not(None))
                    .order_by(REQUESTS.c.id)
                )
            ]


def split(window: Window, size: int) -> list[Window]:
    """`window` as consecutive windows of exactly `size` rows, aligned to its newest row
    (the oldest rows that do not fill a window are left out)."""
    count = len(window) // size
    start = len(window) - count * size
    return [window.take(slice(start + i * size, start + (i + 1) * size)) for i in range(count)]


def _sqlite_writer(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the server's writes
    cursor.execute("PRAGMA synchronous=NORMAL")  # a commit survives a killed process
    cursor.close()


def _sqlite_reader(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")  # the file's WAL mode is the writer's
    cursor.close()


def describe_failure(err: BaseException) -> str:
    """One line for a failed write: SQLAlchemy's message without its SQL and parameters."""
    if isinstance(err, sa.exc.DBAPIError) and err.orig is not None:
        return describe_error(err.orig)
    return describe_error(err)
