"""Which storage contexts a C-GET proposes (pure)."""

from __future__ import annotations

from gateway.dimse.retrieve import MAX_CONTEXTS, NATIVE, STUDY_ROOT_GET, RetrieveRequest, storage_proposals
from gateway.dimse.storage_classes import CURATED_STORAGE_CLASSES

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def request(classes: list[str], syntaxes: tuple[str, ...] = NATIVE[:1]) -> RetrieveRequest:
    return RetrieveRequest("STUDY", "1.2", instances=[("1.2.3", f"1.2.3.{i}", c) for i, c in enumerate(classes)],
                           transfer_syntaxes=syntaxes)


def test_exactly_the_listed_classes_with_scp_roles() -> None:
    [proposal] = storage_proposals(request([CT, CT, SR]))
    assert proposal.contexts[0] == (STUDY_ROOT_GET, NATIVE)
    assert {uid for uid, _ in proposal.contexts[1:]} == {CT, SR}
    assert set(proposal.scp_roles) == {CT, SR}


def test_one_context_per_compressed_syntax_the_client_takes() -> None:
    [proposal] = storage_proposals(request([CT], syntaxes=(JPEG_LS, NATIVE[0])))
    assert (CT, NATIVE) in proposal.contexts and (CT, (JPEG_LS,)) in proposal.contexts


def test_unknown_classes_bring_in_the_curated_list() -> None:
    [proposal] = storage_proposals(request([CT, ""]))
    assert set(proposal.scp_roles) == set(CURATED_STORAGE_CLASSES) | {CT}
    assert len(proposal.contexts) <= MAX_CONTEXTS


def test_too_many_classes_split_over_associations() -> None:
    classes = [f"1.2.840.10008.5.1.4.1.1.999.{i}" for i in range(300)]
    proposals = storage_proposals(request(classes, syntaxes=(JPEG_LS, NATIVE[0])))
    assert len(proposals) == 3  # compressed contexts dropped first, then 127 classes each
    assert all(len(p.contexts) <= MAX_CONTEXTS for p in proposals)
    assert sorted(uid for p in proposals for uid in p.scp_roles) == sorted(classes)
