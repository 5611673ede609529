"""Maps of runs or instances kept as a hot dict plus archived chunks.

An ``EntryMap`` keeps active and recently changed entries in memory and moves
ended ones into chunks, which are decoded only when something reads history.
The projection in ``events.projection`` keeps its runs and instances in these
maps, so a daemon opens in time that depends on what is active, not on how
long the log is.
"""

import operator
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    ValuesView,
)
from typing import Generic, NamedTuple, Protocol, TypeVar

import msgspec

# Entries per archive chunk. Reading one archived entry decodes its whole
# chunk, so this bounds the cost of looking up a single ended run.
CHUNK_ENTRIES = 4096


class NamedEntry(Protocol):
    """An entry of a map: a run or an instance, which lookups also find by name."""

    name: str


EntryT = TypeVar("EntryT", bound=NamedEntry)


class ChunkRef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """The location of a stored archive chunk and SHA-256 of its two parts."""

    position: int
    number: int
    index_hash: bytes
    entries_hash: bytes


class ChunkIndex(msgspec.Struct, array_like=True, gc=False):
    """The keys of an archive chunk's entries, their ranks and their names, in
    the order of the entries."""

    keys: list[str]
    ranks: list[int]
    names: list[str]


class Chunk(Generic[EntryT]):
    """Archived entries of one ``EntryMap``, stored and decoded together.

    A chunk from a snapshot starts with readers and decodes its index and its
    entries on first use. A chunk archived in this process starts decoded.
    ``ref`` is where the chunk is stored, ``None`` until a snapshot stored it.
    """

    __slots__ = ("_entries", "_index", "_read_entries", "_read_index", "ref")

    def __init__(
        self,
        index: ChunkIndex | None = None,
        entries: list[EntryT] | None = None,
        *,
        read_index: Callable[[], ChunkIndex] | None = None,
        read_entries: Callable[[], list[EntryT]] | None = None,
        ref: "ChunkRef | None" = None,
    ) -> None:
        if (index is None and read_index is None) or (
            entries is None and read_entries is None
        ):
            raise ValueError("a chunk needs its index and entries or their readers")

        self._index = index
        self._entries = entries
        self._read_index = read_index
        self._read_entries = read_entries
        self.ref = ref

    def index(self) -> ChunkIndex:
        if self._index is None:
            assert self._read_index is not None
            self._index = self._read_index()

        return self._index

    def entries(self) -> list[EntryT]:
        if self._entries is None:
            assert self._read_entries is not None
            entries = self._read_entries()
            if len(entries) != len(self.index().keys):
                raise ValueError(
                    f"archive chunk has {len(entries)} entries but its index "
                    f"has {len(self.index().keys)} keys"
                )

            self._entries = entries

        return self._entries


class _Location(NamedTuple):
    rank: int
    chunk: Chunk  # type: ignore[type-arg]
    offset: int


class _HotDict(dict[str, EntryT]):
    """The hot dict of an ``EntryMap``: a key it lacks is looked up in the
    archive and, when found there, moved back into it (``__missing__``)."""

    __slots__ = ("owner",)

    def __missing__(self, key: str) -> EntryT:
        return self.owner.promote(key)  # type: ignore[attr-defined, no-any-return]


