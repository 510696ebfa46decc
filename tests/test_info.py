"""SequenceInfo: from_hf against transformers' own helpers, absent fields, immutability, generations."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.utils._pytree as pytree
from transformers.masking_utils import find_packed_sequence_indices
from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask

from gemma4_flexring import SequenceInfo
from gemma4_flexring.planning.metadata import describe


def test_documents_match_find_packed_sequence_indices():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    info = SequenceInfo.from_hf(position_ids=position_ids)
    assert torch.equal(info.document_ids, find_packed_sequence_indices(position_ids))
    assert info.document_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_unpacked_positions_give_one_document_per_row():
    position_ids = torch.arange(9).repeat(2, 1)
    assert find_packed_sequence_indices(position_ids) is None
    info = SequenceInfo.from_hf(position_ids=position_ids)
    assert info.document_ids.tolist() == [[0] * 9] * 2
    assert not describe(*info.tensors()).documents


def test_blocks_match_get_block_sequence_ids_for_mask():
    types = torch.tensor([[0, 1, 1, 1, 0, 0, 2, 2, 0, 1], [1, 1, 0, 0, 0, 1, 1, 1, 1, 0]])
    info = SequenceInfo.from_hf(mm_token_type_ids=types)
    assert torch.equal(info.block_ids, get_block_sequence_ids_for_mask(types, torch.device("cpu")))
    assert info.block_ids[0].tolist() == [-1, 0, 0, 0, -1, -1, 1, 1, -1, 2]


def test_padding_from_attention_mask_and_absent_fields():
    attention_mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    info = SequenceInfo.from_hf(attention_mask=attention_mask)
    assert info.padding.tolist() == [[False, False, False, True], [True, False, False, False]]
    assert info.document_ids.tolist() == [[0] * 4] * 2 and info.block_ids.tolist() == [[-1] * 4] * 2
    assert info.document_ids.dtype == info.block_ids.dtype == torch.int64
    assert describe(*info.tensors())[1:] == (False, False, True)


def test_every_instance_gets_a_new_generation():
    a, b = SequenceInfo(shape=(1, 4)), SequenceInfo(shape=(1, 4))
    assert int(b.generation) > int(a.generation) > 0
    assert a.generation.dtype == torch.int64 and a.generation.dim() == 0


@pytest.mark.parametrize("kwargs, error", [
    (dict(document_ids=torch.zeros(4, dtype=torch.long)), ValueError),
    (dict(document_ids=torch.zeros(2, 4)), TypeError),
    (dict(padding=torch.zeros(2, 4, dtype=torch.long)), TypeError),
    (dict(document_ids=torch.zeros(2, 4, dtype=torch.long), padding=torch.zeros(2, 5, dtype=torch.bool)), ValueError),
    (dict(block_ids=[[0, 1]]), TypeError),
    (dict(block_ids=torch.zeros(2, 4, dtype=torch.uint8)), TypeError),  # text is -1: must be signed
    (dict(), ValueError),  # no tensor and no shape
])
def test_bad_metadata_is_rejected(kwargs, error):
    with pytest.raises(error, match="SequenceInfo"):
        SequenceInfo(**kwargs)


def test_from_hf_rejects_1d_positions_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"position_ids must be a \[B, S\] tensor, got \(8,\)"):
        SequenceInfo.from_hf(position_ids=torch.arange(8))


def test_shared_position_ids_broadcast_over_the_batch():
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    info = SequenceInfo.from_hf(attention_mask=attention_mask, position_ids=torch.tensor([[0, 1, 0, 1]]))
    assert info.document_ids.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_metadata_that_changes_no_mask_is_not_planned():
    info = SequenceInfo.from_hf(attention_mask=torch.ones(2, 4, dtype=torch.long),
                                mm_token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    assert not describe(*info.tensors()).any


def test_fields_cannot_be_replaced():
    info = SequenceInfo(padding=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(AttributeError, match="immutable"):
        info.padding = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(AttributeError, match="immutable"):
        copy.copy(info).generation = torch.tensor(0)
    with pytest.raises(AttributeError, match="immutable"):
        del info.document_ids


def test_tree_map_and_deepcopy_give_new_generations_pickle_keeps_it():
    info = SequenceInfo(document_ids=torch.tensor([[0, 0, 1, 1]]))
    mapped = pytree.tree_map(lambda t: t.clone(), info)
    assert isinstance(mapped, SequenceInfo) and int(mapped.generation) != int(info.generation)
    assert torch.equal(mapped.document_ids, info.document_ids)
    assert int(copy.deepcopy(info).generation) != int(info.generation)
    assert copy.copy(info) is info
    loaded = pickle.loads(pickle.dumps(info))
    assert int(loaded.generation) == int(info.generation) and torch.equal(loaded.padding, info.padding)


def test_digest_tells_permuted_rows_apart():
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, [0, 3]] = True
    padding[1, [1, 2]] = True
    assert describe(*SequenceInfo(padding=padding).tensors()).digest != \
        describe(*SequenceInfo(padding=padding.flip(0)).tensors()).digest
