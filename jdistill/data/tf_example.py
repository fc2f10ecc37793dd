"""Reading serialized ``tf.train.Example`` records (what TFDS writes into array_record files) without TensorFlow.

Only what the data sources need: the ``bytes_list`` features (text, encoded images) by name, from the
protobuf wire format:

    Example { Features features = 1 }   Features { map<string, Feature> feature = 1 }
    Feature { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3 } }
    BytesList { repeated bytes value = 1 }
"""

from __future__ import annotations

from collections.abc import Iterator

from jdistill.data.files import field_of


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(field number, payload of length-delimited fields; None for the other wire types, skipped)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            yield number, data[pos : pos + size]
            pos += size
        elif wire == 0:
            _, pos = _varint(data, pos)
            yield number, None
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            yield number, None
        else:
            raise ValueError(f"unsupported wire type {wire}")


def looks_like_example(record: bytes) -> bool:
    """Serialized Examples start with field 1, length-delimited (0x0a): never the first byte of a JSON object
    or of a stripped UTF-8 prompt."""
    return record[:1] == b"\x0a"


def bytes_features(record: bytes) -> dict[str, list[bytes]]:
    """The bytes_list features of a serialized Example, by name (other feature kinds are left out)."""
    out: dict[str, list[bytes]] = {}
    for number, features in _fields(record):
        if number != 1 or features is None:
            continue
        for entry_number, entry in _fields(features):
            if entry_number != 1 or entry is None:
                continue
            name, feature = "", b""
            for n, payload in _fields(entry):
                if n == 1 and payload is not None:
                    name = payload.decode("utf-8")
                elif n == 2 and payload is not None:
                    feature = payload
            for kind, values in _fields(feature):
                if kind == 1 and values is not None:
                    out[name] = [v for n, v in _fields(values) if n == 1 and v is not None]
    return out


def example_value(record: bytes, field: str, defaults: tuple[str, ...], where: str) -> bytes:
    """The first value of bytes feature ``field`` (or of the first of ``defaults`` present) of an Example."""
    where = f"{where} (a tf.train.Example)"
    try:
        features = bytes_features(record)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} does not parse: {err}") from None
    values = field_of(features, field, defaults, where)
    if not values:
        raise ValueError(f"{where}: feature {field or defaults} holds no value")
    return values[0]