class EntryMap(Mapping[str, EntryT]):
    """Runs or instances by id: a hot dict in memory plus an archive.

    ``hot`` contains every active run or live instance and every entry created
    or changed since the last snapshot. ``ranks`` maps each of its keys to a
    rank: the position of the record that created the entry. The archive contains
    the ended entries that a snapshot moved out of ``hot`` (``archive_ended``),
    in chunks that are read on first use.

    As a ``Mapping`` it contains every entry, in creation order, like the dict
    a replay builds: a lookup that misses ``hot`` reads the archive's index,
    and iteration, ``len`` and ``values`` read the whole archive. ``apply``
    writes only through ``hot`` and ``insert``: a write to an archived key
    moves that entry back into ``hot`` first (``promote``), so every entry
    that differs from its archived copy is in ``hot``. Code that needs only
    active runs or live instances reads ``hot_values`` and reads no archive.
    """

    __slots__ = (
        "_chunks",
        "_hot_sorted",
        "_index",
        "_merged",
        "_merged_version",
        "_names",
        "_names_stale",
        "_version",
        "hot",
        "ranks",
    )

    def __init__(
        self,
        entries: Mapping[str, EntryT] | None = None,
        ranks: Iterable[int] | None = None,
        chunks: Iterable[Chunk[EntryT]] = (),
    ) -> None:
        """Hold ``entries`` in ``hot`` and ``chunks`` as the archive.

        ``ranks`` gives each entry's rank in order; by default the entries
        rank before any created by a record, in the given order.
        """
        entries = entries or {}
        self.hot: _HotDict[EntryT] = _HotDict(entries)
        self.hot.owner = self
        if ranks is None:
            ranks = range(-len(entries), 0)

        self.ranks: dict[str, int] = dict(zip(entries, ranks, strict=True))
        self._chunks: list[Chunk[EntryT]] = list(chunks)
        self._index: dict[str, _Location] | None = None
        self._names: dict[str, tuple[int, str]] | None = None
        self._names_stale: set[str] = set()
        self._merged: dict[str, EntryT] | None = None
        self._merged_version = -1
        self._version = 0
        self._hot_sorted = True

    # Writes, for ``apply`` only

    def insert(self, key: str, entry: EntryT, rank: int) -> None:
        """Store ``entry`` in ``hot``; a new key gets rank ``rank``.

        NOTE: a key that exists only in the archive, whose index is not read
        yet, counts as new here. Until the index is read, ``hot_values`` orders
        it by ``rank``. Iteration over the whole map orders it by its first rank, as
        a replay does. The daemon never reuses an id.
        """
        self.hot[key] = entry
        if key not in self.ranks:
            location = None if self._index is None else self._index.get(key)
            self.ranks[key] = rank if location is None else min(rank, location.rank)

        self._version += 1

    def __setitem__(self, key: str, entry: EntryT) -> None:
        """Store ``entry`` like a dict: a new key ranks after every other."""
        if key not in self.hot and key in self:
            self.promote(key)

        if key in self.hot:
            self.insert(key, entry, self.ranks[key])
            return

        last = max(self.ranks.values(), default=-1)
        if self._chunks:
            archived = (location.rank for location in self._archive_index().values())
            last = max(last, max(archived, default=last))

        self.insert(key, entry, last + 1)

    def promote(self, key: str) -> EntryT:
        """Move the archived entry ``key`` back into ``hot`` and return it.

        Raises:
            KeyError: no entry has that key.
        """
        location = self._archive_index().pop(key, None)
        if location is None:
            raise KeyError(key)

        entry = location.chunk.entries()[location.offset]
        dict.__setitem__(self.hot, key, entry)
        self.ranks[key] = location.rank
        self._hot_sorted = False
        self._version += 1
        if self._names is not None and self._names.get(entry.name, (0, ""))[1] == key:
            self._names_stale.add(entry.name)

        return entry

    def archive_ended(self, is_ended: Callable[[EntryT], bool]) -> list[Chunk[EntryT]]:
        """Move the entries of ``hot`` for which ``is_ended`` returns true into
        new archive chunks, and return those chunks in rank order.
        """
        self._sort_hot()
        ended = [key for key, entry in self.hot.items() if is_ended(entry)]
        chunks = []
        for start in range(0, len(ended), CHUNK_ENTRIES):
            keys = ended[start : start + CHUNK_ENTRIES]
            entries = [self.hot[key] for key in keys]
            index = ChunkIndex(
                keys,
                [self.ranks[key] for key in keys],
                [entry.name for entry in entries],
            )
            chunks.append(Chunk(index, entries))

        for key in ended:
            del self.hot[key]
            del self.ranks[key]

        for chunk in chunks:
            self._add_chunk(chunk)

        return chunks

    # Reads that stay in memory

    def hot_values(self) -> list[EntryT]:
        """Return the entries of ``hot`` in creation order: every active run or
        live instance, and other entries changed since the last snapshot."""
        self._sort_hot()

        return list(self.hot.values())

    @property
    def chunks(self) -> list[Chunk[EntryT]]:
        """The archive's chunks, oldest first; later chunks override earlier."""
        return self._chunks

    # Mapping

    def __getitem__(self, key: str) -> EntryT:
        entry = self.hot.get(key)
        if entry is not None:
            return entry

        if self._chunks:
            location = self._archive_index().get(key)
            if location is not None:
                return location.chunk.entries()[location.offset]

        raise KeyError(key)

    def get(self, key: str, default: EntryT | None = None) -> EntryT | None:  # type: ignore[override]
        entry = self.hot.get(key)
        if entry is not None or not self._chunks:
            return default if entry is None else entry

        location = self._archive_index().get(key)
        if location is None:
            return default

        return location.chunk.entries()[location.offset]

    def __contains__(self, key: object) -> bool:
        if key in self.hot:
            return True

        return bool(self._chunks) and key in self._archive_index()

    def __len__(self) -> int:
        if not self._chunks:
            return len(self.hot)

        index = self._archive_index()
        both = sum(1 for key in self.hot if key in index)

        return len(self.hot) + len(index) - both

    def __iter__(self) -> Iterator[str]:
        return iter(self._merged_dict())

    def keys(self) -> KeysView[str]:
        return self._merged_dict().keys()

    def values(self) -> ValuesView[EntryT]:
        return self._merged_dict().values()

    def items(self) -> ItemsView[str, EntryT]:
        return self._merged_dict().items()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EntryMap):
            return self._merged_dict() == other._merged_dict()

        if isinstance(other, Mapping):
            return self._merged_dict() == dict(other)

        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EntryMap({self._merged_dict()!r})"

    def last_named(self, name: str) -> EntryT | None:
        """Return the newest entry whose ``name`` is ``name``, or ``None``.

        Reads the archive's index but decodes at most one chunk.
        """
        best_rank = None
        best: EntryT | None = None
        for key, entry in self.hot.items():
            rank = self.ranks[key]
            if entry.name == name and (best_rank is None or rank > best_rank):
                best_rank, best = rank, entry

        if not self._chunks:
            return best

        archived = self._archived_name(name)
        if archived is not None and (best_rank is None or archived[0] > best_rank):
            return self[archived[1]]

        return best

    def rank_of(self, key: str) -> int:
        """Return the rank of ``key``: the position of the record that created
        it, or a negative number for an entry given to the constructor."""
        rank = self.ranks.get(key)
        location = self._archive_index().get(key) if self._chunks else None
        if location is not None and (rank is None or location.rank < rank):
            rank = location.rank

        if rank is None:
            raise KeyError(key)

        return rank

    # Internals

    def _sort_hot(self) -> None:
        """Restore creation order in ``hot`` after promotions appended to it."""
        if self._hot_sorted:
            return

        ranks = self.ranks
        items = sorted(self.hot.items(), key=lambda item: ranks[item[0]])
        self.hot.clear()
        self.hot.update(items)
        self._hot_sorted = True

    def _archive_index(self) -> dict[str, _Location]:
        """Return the location of every archived key, reading chunk indexes
        on first use."""
        if self._index is None:
            index: dict[str, _Location] = {}
            for chunk in self._chunks:
                _index_chunk(index, chunk)

            self._index = index
            self._reconcile_ranks()

        return self._index

    def _reconcile_ranks(self) -> None:
        """Give a key that ``insert`` saw as new its archived, earlier rank."""
        assert self._index is not None
        for key, rank in self.ranks.items():
            location = self._index.get(key)
            if location is not None and location.rank < rank:
                self.ranks[key] = location.rank
                self._hot_sorted = False

    def _add_chunk(self, chunk: Chunk[EntryT]) -> None:
        self._chunks.append(chunk)
        if self._index is not None:
            _index_chunk(self._index, chunk)

        if self._names is not None:
            index = chunk.index()
            for key, rank, name in zip(index.keys, index.ranks, index.names):
                if rank >= self._names.get(name, (rank, key))[0]:
                    self._names[name] = (rank, key)

    def _archived_name(self, name: str) -> tuple[int, str] | None:
        """Return the rank and key of the newest archived entry named ``name``."""
        index = self._archive_index()
        if self._names is None or name in self._names_stale:
            names: dict[str, tuple[int, str]] = {}
            for chunk in self._chunks:
                chunk_index = chunk.index()
                for key, rank, entry_name in zip(
                    chunk_index.keys, chunk_index.ranks, chunk_index.names
                ):
                    location = index.get(key)
                    if location is None or location.chunk is not chunk:
                        continue

                    if rank >= names.get(entry_name, (rank, key))[0]:
                        names[entry_name] = (rank, key)

            self._names = names
            self._names_stale.clear()

        return self._names.get(name)

    def _merged_dict(self) -> dict[str, EntryT]:
        """Return every entry in creation order, reading the whole archive."""
        if not self._chunks:
            self._sort_hot()
            return self.hot

        if self._merged is not None and self._merged_version == self._version:
            return self._merged

        index = self._archive_index()
        ranked: list[tuple[int, str, EntryT]] = []
        for key, location in index.items():
            if key not in self.hot:
                entry = location.chunk.entries()[location.offset]
                ranked.append((location.rank, key, entry))

        for key, entry in self.hot.items():
            ranked.append((self.rank_of(key), key, entry))

        ranked.sort(key=operator.itemgetter(0))
        self._merged = {key: entry for _, key, entry in ranked}
        self._merged_version = self._version

        return self._merged


def _index_chunk(index: dict[str, _Location], chunk: Chunk) -> None:  # type: ignore[type-arg]
    """Point ``index`` at the entries of ``chunk``, which override older copies
    but keep their first rank."""
    chunk_index = chunk.index()
    for offset, (key, rank) in enumerate(zip(chunk_index.keys, chunk_index.ranks)):
        older = index.get(key)
        if older is not None and older.rank < rank:
            rank = older.rank

        index[key] = _Location(rank, chunk, offset)
