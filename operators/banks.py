"""The users' concept banks as the stages see them: loaded once per worker process and user, at the
version the run pinned at its start."""

from __future__ import annotations

from operators.rows import ErrorKind, RowError
from plvm_model import storage
from plvm_model.bank import BankError, ConceptBank, UserBank

BankVersions = dict[str, int]
"""user_id -> the version of the user's bank a run reads (0: the user had no bank at its start)."""


class BankCache:
    """Users' banks, loaded on first use; a usable bank or a :class:`RowError` for each user.

    ``embedder_space`` and ``aligner``, when given, are checked against the bank's. A user in
    ``versions`` is read at that version (a bank enrolled during the run is left to the next
    run), any other at its newest.
    """

    def __init__(
        self,
        uri: str,
        storage_options: storage.StorageOptions | None = None,
        embedder_space: str | None = None,
        aligner: str | None = None,
        versions: BankVersions | None = None,
    ) -> None:
        self.bank = ConceptBank(uri, storage_options)
        self.embedder_space = embedder_space
        self.aligner = aligner
        self.versions = versions or {}
        self._cache: dict[str, UserBank | RowError] = {}

    def _load(self, user_id: str) -> UserBank | RowError:
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

    def get(self, user_id: str) -> UserBank:
        if user_id not in self._cache:
            self._cache[user_id] = self._load(user_id)
        found = self._cache[user_id]
        if isinstance(found, RowError):
            raise found
        return found
