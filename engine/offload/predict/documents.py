"""Which documents a predictor was trained on, recorded by identity in its file: a trace of the
same corpus in another order, or split with another seed, must not pass trained text off as
held out. A document is known by its name (a corpus file's resolved path) and by the SHA-256 of
its first PREFIX token ids (a --max-tokens budget cuts documents at other lengths, never that
short): the name still matches a file traced with another budget, the tokens a file copied
elsewhere, traced with any budget. Either match counts it as trained on, so a false match (two
files that open alike) only shrinks the test set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.offload.predict.files import reading
from engine.offload.predict.trace import TraceSet

INFO_KEY = "trained_documents"  # where a predictor file's info keeps them
PREFIX = 32  # tokens of a document its digest covers


def document_keys(traces: TraceSet) -> dict[int, tuple[str, str]]:
    """doc id -> (name, SHA-256 of its first PREFIX token ids) of every document in the traces."""
    order = torch.argsort(traces.doc_ids, stable=True)  # each document's rows, in order
    docs, counts = torch.unique_consecutive(traces.doc_ids[order], return_counts=True)
    ids = traces.token_ids[order].to(torch.int32).numpy().astype("<i4")
    keys, start = {}, 0
    for doc, count in zip(docs.tolist(), counts.tolist(), strict=True):
        prefix = ids[start : start + min(count, PREFIX)]
        digest = hashlib.sha256(prefix.tobytes()).hexdigest()[:32]
        keys[doc] = (traces.meta.documents[doc], digest)
        start += count
    return keys


@dataclass(frozen=True)
class TrainedDocuments:
    names: frozenset[str]
    tokens_sha256: frozenset[str]

    @classmethod
    def of(cls, traces: TraceSet) -> TrainedDocuments:
        keys = document_keys(traces).values()
        return cls(frozenset(n for n, _ in keys), frozenset(h for _, h in keys))

    def as_info(self) -> dict[str, list[str]]:
        return {"names": sorted(self.names), "tokens_sha256": sorted(self.tokens_sha256)}

    @classmethod
    def from_info(cls, info: dict[str, Any], path: str | Path) -> TrainedDocuments:
        """From a predictor file's info; one trained before they were recorded is refused."""
        if INFO_KEY not in info:
            raise ValueError(
                f"{path} does not record the documents it was trained on, so no held-out "
                "documents can be told apart: retrain it (expertflow train-predictor)"
            )
        with reading(path, "predictor"):
            raw = info[INFO_KEY]
            names, hashes = raw["names"], raw["tokens_sha256"]
            if not all(isinstance(v, str) for v in [*names, *hashes]):
                raise TypeError(f"{INFO_KEY} must hold lists of strings")
        return cls(frozenset(names), frozenset(hashes))

    def split(self, traces: TraceSet) -> tuple[TraceSet, TraceSet]:
        """(the documents of `traces` trained on, those not)."""
        seen = [
            doc
            for doc, (name, digest) in document_keys(traces).items()
            if name in self.names or digest in self.tokens_sha256
        ]
        seen_ids = torch.tensor(seen, dtype=torch.int32)
        unseen = torch.unique(traces.doc_ids[~torch.isin(traces.doc_ids, seen_ids)])
        return traces.select_documents(seen_ids), traces.select_documents(unseen)
