"""The users' concept banks as the stages see them: loaded once per worker process and user, at the
version the run pinned at its start."""

from __future__ import annotations

from dataclasses import dataclass, field

from plvm_model.store.output_schema import ErrorKind, RowError
from plvm_model.store import storage
from plvm_model.store.banks import BankError, BankStore, Bank

BankVersions = dict[str, int]
"""user_id -> the version of the user's bank a run reads (0: the user had no bank at its start)."""


@dataclass(frozen=True)
class BankSource:
    """Where the stages read the users' banks: the banks' root, its storage options, and the versions the run
    pinned (a user not in ``versions`` is read at its newest)."""

    uri: str
    storage_options: storage.StorageOptions | None = None
    versions: BankVersions = field(default_factory=dict)


class BankCache:
    """Users' banks, loaded on first use; a usable bank or a :class:`RowError` for each user.

    ``embedder_space`` and ``aligner``, when given, are checked against the bank's. A user is
    read at the version ``source`` pinned (a bank enrolled during the run is left to the next
    run).
    """

    def __init__(self, source: BankSource, embedder_space: str | None = None, aligner: str | None = None) -> None:
        self.bank = BankStore(source.uri, source.storage_options)
        self.embedder_space = embedder_space
        self.aligner = aligner
        self.versions = source.versions
        self._cache: dict[str, Bank | RowError] = {}

    def _load(self, user_id: str) -> Bank | RowError:
        try:
            bank = self.bank.load(user_id, self.versions.get(user_id))
        except BankError as error:
            return RowError(ErrorKind.BANK_ERROR, str(error))
        if bank is None:
            where = self.bank.location(user_id)
            return RowError(ErrorKind.UNKNOWN_USER, f"user {user_id!r} has no concept bank at {where}")
        if not bank.concepts:
            return RowError(ErrorKind.EMPTY_BANK, f"the concept bank of user {user_id!r} has no concepts")
        try:
            bank.check_compatible(embedder=self.embedder_space, aligner=self.aligner)
        except BankError as error:
            return RowError(ErrorKind.BANK_ERROR, str(error))
        return bank

    def get(self, user_id: str) -> Bank:
        if user_id not in self._cache:
            self._cache[user_id] = self._load(user_id)
        found = self._cache[user_id]
        if isinstance(found, RowError):
            raise found
        return found
