"""The batched lookup's conversion of Feast's response protos to Arrow gives what `to_dict()`
then `pa.array` gives, and its take of fixed-width lists equals Arrow's own take."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, Int64List
from feast.protos.feast.types.Value_pb2 import Null as NullProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type

from nlpctr.features.store.online import arrow_column, packed_header, packed_lists, take_rows


def _as_to_dict(values: list[ValueProto], kind: pa.DataType) -> pa.Array:
    """The reference: Feast's own Python values (what `to_dict()` holds), then Arrow."""
    return pa.array([feast_value_type_to_python_type(v) for v in values], kind)


def _floats(rng: np.random.Generator, n: int) -> ValueProto:
    return ValueProto(float_list_val=FloatList(val=rng.standard_normal(n).astype(np.float32).tolist()))


@pytest.mark.parametrize("width", [1, 3, 31, 32, 384, 4097])  # 1-, 2- and 3-byte size varints
def test_float_lists_read_from_their_packed_bytes_equal_to_dicts(width: int) -> None:
    rng = np.random.default_rng(width)
    values = [_floats(rng, width), ValueProto(), _floats(rng, width), _floats(rng, 0), ValueProto()]
    kind = pa.list_(pa.float32())
    got = packed_lists(values, kind)
    assert got is not None and got.null_count == 2
    assert got.equals(_as_to_dict(values, kind))
    assert got.to_pylist()[3] == []  # an empty list stays a list, not a null


def test_double_lists_and_ragged_lengths_equal_to_dicts() -> None:
    values = [
        ValueProto(double_list_val=DoubleList(val=[0.1, 1e300, -2.5])),
        ValueProto(double_list_val=DoubleList(val=[float("inf")])),
        ValueProto(),
    ]
    kind = pa.list_(pa.float64())
    assert arrow_column(values, kind).equals(_as_to_dict(values, kind))


def test_other_kinds_go_through_feasts_own_conversion() -> None:
    ints = [ValueProto(int64_list_val=Int64List(val=[1, 2])), ValueProto()]
    assert packed_lists(ints, pa.list_(pa.int64())) is None  # not a fixed-width float list
    assert arrow_column(ints, pa.list_(pa.int64())).equals(_as_to_dict(ints, pa.list_(pa.int64())))
    # A float32 column stored as doubles is not read from bytes: the Python path converts it.
    doubles = [ValueProto(double_list_val=DoubleList(val=[0.5, 0.25]))]
    assert packed_lists(doubles, pa.list_(pa.float32())) is None
    assert arrow_column(doubles, pa.list_(pa.float32())).equals(_as_to_dict(doubles, pa.list_(pa.float32())))
    scalars = {
        pa.float64(): [ValueProto(double_val=0.3), ValueProto(), ValueProto(null_val=NullProto.NULL)],
        pa.int64(): [ValueProto(int64_val=7), ValueProto(), ValueProto(int64_val=-1)],
        pa.string(): [ValueProto(string_val="a"), ValueProto(), ValueProto(string_val="")],
        pa.bool_(): [ValueProto(bool_val=True), ValueProto(bool_val=False), ValueProto()],
    }
    for kind, values in scalars.items():
        assert arrow_column(values, kind).equals(_as_to_dict(values, kind)), kind


def test_packed_header_is_protobufs_own() -> None:
    for n in (1, 31, 32, 4096, 5000):
        wire = FloatList(val=[1.0] * n).SerializeToString()
        assert wire[: -4 * n] == packed_header(4 * n)


def test_take_rows_equals_arrows_take() -> None:
    rng = np.random.default_rng(0)
    index = pa.array(rng.integers(0, 5, 40), pa.int32())
    fixed = pa.array([[1.0, 2.0], None, [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], pa.list_(pa.float32()))
    ragged = pa.array([[1.0], None, [], [5.0, 6.0], [7.0, 8.0, 9.0]], pa.list_(pa.float32()))
    scalar = pa.array([1, None, 3, 4, 5], pa.int64())
    for array in (fixed, ragged, scalar, pa.array([None] * 5, pa.list_(pa.float32()))):
        got = take_rows(array, index)
        assert got.type == array.type and got.equals(array.take(index))
    assert take_rows(pa.array([], pa.list_(pa.float32())), pa.array([], pa.int32())).to_pylist() == []
