"""The transfer log's Merkle math against the published RFC 6962 test vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from residency.server.core import merkle

V = json.loads((Path(__file__).parent / "vectors" / "rfc6962.json").read_text())
LEAVES = [merkle.leaf_hash(bytes.fromhex(d)) for d in V["leaf_inputs"]]
ROOTS = [bytes.fromhex(r) for r in V["roots"]]


def hexes(proof: list[bytes]) -> list[str]:
    return [h.hex() for h in proof]


def test_leaf_hashes_match_the_vectors():
    assert [h.hex() for h in LEAVES] == V["leaf_hashes"]


def test_roots_of_every_prefix_match_the_vectors():
    tree = merkle.Tree()
    assert tree.root() == ROOTS[0] == merkle.EMPTY_ROOT
    for n in range(1, 9):
        tree.extend([LEAVES[n - 1]])
        assert merkle.root(LEAVES[:n]) == ROOTS[n]
        assert tree.root() == ROOTS[n]
        assert merkle.Tree(LEAVES).root(n) == ROOTS[n]


@pytest.mark.parametrize("case", V["inclusion"], ids=lambda c: f"{c['index']}-of-{c['size']}")
def test_inclusion_proofs_match_the_vectors_and_verify(case):
    i, n = case["index"], case["size"]
    proof = merkle.inclusion_proof(LEAVES[:n], i)
    assert hexes(proof) == case["proof"]
    merkle.verify_inclusion(i, n, LEAVES[i], proof, ROOTS[n])
    for bad in (
        (i, n, LEAVES[(i + 1) % 8], proof, ROOTS[n]),  # another leaf
        (i, n, LEAVES[i], proof, ROOTS[n - 1]),  # another root
        (i, n, LEAVES[i], [*proof, ROOTS[n]], ROOTS[n]),  # trailing garbage
        (i, n * 2, LEAVES[i], proof, ROOTS[n]),  # wrong tree height
    ):
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(*bad)


@pytest.mark.parametrize("case", V["consistency"], ids=lambda c: f"{c['old_size']}-to-{c['size']}")
def test_consistency_proofs_match_the_vectors_and_verify(case):
    m, n = case["old_size"], case["size"]
    proof = merkle.consistency_proof(LEAVES[:n], m)
    assert hexes(proof) == case["proof"]
    merkle.verify_consistency(m, n, ROOTS[m], ROOTS[n], proof)
    if proof:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(m, n, ROOTS[n], ROOTS[m], proof)  # swapped roots
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(m, n, ROOTS[m], ROOTS[n], proof[:-1])  # truncated
        flipped = [bytes([proof[0][0] ^ 16]) + proof[0][1:], *proof[1:]]
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(m, n, ROOTS[m], ROOTS[n], flipped)


def test_a_tree_cannot_shrink():
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(2, 1, ROOTS[2], ROOTS[1], [])


@given(st.integers(1, 300), st.data())
def test_every_proof_verifies_for_every_size(n, data):
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    tree = merkle.Tree(leaves)
    i = data.draw(st.integers(0, n - 1))
    m = data.draw(st.integers(0, n))
    assert tree.root() == merkle.root(leaves)
    proof = tree.inclusion_proof(i, n)
    assert len(proof) <= (n - 1).bit_length()
    merkle.verify_inclusion(i, n, leaves[i], proof, tree.root())
    merkle.verify_consistency(m, n, tree.root(m), tree.root(n), tree.consistency_proof(m, n))
