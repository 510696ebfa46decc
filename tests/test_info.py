"""SequenceInfo.from_hf against transformers' own helpers."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices
from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask

from gemma4_flexring import SequenceInfo


def test_documents_match_find_packed_sequence_indices():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    info = SequenceInfo.from_hf(position_ids=position_ids)
    assert torch.equal(info.document_ids, find_packed_sequence_indices(position_ids))
    assert info.document_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_unpacked_positions_give_no_documents():
    position_ids = torch.arange(9).repeat(2, 1)
    assert find_packed_sequence_indices(position_ids) is None
    assert SequenceInfo.from_hf(position_ids=position_ids).document_ids is None


def test_blocks_match_get_block_sequence_ids_for_mask():
    types = torch.tensor([[0, 1, 1, 1, 0, 0, 2, 2, 0, 1], [1, 1, 0, 0, 0, 1, 1, 1, 1, 0]])
    info = SequenceInfo.from_hf(mm_token_type_ids=types)
    assert torch.equal(info.block_ids, get_block_sequence_ids_for_mask(types, torch.device("cpu")))
    assert info.block_ids[0].tolist() == [-1, 0, 0, 0, -1, -1, 1, 1, -1, 2]


def test_padding_from_attention_mask():
    attention_mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    info = SequenceInfo.from_hf(attention_mask=attention_mask)
    assert info.padding.tolist() == [[False, False, False, True], [True, False, False, False]]
    assert info.document_ids is None and info.block_ids is None


def test_every_instance_gets_a_new_generation():
    a, b = SequenceInfo(), SequenceInfo()
    assert int(b.generation) > int(a.generation)
    assert a.generation.dtype == torch.int64 and a.generation.dim() == 0


@pytest.mark.parametrize("kwargs, error", [
    (dict(document_ids=torch.zeros(4, dtype=torch.long)), ValueError),
    (dict(document_ids=torch.zeros(2, 4)), TypeError),
    (dict(padding=torch.zeros(2, 4, dtype=torch.long)), TypeError),
    (dict(document_ids=torch.zeros(2, 4, dtype=torch.long), padding=torch.zeros(2, 5, dtype=torch.bool)), ValueError),
    (dict(block_ids=[[0, 1]]), TypeError),
    (dict(block_ids=torch.zeros(2, 4, dtype=torch.uint8)), TypeError),  # text is -1: must be signed
])
def test_bad_metadata_is_rejected(kwargs, error):
    with pytest.raises(error, match="SequenceInfo"):
        SequenceInfo(**kwargs)


def test_shared_position_ids_broadcast_over_the_batch():
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    info = SequenceInfo.from_hf(attention_mask=attention_mask, position_ids=torch.tensor([[0, 1, 0, 1]]))
    assert info.document_ids.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_metadata_that_changes_no_mask_is_dropped():
    info = SequenceInfo.from_hf(attention_mask=torch.ones(2, 4, dtype=torch.long),
                                mm_token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    assert info.padding is None and info.block_ids is None
